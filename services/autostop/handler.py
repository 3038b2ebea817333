"""The safety net: stop every running instance of its stack tagged for auto-stop whose accelerators have been
idle, and start the stopped training instance when a training job waits for it.

Runs every few minutes (an EventBridge schedule), independently of the instances themselves, so it catches
a box whose own idle agent, CloudWatch agent or utilisation publisher has died. An instance is stopped when
it carries ``tessera:auto-stop=true`` and its stack's ``tessera:stack`` (``TESSERA_AUTOSTOP_TRAINING_STACK``:
another stack's function, with its own settings and queues, looks after that stack's boxes), has
been up for at least the idle period, the busiest of its accelerators stayed below the threshold over the
whole idle period, and it sent no busy heartbeat in that period (``tessera/Training`` ``Busy``: the trainer
sends it every minute while a job runs, data staging and CPU-bound phases included, and the box's idle agent
while someone is logged in). No data at all over that period counts as idle: a healthy box publishes every
minute, so silence means something broke, and a broken box bills just the same.

**Queued jobs.** When the job queues (``TESSERA_AUTOSTOP_JOB_QUEUE_URLS``, the training-jobs queue) hold
visible messages (``ApproximateNumberOfMessages``), whoever sent them (``tessera train submit``, the sight
catalog's refresher), the function starts a stopped training instance of its stack (tagged
``tessera:role=training``, ``tessera:start-on-demand=true`` and ``tessera:stack`` =
``TESSERA_AUTOSTOP_TRAINING_STACK``, as ``services/trainer/launch.py`` finds it) unless one is already up, so
a job waits at most one schedule period before its box starts. A training instance of that stack with jobs
waiting is given the idle period plus ``TESSERA_AUTOSTOP_START_GRACE_MINUTES`` from its start (default 15)
to boot and take one before the idle rule applies; past that, a box that still shows no work while jobs
wait is broken (a healthy trainer takes a visible job within seconds) and is stopped, and it is not started
again for the queue while its last run was that long with no busy heartbeat at all: a dead trainer would
otherwise be restarted all day for a job it never takes (a job it takes and fails goes to the dead-letter
queue after the queue's maxReceiveCount). Starting it by hand (``tessera train submit``) clears that.

Settings come from the environment (set by ``infra/autostop.py``):
``TESSERA_AUTOSTOP_IDLE_MINUTES`` (default 15), ``TESSERA_AUTOSTOP_THRESHOLD_PERCENT`` (default 5) and
``TESSERA_AUTOSTOP_METRICS``, a JSON list of ``{"namespace": ..., "metric": ...}`` utilisation metrics that
carry an ``InstanceId`` dimension (default: the CloudWatch agent's NVIDIA metric and the Gaudi/Neuron one),
and ``TESSERA_AUTOSTOP_BUSY_METRIC``, the busy heartbeat as one ``{"namespace": ..., "metric": ...}``
(default ``tessera/Training`` ``Busy``; any value of 1 or more in the period means busy);
``TESSERA_AUTOSTOP_JOB_QUEUE_URLS`` (a JSON list; none: nothing is ever started),
``TESSERA_AUTOSTOP_TRAINING_STACK`` (the stack whose instances it stops and starts; the function refuses to
run without it) and ``TESSERA_AUTOSTOP_START_GRACE_MINUTES``.

Standard library and boto3 only: Lambda's Python runtime provides boto3, and this directory is deployed
on its own.

This module stays one file (~520 lines): it is the Lambda function's code, packaged from this directory by
``infra/autostop.py`` with ``handler.py`` as its entry point, and a second module would be one more file
that the archive, its check and its test must all keep in step.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3

log = logging.getLogger(__name__)

AUTO_STOP_TAG = "tessera:auto-stop"
AUTO_STOP_VALUE = "true"
IDLE_MINUTES_ENV = "TESSERA_AUTOSTOP_IDLE_MINUTES"
THRESHOLD_ENV = "TESSERA_AUTOSTOP_THRESHOLD_PERCENT"
METRICS_ENV = "TESSERA_AUTOSTOP_METRICS"
BUSY_METRIC_ENV = "TESSERA_AUTOSTOP_BUSY_METRIC"
JOB_QUEUE_URLS_ENV = "TESSERA_AUTOSTOP_JOB_QUEUE_URLS"
TRAINING_STACK_ENV = "TESSERA_AUTOSTOP_TRAINING_STACK"
START_GRACE_ENV = "TESSERA_AUTOSTOP_START_GRACE_MINUTES"
DEFAULT_IDLE_MINUTES = 15.0
DEFAULT_START_GRACE_MINUTES = 15.0
DEFAULT_THRESHOLD_PERCENT = 5.0
PERIOD_S = 60
"""Resolution of the utilisation read (the CloudWatch agent and the publishers report every minute)."""
QUERIES_PER_CALL = 500
"""GetMetricData's limit of metric queries per request."""

# The training instance's functional tags (``infra/training.py``), as ``services/trainer/launch.py`` finds it.
ROLE_TAG = "tessera:role"
ROLE_TRAINING = "training"
START_ON_DEMAND_TAG = "tessera:start-on-demand"
START_ON_DEMAND_VALUE = "true"
STACK_TAG = "tessera:stack"
QUEUED_ATTRIBUTE = "ApproximateNumberOfMessages"
"""Visible messages: jobs nobody has taken yet (in-flight ones are a running job's, delayed ones not due)."""
LIVE_STATES = ("pending", "running", "stopping", "stopped")
UP_STATES = ("pending", "running")
LAST_RUN_LOOKBACK = timedelta(days=1)
"""How far back from its stop a stopped box's last run is searched for a busy heartbeat."""
_STOPPED_AT = re.compile(r"\((\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) (?:GMT|UTC)\)")
"""The stop time in ``StateTransitionReason``: ``User initiated (2027-01-01 12:00:00 GMT)``."""


@dataclass(frozen=True)
class Metric:
    """One utilisation metric, in percent, with an ``InstanceId`` dimension."""

    namespace: str
    name: str


DEFAULT_METRICS = (
    Metric("CWAgent", "nvidia_smi_utilization_gpu"),
    Metric("tessera/Accelerators", "AcceleratorUtilization"),
)
DEFAULT_BUSY_METRIC = Metric("tessera/Training", "Busy")
"""The busy heartbeat: 1 while a job runs or someone is logged in (``services.trainer.idle``)."""


@dataclass(frozen=True)
class Settings:
    """How idle is idle."""

    idle_minutes: float = DEFAULT_IDLE_MINUTES
    threshold_percent: float = DEFAULT_THRESHOLD_PERCENT
    metrics: tuple[Metric, ...] = DEFAULT_METRICS
    busy_metric: Metric = DEFAULT_BUSY_METRIC
    job_queue_urls: tuple[str, ...] = ()
    """Queues whose visible messages are jobs for the training instance; empty: nothing is started."""
    training_stack: str | None = None
    """The ``tessera:stack`` tag of the training instances started for those jobs (required with queues), and
    of the instances stopped (None: tagged instances of every stack; the Lambda entry point requires it)."""
    start_grace_minutes: float = DEFAULT_START_GRACE_MINUTES
    """Minutes beyond the idle period that a training instance with jobs waiting gets to take one."""

    def __post_init__(self) -> None:
        if not self.idle_minutes > 0:
            raise ValueError(
                f"{IDLE_MINUTES_ENV} must be a positive number of minutes, got {self.idle_minutes}"
            )
        if not 0 < self.threshold_percent <= 100:
            raise ValueError(
                f"{THRESHOLD_ENV} must be a percentage in (0, 100], got {self.threshold_percent}"
            )
        if not self.metrics:
            raise ValueError(f"{METRICS_ENV} must name at least one utilisation metric")
        if not self.start_grace_minutes >= 0:
            raise ValueError(
                f"{START_GRACE_ENV} must be zero or more minutes, got {self.start_grace_minutes}"
            )
        if self.job_queue_urls and not self.training_stack:
            raise ValueError(
                f"{TRAINING_STACK_ENV} must name the stack whose training instance runs the jobs of "
                f"{JOB_QUEUE_URLS_ENV}"
            )

    @property
    def start_allowance(self) -> timedelta:
        """How long from its start a training instance with jobs waiting may show no work."""
        return timedelta(minutes=self.idle_minutes + self.start_grace_minutes)

    @staticmethod
    def from_environment(environ: Mapping[str, str]) -> Settings:
        """Settings from the function's environment; a bad value raises ValueError naming the variable."""

        def number(name: str, default: float) -> float:
            raw = environ.get(name, "").strip()
            if not raw:
                return default
            try:
                return float(raw)
            except ValueError:
                raise ValueError(f"{name} must be a number, got {raw!r}") from None

        metrics: tuple[Metric, ...] = DEFAULT_METRICS
        raw_metrics = environ.get(METRICS_ENV, "").strip()
        if raw_metrics:
            try:
                listed = json.loads(raw_metrics)
                metrics = tuple(Metric(str(m["namespace"]), str(m["metric"])) for m in listed)
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(
                    f'{METRICS_ENV} must be a JSON list of {{"namespace": ..., "metric": ...}}: {exc}'
                ) from None
        busy_metric = DEFAULT_BUSY_METRIC
        raw_busy = environ.get(BUSY_METRIC_ENV, "").strip()
        if raw_busy:
            try:
                named = json.loads(raw_busy)
                busy_metric = Metric(str(named["namespace"]), str(named["metric"]))
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(
                    f'{BUSY_METRIC_ENV} must be one JSON {{"namespace": ..., "metric": ...}}: {exc}'
                ) from None
        queue_urls: tuple[str, ...] = ()
        raw_queues = environ.get(JOB_QUEUE_URLS_ENV, "").strip()
        if raw_queues:
            try:
                listed_urls = json.loads(raw_queues)
                if not isinstance(listed_urls, list) or not all(
                    isinstance(u, str) and u for u in listed_urls
                ):
                    raise TypeError("not a list of URLs")
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{JOB_QUEUE_URLS_ENV} must be a JSON list of queue URLs: {exc}") from None
            queue_urls = tuple(listed_urls)
        return Settings(
            idle_minutes=number(IDLE_MINUTES_ENV, DEFAULT_IDLE_MINUTES),
            threshold_percent=number(THRESHOLD_ENV, DEFAULT_THRESHOLD_PERCENT),
            metrics=metrics,
            busy_metric=busy_metric,
            job_queue_urls=queue_urls,
            training_stack=environ.get(TRAINING_STACK_ENV, "").strip() or None,
            start_grace_minutes=number(START_GRACE_ENV, DEFAULT_START_GRACE_MINUTES),
        )


def running_auto_stop_instances(ec2: Any, stack: str | None = None) -> list[dict[str, Any]]:
    """Every running instance tagged ``tessera:auto-stop=true`` and, when ``stack`` is given,
    ``tessera:stack`` = ``stack``: another stack's boxes follow that stack's own settings (its idle period,
    its queues' grace)."""
    filters = [
        {"Name": f"tag:{AUTO_STOP_TAG}", "Values": [AUTO_STOP_VALUE]},
        {"Name": "instance-state-name", "Values": ["running"]},
    ]
    if stack is not None:
        filters.append({"Name": f"tag:{STACK_TAG}", "Values": [stack]})
    found: list[dict[str, Any]] = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page.get("Reservations", []):
            found.extend(reservation.get("Instances", []))
    return found


def training_instances(ec2: Any, stack: str) -> list[dict[str, Any]]:
    """The training instances of ``stack`` that may be started on demand (not terminated), by id."""
    filters = [
        {"Name": f"tag:{ROLE_TAG}", "Values": [ROLE_TRAINING]},
        {"Name": f"tag:{START_ON_DEMAND_TAG}", "Values": [START_ON_DEMAND_VALUE]},
        {"Name": f"tag:{STACK_TAG}", "Values": [stack]},
        {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
    ]
    found: list[dict[str, Any]] = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page.get("Reservations", []):
            found.extend(reservation.get("Instances", []))
    return sorted(found, key=lambda i: str(i["InstanceId"]))


def queued_jobs(sqs: Any, queue_urls: Sequence[str]) -> dict[str, int | str]:
    """Each queue's visible messages (jobs nobody has taken), or why it could not be read.

    A queue that cannot be read counts as empty: the stop rules must not depend on it.
    """
    counts: dict[str, int | str] = {}
    for url in queue_urls:
        try:
            response = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[QUEUED_ATTRIBUTE])
            counts[url] = int(response.get("Attributes", {}).get(QUEUED_ATTRIBUTE, 0))
        except Exception as exc:
            counts[url] = f"{type(exc).__name__}: {exc}"
            log.error("could not read the queue %s: %s", url, exc)
    return counts


def stopped_at(instance: Mapping[str, Any]) -> datetime | None:
    """When a stopped instance was stopped, from its ``StateTransitionReason``; None when it does not say."""
    found = _STOPPED_AT.search(str(instance.get("StateTransitionReason") or ""))
    if found is None:
        return None
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)


def peak_utilisation(
    cloudwatch: Any,
    instance_ids: Sequence[str],
    metrics: Sequence[Metric],
    *,
    start: datetime,
    end: datetime,
) -> dict[str, float | None]:
    """The highest value each instance reported between ``start`` and ``end`` over all ``metrics``
    (utilisation, or the busy heartbeat).

    None for an instance with no datapoint at all.
    """
    queries: list[tuple[str, str, dict[str, Any]]] = []
    for i, instance_id in enumerate(instance_ids):
        for j, metric in enumerate(metrics):
            query_id = f"i{i}m{j}"  # ids must start with a lower-case letter
            queries.append(
                (
                    query_id,
                    instance_id,
                    {
                        "Id": query_id,
                        "MetricStat": {
                            "Metric": {
                                "Namespace": metric.namespace,
                                "MetricName": metric.name,
                                "Dimensions": [{"Name": "InstanceId", "Value": instance_id}],
                            },
                            "Period": PERIOD_S,
                            "Stat": "Maximum",
                        },
                        "ReturnData": True,
                    },
                )
            )
    owner = {query_id: instance_id for query_id, instance_id, _ in queries}
    peaks: dict[str, float | None] = dict.fromkeys(instance_ids)
    for first in range(0, len(queries), QUERIES_PER_CALL):
        batch = [query for _, _, query in queries[first : first + QUERIES_PER_CALL]]
        token: str | None = None
        while True:
            request: dict[str, Any] = {"MetricDataQueries": batch, "StartTime": start, "EndTime": end}
            if token:
                request["NextToken"] = token
            response = cloudwatch.get_metric_data(**request)
            for result in response.get("MetricDataResults", []):
                values = [float(v) for v in result.get("Values", [])]
                if not values:
                    continue
                instance_id = owner[result["Id"]]
                best = peaks[instance_id]
                peaks[instance_id] = max(values) if best is None else max(best, *values)
            token = response.get("NextToken")
            if not token:
                break
    return peaks


def _minutes(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 60:.0f} min"


def decide(
    instances: Iterable[Mapping[str, Any]],
    peaks: Mapping[str, float | None],
    settings: Settings,
    now: datetime,
    busy: Mapping[str, float | None] | None = None,
    *,
    waiting: Collection[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """Which instances to stop, and why each of the others is spared.

    ``peaks`` is each instance's highest utilisation over the idle period, ``busy`` its highest busy
    heartbeat (1: a job ran or someone was logged in); None or absent: no data, which counts as idle.
    ``waiting`` are the training instances whose queue holds jobs: each gets the idle period plus the start
    grace from its start to boot and take one.
    """
    idle_period = timedelta(minutes=settings.idle_minutes)
    to_stop: list[str] = []
    spared: dict[str, str] = {}
    for instance in instances:
        instance_id = str(instance["InstanceId"])
        up_for = now - instance["LaunchTime"]  # LaunchTime is the latest start of a stopped-and-started box
        if up_for < idle_period:
            spared[instance_id] = (
                f"up for {_minutes(up_for)}, less than the idle period of {_minutes(idle_period)}"
            )
            continue
        peak = peaks.get(instance_id)
        if peak is not None and peak >= settings.threshold_percent:
            spared[instance_id] = (
                f"busy: utilisation reached {peak:g}% (threshold {settings.threshold_percent:g}%) "
                f"in the last {_minutes(idle_period)}"
            )
            continue
        heartbeat = (busy or {}).get(instance_id)
        if heartbeat is not None and heartbeat >= 1:
            metric = settings.busy_metric
            spared[instance_id] = (
                f"busy: a job ran or someone was logged in ({metric.namespace} {metric.name}) "
                f"in the last {_minutes(idle_period)}"
            )
            continue
        if instance_id in waiting and up_for < settings.start_allowance:
            spared[instance_id] = (
                f"training jobs wait on its queue: up for {_minutes(up_for)}, less than the idle period plus "
                f"the start grace ({_minutes(settings.start_allowance)}) to boot and take one"
            )
            continue
        to_stop.append(instance_id)
    return to_stop, spared


def took_no_work(cloudwatch: Any, instance: Mapping[str, Any], settings: Settings) -> str | None:
    """Why a stopped training instance is not started for queued jobs, or None to start it.

    Held back: its last run lasted at least the start allowance and sent no busy heartbeat at all, so it
    sat with jobs waiting without taking one (the idle rules stop a healthy idle box sooner).
    """
    launched = instance.get("LaunchTime")  # the start of its last run
    ended = stopped_at(instance)
    if not isinstance(launched, datetime) or ended is None or ended <= launched:
        return None
    ran = ended - launched
    if ran < settings.start_allowance:
        return None
    instance_id = str(instance["InstanceId"])
    start = max(launched, ended - LAST_RUN_LOOKBACK)
    heartbeat = peak_utilisation(cloudwatch, [instance_id], [settings.busy_metric], start=start, end=ended)
    peak = heartbeat.get(instance_id)
    if peak is not None and peak >= 1:
        return None
    return (
        f"its last run ({_minutes(ran)}, stopped {ended:%Y-%m-%d %H:%M} UTC) sent no busy heartbeat: it "
        "does not take jobs; fix it, then start it by hand (tessera train submit)"
    )


def start_for_jobs(
    ec2: Any,
    cloudwatch: Any,
    training: Sequence[Mapping[str, Any]],
    settings: Settings,
    *,
    just_stopped: Collection[str] = (),
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Start one stopped training instance for waiting jobs, unless one is up already.

    Returns ``(started, not_started, failed)``: the instance started, why the others were not, and the
    refused starts (the next stopped instance is tried after a refusal).
    """
    not_started: dict[str, str] = {}
    failed: dict[str, str] = {}
    up = [i for i in training if i["State"]["Name"] in UP_STATES and str(i["InstanceId"]) not in just_stopped]
    if up:
        for instance in training:
            not_started[str(instance["InstanceId"])] = f"{up[0]['InstanceId']} is up: it takes the jobs"
        return [], not_started, failed
    for instance in training:
        instance_id = str(instance["InstanceId"])
        state = str(instance["State"]["Name"])
        if instance_id in just_stopped:
            not_started[instance_id] = "stopped by this run: it did not take the jobs waiting on its queue"
            continue
        if state != "stopped":
            not_started[instance_id] = f"{state}: the next run starts it once it has stopped"
            continue
        reason = took_no_work(cloudwatch, instance, settings)
        if reason is not None:
            not_started[instance_id] = reason
            log.warning("not starting %s for the waiting jobs: %s", instance_id, reason)
            continue
        try:
            ec2.start_instances(InstanceIds=[instance_id])
        except Exception as exc:
            # Capacity may be short for this one's type or zone: try the next.
            failed[instance_id] = f"StartInstances: {type(exc).__name__}: {exc}"
            log.error("could not start %s for the waiting jobs: %s", instance_id, exc)
            continue
        log.info("started %s: training jobs wait on its queue", instance_id)
        return [instance_id], not_started, failed
    return [], not_started, failed


def check_instances(
    ec2: Any, cloudwatch: Any, settings: Settings, now: datetime, sqs: Any = None
) -> dict[str, Any]:
    """Find, judge and stop idle auto-stop instances, and start a training instance for waiting jobs.

    Returns ``{checked, stopped, spared, failed, queued, started, not_started}``; ``sqs`` is needed when
    ``settings`` names job queues.
    """
    queued: dict[str, int | str] = {}
    training: list[dict[str, Any]] = []
    if settings.job_queue_urls and settings.training_stack:
        if sqs is None:
            raise ValueError("check_instances needs an SQS client to read the job queues")
        queued = queued_jobs(sqs, settings.job_queue_urls)
        training = training_instances(ec2, settings.training_stack)
    jobs = sum(n for n in queued.values() if isinstance(n, int))
    waiting = {str(i["InstanceId"]) for i in training} if jobs else set()
    instances = running_auto_stop_instances(ec2, settings.training_stack)
    ids = [str(i["InstanceId"]) for i in instances]
    peaks: dict[str, float | None] = {}
    busy: dict[str, float | None] = {}
    if ids:
        start = now - timedelta(minutes=settings.idle_minutes)
        peaks = peak_utilisation(cloudwatch, ids, settings.metrics, start=start, end=now)
        busy = peak_utilisation(cloudwatch, ids, [settings.busy_metric], start=start, end=now)
    to_stop, spared = decide(instances, peaks, settings, now, busy, waiting=waiting)
    stopped: list[str] = []
    failed: dict[str, str] = {}
    for instance_id in to_stop:
        peak = peaks.get(instance_id)
        why = (
            "no utilisation data" if peak is None else f"peak utilisation {peak:g}%"
        ) + ", no busy heartbeat"
        if instance_id in waiting:
            why += f" while {jobs} training job(s) waited on its queue: it does not take them"
        try:
            # One call per instance: a refusal for one box must not keep the others running.
            ec2.stop_instances(InstanceIds=[instance_id])
        except Exception as exc:
            failed[instance_id] = f"{type(exc).__name__}: {exc}"
            log.error("could not stop %s (%s): %s", instance_id, why, exc)
            continue
        log.info("stopped %s: %s over the last %g minutes", instance_id, why, settings.idle_minutes)
        stopped.append(instance_id)
    for instance_id, reason in spared.items():
        log.info("spared %s: %s", instance_id, reason)
    started: list[str] = []
    not_started: dict[str, str] = {}
    if jobs:
        started, not_started, refused = start_for_jobs(
            ec2, cloudwatch, training, settings, just_stopped=stopped
        )
        failed.update(refused)
        if not training:
            log.warning(
                "%d training job(s) wait, but stack %s has no training instance to start",
                jobs,
                settings.training_stack,
            )
    return {
        "checked": len(instances),
        "stopped": stopped,
        "spared": spared,
        "failed": failed,
        "queued": queued,
        "started": started,
        "not_started": not_started,
    }


def handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """The Lambda entry point (``autostop.handler.handler``); the event (a schedule tick) is not read."""
    del event, context
    logging.getLogger().setLevel(logging.INFO)
    settings = Settings.from_environment(os.environ)
    if not settings.training_stack:
        # Its role may stop only its stack's boxes: without the stack every stop would be refused, quietly.
        raise ValueError(
            f"{TRAINING_STACK_ENV} must name the stack whose instances this function looks after "
            "(infra/autostop.py sets it)"
        )
    sqs = boto3.client("sqs") if settings.job_queue_urls else None
    summary = check_instances(
        boto3.client("ec2"), boto3.client("cloudwatch"), settings, now=datetime.now(UTC), sqs=sqs
    )
    log.info("auto-stop: %s", json.dumps(summary, sort_keys=True))
    return summary
