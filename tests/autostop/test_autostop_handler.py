"""The safety net: idle (or silent) auto-stop instances are stopped; busy, young and untagged ones are not."""

from __future__ import annotations

import ast
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from services.autostop import handler as autostop
from services.autostop.handler import Metric, Settings, check_instances

AMI = "ami-0123456789abcdef0"
AUTO_STOP = {"tessera:auto-stop": "true"}
NVIDIA = ("CWAgent", "nvidia_smi_utilization_gpu")
GAUDI = ("tessera/Accelerators", "AcceleratorUtilization")
BUSY = ("tessera/Training", "Busy")


@pytest.fixture
def aws(mocked_aws: boto3.Session) -> tuple[Any, Any]:
    """Moto's EC2 and CloudWatch."""
    return mocked_aws.client("ec2"), mocked_aws.client("cloudwatch")


def _launch(ec2: Any, tags: dict[str, str]) -> tuple[str, datetime]:
    spec = [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
    instance = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, TagSpecifications=spec or None)
    return str(instance["Instances"][0]["InstanceId"]), instance["Instances"][0]["LaunchTime"]


def _utilisation(
    cloudwatch: Any, instance_id: str, at: datetime, values: list[float], metric: tuple[str, str] = NVIDIA
) -> None:
    """One datapoint a minute, the last one at ``at``."""
    namespace, name = metric
    cloudwatch.put_metric_data(
        Namespace=namespace,
        MetricData=[
            {
                "MetricName": name,
                "Dimensions": [{"Name": "InstanceId", "Value": instance_id}],
                "Timestamp": at - timedelta(minutes=len(values) - 1 - i),
                "Value": value,
                "Unit": "Percent",
            }
            for i, value in enumerate(values)
        ],
    )


def _busy(cloudwatch: Any, instance_id: str, at: datetime) -> None:
    """One busy heartbeat (a job running, data staging, or a login) at ``at``."""
    _utilisation(cloudwatch, instance_id, at, [1.0], metric=BUSY)


def _state(ec2: Any, instance_id: str) -> str:
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservations[0]["Instances"][0]["State"]["Name"])


def test_idle_and_silent_instances_are_stopped_busy_and_untagged_ones_are_not(aws: tuple[Any, Any]) -> None:
    ec2, cloudwatch = aws
    idle, launched = _launch(ec2, AUTO_STOP)
    busy, _ = _launch(ec2, AUTO_STOP)
    silent, _ = _launch(ec2, AUTO_STOP)  # its agent died: no datapoints at all
    untagged, _ = _launch(ec2, {"tessera:role": "worker"})
    opted_out, _ = _launch(ec2, {"tessera:auto-stop": "false"})
    gaudi, _ = _launch(ec2, {**AUTO_STOP, "tessera:accelerator": "gaudi"})
    parked, _ = _launch(ec2, AUTO_STOP)
    ec2.stop_instances(InstanceIds=[parked])  # already stopped: nothing to check
    now = launched + timedelta(minutes=40)  # every box has been up long past the idle period
    low = [1.0, 0.0, 3.0, 4.9, 2.0]
    _utilisation(cloudwatch, idle, now - timedelta(minutes=1), low * 3)
    _utilisation(cloudwatch, idle, now - timedelta(minutes=20), [100.0])  # busy once, before the window
    _utilisation(cloudwatch, busy, now - timedelta(minutes=1), [*low, 80.0, *low])
    for quiet in (untagged, opted_out):
        _utilisation(cloudwatch, quiet, now - timedelta(minutes=1), low)
    _utilisation(cloudwatch, gaudi, now - timedelta(minutes=2), [0.0, 60.0], metric=GAUDI)

    summary = check_instances(ec2, cloudwatch, Settings(), now=now)

    assert summary["checked"] == 4
    assert parked not in summary["stopped"] and parked not in summary["spared"]
    assert sorted(summary["stopped"]) == sorted([idle, silent])
    assert set(summary["spared"]) == {busy, gaudi}
    assert "80%" in summary["spared"][busy] and "busy" in summary["spared"][busy]
    assert summary["failed"] == {}
    assert {_state(ec2, i) for i in (idle, silent)} <= {"stopping", "stopped"}
    assert {_state(ec2, i) for i in (busy, untagged, opted_out, gaudi)} == {"running"}


def test_a_busy_heartbeat_spares_a_box_whose_accelerators_idle(aws: tuple[Any, Any]) -> None:
    ec2, cloudwatch = aws
    staging, launched = _launch(ec2, AUTO_STOP)  # fetching its dataset: accelerators idle, job running
    on_cpu, _ = _launch(ec2, AUTO_STOP)  # training on its CPU: no accelerator metric at all
    debugged, _ = _launch(ec2, AUTO_STOP)  # someone logged in over SSH, nothing running
    was_busy, _ = _launch(ec2, AUTO_STOP)  # its last heartbeat is older than the idle period
    dead, _ = _launch(ec2, AUTO_STOP)  # its agents and trainer died: it publishes nothing
    now = launched + timedelta(hours=1)
    low = [0.0, 1.0, 0.0, 2.0, 0.0] * 3
    for box in (staging, debugged, was_busy):
        _utilisation(cloudwatch, box, now - timedelta(minutes=1), low)
    _busy(cloudwatch, staging, now - timedelta(minutes=3))
    _busy(cloudwatch, on_cpu, now - timedelta(minutes=14))
    _busy(cloudwatch, debugged, now - timedelta(minutes=8))
    _busy(cloudwatch, was_busy, now - timedelta(minutes=16))

    summary = check_instances(ec2, cloudwatch, Settings(idle_minutes=15), now=now)

    assert set(summary["spared"]) == {staging, on_cpu, debugged}
    for box in (staging, on_cpu, debugged):
        assert "tessera/Training Busy" in summary["spared"][box]
    assert sorted(summary["stopped"]) == sorted([was_busy, dead])
    assert {_state(ec2, i) for i in (was_busy, dead)} <= {"stopping", "stopped"}
    assert {_state(ec2, i) for i in (staging, on_cpu, debugged)} == {"running"}


def test_instances_up_for_less_than_the_idle_period_are_spared(aws: tuple[Any, Any]) -> None:
    ec2, cloudwatch = aws
    young, launched = _launch(ec2, AUTO_STOP)  # booting: no metrics yet
    summary = check_instances(
        ec2, cloudwatch, Settings(idle_minutes=15), now=launched + timedelta(minutes=14)
    )
    assert summary["stopped"] == []
    assert "up for 14 min" in summary["spared"][young]
    later = check_instances(ec2, cloudwatch, Settings(idle_minutes=15), now=launched + timedelta(minutes=16))
    assert later["stopped"] == [young]


def test_the_threshold_and_idle_period_come_from_the_settings(aws: tuple[Any, Any]) -> None:
    ec2, cloudwatch = aws
    box, launched = _launch(ec2, AUTO_STOP)
    now = launched + timedelta(hours=2)
    _utilisation(cloudwatch, box, now - timedelta(minutes=1), [12.0, 8.0])
    _utilisation(cloudwatch, box, now - timedelta(minutes=40), [90.0])
    assert check_instances(ec2, cloudwatch, Settings(threshold_percent=10), now=now)["stopped"] == []
    summary = check_instances(ec2, cloudwatch, Settings(threshold_percent=15, idle_minutes=30), now=now)
    assert summary["stopped"] == [box]
    ec2.start_instances(InstanceIds=[box])
    long_window = check_instances(ec2, cloudwatch, Settings(threshold_percent=15, idle_minutes=60), now=now)
    assert long_window["stopped"] == [] and "90%" in long_window["spared"][box]


def test_a_refused_stop_is_reported_and_the_others_are_still_stopped(aws: tuple[Any, Any]) -> None:
    ec2, cloudwatch = aws
    refused, launched = _launch(ec2, AUTO_STOP)
    other, _ = _launch(ec2, AUTO_STOP)

    class Refusing:
        def __getattr__(self, name: str) -> Any:
            return getattr(ec2, name)

        def stop_instances(self, InstanceIds: list[str]) -> Any:  # noqa: N803 (boto3's keyword)
            if refused in InstanceIds:
                raise PermissionError("UnauthorizedOperation")
            return ec2.stop_instances(InstanceIds=InstanceIds)

    summary = check_instances(Refusing(), cloudwatch, Settings(), now=launched + timedelta(hours=1))
    assert summary["stopped"] == [other]
    assert "UnauthorizedOperation" in summary["failed"][refused]
    assert _state(ec2, refused) == "running"


def test_handler_reads_its_settings_from_the_environment(
    aws: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ec2, _ = aws
    young, _ = _launch(ec2, {**AUTO_STOP, "tessera:stack": "dev"})
    _launch(ec2, {**AUTO_STOP, "tessera:stack": "prod-compute"})  # another stack's: not this function's
    monkeypatch.setenv("TESSERA_AUTOSTOP_IDLE_MINUTES", "15")
    with pytest.raises(ValueError, match="TESSERA_AUTOSTOP_TRAINING_STACK must name the stack"):
        autostop.handler({"source": "aws.events"}, None)  # its role could stop nothing: an error, alarmed
    monkeypatch.setenv("TESSERA_AUTOSTOP_TRAINING_STACK", "dev")
    summary = autostop.handler({"source": "aws.events"}, None)
    assert summary["checked"] == 1 and summary["stopped"] == [] and young in summary["spared"]
    assert json.loads(json.dumps(summary)) == summary  # a Lambda result must be JSON


def test_settings_from_the_environment() -> None:
    assert Settings.from_environment({}) == Settings()
    settings = Settings.from_environment(
        {
            "TESSERA_AUTOSTOP_IDLE_MINUTES": "30",
            "TESSERA_AUTOSTOP_THRESHOLD_PERCENT": "2.5",
            "TESSERA_AUTOSTOP_METRICS": json.dumps([{"namespace": "tessera/Accelerators", "metric": "X"}]),
        }
    )
    assert settings == Settings(30, 2.5, (Metric("tessera/Accelerators", "X"),))
    assert Settings().busy_metric == Metric(*BUSY)
    custom = Settings.from_environment(
        {"TESSERA_AUTOSTOP_BUSY_METRIC": json.dumps({"namespace": "tessera/Other", "metric": "Working"})}
    )
    assert custom.busy_metric == Metric("tessera/Other", "Working")
    for env, match in [
        ({"TESSERA_AUTOSTOP_IDLE_MINUTES": "soon"}, "TESSERA_AUTOSTOP_IDLE_MINUTES"),
        ({"TESSERA_AUTOSTOP_IDLE_MINUTES": "0"}, "TESSERA_AUTOSTOP_IDLE_MINUTES"),
        ({"TESSERA_AUTOSTOP_THRESHOLD_PERCENT": "150"}, "TESSERA_AUTOSTOP_THRESHOLD_PERCENT"),
        ({"TESSERA_AUTOSTOP_METRICS": '[{"namespace": "CWAgent"}]'}, "TESSERA_AUTOSTOP_METRICS"),
        ({"TESSERA_AUTOSTOP_METRICS": "[]"}, "TESSERA_AUTOSTOP_METRICS"),
        ({"TESSERA_AUTOSTOP_BUSY_METRIC": '{"metric": "Busy"}'}, "TESSERA_AUTOSTOP_BUSY_METRIC"),
    ]:
        with pytest.raises(ValueError, match=match):
            Settings.from_environment(env)


def test_metric_queries_are_batched_and_paged() -> None:
    class Recording:
        def __init__(self) -> None:
            self.calls: list[dict[str, Any]] = []

        def get_metric_data(self, **request: Any) -> dict[str, Any]:
            self.calls.append(request)
            queries = request["MetricDataQueries"]
            if "NextToken" not in request:  # first page: no values, more to come
                return {
                    "MetricDataResults": [{"Id": q["Id"], "Values": []} for q in queries],
                    "NextToken": "p2",
                }
            return {"MetricDataResults": [{"Id": q["Id"], "Values": [float(len(q["Id"]))]} for q in queries]}

    ids = [f"i-{n:04d}" for n in range(260)]
    cloudwatch = Recording()
    end = datetime(2027, 1, 1, tzinfo=UTC)
    peaks = autostop.peak_utilisation(
        cloudwatch, ids, [Metric(*NVIDIA), Metric(*GAUDI)], start=end - timedelta(minutes=15), end=end
    )
    sizes = [len(call["MetricDataQueries"]) for call in cloudwatch.calls]
    assert sizes == [500, 500, 20, 20]  # 520 queries: two requests of two pages each
    assert all(
        len(q["Id"]) >= 4 and q["Id"][0].islower() for c in cloudwatch.calls for q in c["MetricDataQueries"]
    )
    assert set(peaks) == set(ids) and all(p is not None for p in peaks.values())


def test_the_function_needs_only_the_standard_library_and_boto3() -> None:
    # Lambda gets this directory alone: importing anything else from the project would fail there.
    import sys

    directory = Path(autostop.__file__).parent
    for source in directory.glob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{source.name}: relative import"
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                assert top == "boto3" or top in sys.stdlib_module_names, f"{source.name} imports {name}"


# --- starting the training instance for queued jobs ---------------------------------------------------------

STACK = "dev"
TRAINING = {
    **AUTO_STOP,
    "tessera:role": "training",
    "tessera:start-on-demand": "true",
    "tessera:stack": STACK,
}


@pytest.fixture
def jobs(mocked_aws: boto3.Session) -> tuple[Any, str]:
    """Moto's SQS and an empty training-jobs queue's URL."""
    sqs = mocked_aws.client("sqs")
    return sqs, str(sqs.create_queue(QueueName="tessera-dev-training-jobs")["QueueUrl"])


def _queued(url: str) -> Settings:
    return Settings(job_queue_urls=(url,), training_stack=STACK)


def test_a_queued_job_starts_the_stopped_training_instance(
    aws: tuple[Any, Any], jobs: tuple[Any, str]
) -> None:
    ec2, cloudwatch = aws
    sqs, url = jobs
    box, launched = _launch(ec2, TRAINING)
    ec2.stop_instances(InstanceIds=[box])
    now = launched + timedelta(hours=3)

    quiet = check_instances(ec2, cloudwatch, _queued(url), now=now, sqs=sqs)
    assert quiet["started"] == [] and quiet["queued"] == {url: 0}
    assert _state(ec2, box) == "stopped"

    sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"task": "detector"}))  # the catalog's refresher
    summary = check_instances(ec2, cloudwatch, _queued(url), now=now, sqs=sqs)
    assert summary["started"] == [box] and summary["queued"] == {url: 1} and summary["failed"] == {}
    assert _state(ec2, box) in ("pending", "running")
    assert json.loads(json.dumps(summary)) == summary

    # Up now: the next run, minutes later, starts nothing more (EC2 sets LaunchTime at each start; moto keeps
    # the first, so "minutes later" is counted from that).
    later = launched + timedelta(minutes=5)
    again = check_instances(ec2, cloudwatch, _queued(url), now=later, sqs=sqs)
    assert again["started"] == [] and "is up" in again["not_started"][box]


def test_only_this_stacks_training_instance_is_started(aws: tuple[Any, Any], jobs: tuple[Any, str]) -> None:
    ec2, cloudwatch = aws
    sqs, url = jobs
    others = [
        _launch(ec2, {**AUTO_STOP, "tessera:stack": STACK})[0],  # no training role
        _launch(ec2, {**TRAINING, "tessera:role": "worker"})[0],
        _launch(ec2, {**TRAINING, "tessera:start-on-demand": "false"})[0],
        _launch(ec2, {**TRAINING, "tessera:stack": "prod-compute"})[0],  # another stack's box and queue
    ]
    ec2.stop_instances(InstanceIds=others)
    sqs.send_message(QueueUrl=url, MessageBody="{}")
    summary = check_instances(ec2, cloudwatch, _queued(url), now=datetime.now(UTC), sqs=sqs)
    assert summary["started"] == [] and summary["not_started"] == {}
    assert {_state(ec2, i) for i in others} == {"stopped"}
    # Without queues the function starts nothing and needs no SQS client.
    unqueued = check_instances(ec2, cloudwatch, Settings(), now=datetime.now(UTC))
    assert unqueued["started"] == [] and unqueued["queued"] == {}


def test_another_stacks_idle_box_is_left_to_that_stacks_function(aws: tuple[Any, Any]) -> None:
    ec2, cloudwatch = aws
    ours, launched = _launch(ec2, {**AUTO_STOP, "tessera:stack": STACK})
    theirs, _ = _launch(ec2, {**AUTO_STOP, "tessera:stack": "prod-compute"})  # its own idle period, its queue
    later = launched + timedelta(minutes=40)  # both silent all along: idle by this stack's rule

    report = check_instances(ec2, cloudwatch, Settings(idle_minutes=15, training_stack=STACK), now=later)
    assert report["stopped"] == [ours]
    assert report["checked"] == 1  # the other stack's box is not even looked at
    assert _state(ec2, theirs) == "running"


def test_a_training_instance_with_jobs_waiting_gets_time_to_boot_and_take_one(
    aws: tuple[Any, Any], jobs: tuple[Any, str]
) -> None:
    ec2, cloudwatch = aws
    sqs, url = jobs
    box, launched = _launch(ec2, TRAINING)  # just started, still pulling its image: publishes nothing yet
    worker, _ = _launch(ec2, {**AUTO_STOP, "tessera:stack": STACK})  # not a training box: not spared
    sqs.send_message(QueueUrl=url, MessageBody="{}")
    settings = Settings(idle_minutes=15, start_grace_minutes=15, job_queue_urls=(url,), training_stack=STACK)

    booting = check_instances(ec2, cloudwatch, settings, now=launched + timedelta(minutes=25), sqs=sqs)
    assert booting["stopped"] == [worker]
    assert "training jobs wait on its queue" in booting["spared"][box]
    assert "30 min" in booting["spared"][box]
    assert _state(ec2, box) == "running"

    # Without the job the idle rule stops it as before.
    idle = check_instances(
        ec2, cloudwatch, Settings(idle_minutes=15), now=launched + timedelta(minutes=25), sqs=sqs
    )
    assert idle["stopped"] == [box]


def test_a_box_that_never_takes_the_waiting_jobs_is_stopped_and_not_restarted(
    aws: tuple[Any, Any], jobs: tuple[Any, str]
) -> None:
    ec2, cloudwatch = aws
    sqs, url = jobs
    box, launched = _launch(ec2, TRAINING)  # its trainer died: the job stays visible
    sqs.send_message(QueueUrl=url, MessageBody="{}")
    settings = _queued(url)
    summary = check_instances(ec2, cloudwatch, settings, now=launched + timedelta(minutes=31), sqs=sqs)
    assert summary["stopped"] == [box] and summary["started"] == []
    assert "stopped by this run" in summary["not_started"][box]

    # Its last run: 31 minutes, no busy heartbeat. It is held back rather than restarted all day.
    stopped = dict(ec2.describe_instances(InstanceIds=[box])["Reservations"][0]["Instances"][0])
    ended = launched + timedelta(minutes=31)
    stopped["StateTransitionReason"] = f"User initiated ({ended:%Y-%m-%d %H:%M:%S} GMT)"
    reason = autostop.took_no_work(cloudwatch, stopped, settings)
    assert reason is not None and "no busy heartbeat" in reason and "31 min" in reason
    # A run that took a job (one heartbeat), or a short one, does not hold it back.
    assert (
        autostop.took_no_work(cloudwatch, {**stopped, "LaunchTime": ended - timedelta(minutes=10)}, settings)
        is None
    )
    _busy(cloudwatch, box, launched + timedelta(minutes=5))
    assert autostop.took_no_work(cloudwatch, stopped, settings) is None
    assert autostop.took_no_work(cloudwatch, {**stopped, "StateTransitionReason": ""}, settings) is None


def test_a_held_back_or_refused_start_tries_the_next_box(aws: tuple[Any, Any], jobs: tuple[Any, str]) -> None:
    ec2, cloudwatch = aws
    sqs, url = jobs
    first, launched = _launch(ec2, TRAINING)
    second, _ = _launch(ec2, TRAINING)
    ec2.stop_instances(InstanceIds=[first, second])
    sqs.send_message(QueueUrl=url, MessageBody="{}")
    refused = min(first, second)

    class Refusing:
        def __getattr__(self, name: str) -> Any:
            return getattr(ec2, name)

        def start_instances(self, InstanceIds: list[str]) -> Any:  # noqa: N803 (boto3's keyword)
            if refused in InstanceIds:
                raise RuntimeError("InsufficientInstanceCapacity")
            return ec2.start_instances(InstanceIds=InstanceIds)

    summary = check_instances(
        Refusing(), cloudwatch, _queued(url), now=launched + timedelta(hours=1), sqs=sqs
    )
    assert summary["started"] == [max(first, second)]
    assert "InsufficientInstanceCapacity" in summary["failed"][refused]


def test_an_unreadable_queue_starts_nothing_and_stops_as_before(aws: tuple[Any, Any]) -> None:
    ec2, cloudwatch = aws
    box, launched = _launch(ec2, TRAINING)

    class Denied:
        def get_queue_attributes(self, **_: Any) -> Any:
            raise PermissionError("AccessDenied")

    summary = check_instances(
        ec2, cloudwatch, _queued("https://sqs/q"), now=launched + timedelta(minutes=20), sqs=Denied()
    )
    assert summary["stopped"] == [box] and summary["started"] == []
    assert "AccessDenied" in str(summary["queued"]["https://sqs/q"])


def test_handler_reads_the_queues_from_the_environment(
    aws: tuple[Any, Any], jobs: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ec2, _ = aws
    sqs, url = jobs
    box, _ = _launch(ec2, TRAINING)
    ec2.stop_instances(InstanceIds=[box])
    sqs.send_message(QueueUrl=url, MessageBody="{}")
    monkeypatch.setenv("TESSERA_AUTOSTOP_JOB_QUEUE_URLS", json.dumps([url]))
    monkeypatch.setenv("TESSERA_AUTOSTOP_TRAINING_STACK", STACK)
    summary = autostop.handler({"source": "aws.events"}, None)
    assert summary["started"] == [box] and summary["queued"] == {url: 1}


def test_queue_settings_from_the_environment() -> None:
    settings = Settings.from_environment(
        {
            "TESSERA_AUTOSTOP_JOB_QUEUE_URLS": json.dumps(["https://sqs/a"]),
            "TESSERA_AUTOSTOP_TRAINING_STACK": "prod-compute",
            "TESSERA_AUTOSTOP_START_GRACE_MINUTES": "20",
        }
    )
    assert settings.job_queue_urls == ("https://sqs/a",) and settings.training_stack == "prod-compute"
    assert settings.start_allowance == timedelta(minutes=35)
    for env, match in [
        ({"TESSERA_AUTOSTOP_JOB_QUEUE_URLS": '"https://sqs/a"'}, "TESSERA_AUTOSTOP_JOB_QUEUE_URLS"),
        ({"TESSERA_AUTOSTOP_JOB_QUEUE_URLS": '["https://sqs/a"]'}, "TESSERA_AUTOSTOP_TRAINING_STACK"),
        ({"TESSERA_AUTOSTOP_START_GRACE_MINUTES": "-1"}, "TESSERA_AUTOSTOP_START_GRACE_MINUTES"),
    ]:
        with pytest.raises(ValueError, match=match):
            Settings.from_environment(env)
