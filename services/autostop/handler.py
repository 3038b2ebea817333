"""The safety net: stop every running instance tagged for auto-stop whose accelerators have been idle.

Runs every few minutes (an EventBridge schedule), independently of the instances themselves, so it catches
a box whose own idle agent, CloudWatch agent or utilisation publisher has died. An instance is stopped when
it carries ``tessera:auto-stop=true``, has been up for at least the idle period, the busiest of its
accelerators stayed below the threshold over the whole idle period, and it sent no busy heartbeat in that
period (``tessera/Training`` ``Busy``: the trainer sends it every minute while a job runs, data staging and
CPU-bound phases included, and the box's idle agent while someone is logged in). No data at all over that
period counts as idle: a healthy box publishes every minute, so silence means something broke, and a broken
box bills just the same.

Settings come from the environment (set by ``infra/autostop.py``):
``TESSERA_AUTOSTOP_IDLE_MINUTES`` (default 15), ``TESSERA_AUTOSTOP_THRESHOLD_PERCENT`` (default 5) and
``TESSERA_AUTOSTOP_METRICS``, a JSON list of ``{"namespace": ..., "metric": ...}`` utilisation metrics that
carry an ``InstanceId`` dimension (default: the CloudWatch agent's NVIDIA metric and the Gaudi/Neuron one),
and ``TESSERA_AUTOSTOP_BUSY_METRIC``, the busy heartbeat as one ``{"namespace": ..., "metric": ...}``
(default ``tessera/Training`` ``Busy``; any value of 1 or more in the period means busy).

Standard library and boto3 only: Lambda's Python runtime provides boto3, and this directory is deployed
on its own.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
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
DEFAULT_IDLE_MINUTES = 15.0
DEFAULT_THRESHOLD_PERCENT = 5.0
PERIOD_S = 60
"""Resolution of the utilisation read (the CloudWatch agent and the publishers report every minute)."""
QUERIES_PER_CALL = 500
"""GetMetricData's limit of metric queries per request."""


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
        return Settings(
            idle_minutes=number(IDLE_MINUTES_ENV, DEFAULT_IDLE_MINUTES),
            threshold_percent=number(THRESHOLD_ENV, DEFAULT_THRESHOLD_PERCENT),
            metrics=metrics,
            busy_metric=busy_metric,
        )


def running_auto_stop_instances(ec2: Any) -> list[dict[str, Any]]:
    """Every running instance tagged ``tessera:auto-stop=true``."""
    filters = [
        {"Name": f"tag:{AUTO_STOP_TAG}", "Values": [AUTO_STOP_VALUE]},
        {"Name": "instance-state-name", "Values": ["running"]},
    ]
    found: list[dict[str, Any]] = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page.get("Reservations", []):
            found.extend(reservation.get("Instances", []))
    return found


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
) -> tuple[list[str], dict[str, str]]:
    """Which instances to stop, and why each of the others is spared.

    ``peaks`` is each instance's highest utilisation over the idle period, ``busy`` its highest busy
    heartbeat (1: a job ran or someone was logged in); None or absent: no data, which counts as idle.
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
        to_stop.append(instance_id)
    return to_stop, spared


def check_instances(ec2: Any, cloudwatch: Any, settings: Settings, now: datetime) -> dict[str, Any]:
    """Find, judge and stop idle auto-stop instances; returns ``{checked, stopped, spared, failed}``."""
    instances = running_auto_stop_instances(ec2)
    ids = [str(i["InstanceId"]) for i in instances]
    peaks: dict[str, float | None] = {}
    busy: dict[str, float | None] = {}
    if ids:
        start = now - timedelta(minutes=settings.idle_minutes)
        peaks = peak_utilisation(cloudwatch, ids, settings.metrics, start=start, end=now)
        busy = peak_utilisation(cloudwatch, ids, [settings.busy_metric], start=start, end=now)
    to_stop, spared = decide(instances, peaks, settings, now, busy)
    stopped: list[str] = []
    failed: dict[str, str] = {}
    for instance_id in to_stop:
        peak = peaks.get(instance_id)
        why = (
            "no utilisation data" if peak is None else f"peak utilisation {peak:g}%"
        ) + ", no busy heartbeat"
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
    return {"checked": len(instances), "stopped": stopped, "spared": spared, "failed": failed}


def handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """The Lambda entry point (``autostop.handler.handler``); the event (a schedule tick) is not read."""
    del event, context
    logging.getLogger().setLevel(logging.INFO)
    settings = Settings.from_environment(os.environ)
    summary = check_instances(
        boto3.client("ec2"), boto3.client("cloudwatch"), settings, now=datetime.now(UTC)
    )
    log.info("auto-stop: %s", json.dumps(summary, sort_keys=True))
    return summary
