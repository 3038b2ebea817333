"""The busy heartbeat: the trainer sends it from a job's start (data staging included) and every minute
while the job runs, the idle agent sends it while someone is logged in, and a box idle by every signal sends
nothing, so that the idle alarm and the safety net (which see only CloudWatch) stop it and only it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from fake_clock import MINUTE, T0, FakeClock

from services.cloud.database import apply_migrations, connect
from services.cloud.queue import Message
from services.trainer import handler, idle, loop
from services.trainer.idle import BusyHeartbeat, IdleAgent, Probes

BOX = "i-0123456789abcdef0"


@pytest.fixture
def cloudwatch(mocked_aws: boto3.Session) -> Any:
    return mocked_aws.client("cloudwatch")


def _heartbeats(cloudwatch: Any, instance_id: str = BOX) -> int:
    """How many busy heartbeats CloudWatch received for ``instance_id``."""
    now = datetime.now(UTC)
    points = cloudwatch.get_metric_statistics(
        Namespace=idle.BUSY_NAMESPACE,
        MetricName=idle.BUSY_METRIC,
        Dimensions=[{"Name": "InstanceId", "Value": instance_id}],
        StartTime=now - timedelta(hours=1),
        EndTime=now + timedelta(hours=1),
        Period=60,
        Statistics=["SampleCount", "Maximum"],
    )["Datapoints"]
    assert all(p["Maximum"] == 1.0 for p in points)
    return int(sum(p["SampleCount"] for p in points))


def test_a_heartbeat_goes_out_at_most_once_a_minute_and_a_failure_never_raises(cloudwatch: Any) -> None:
    clock = FakeClock()
    beat = BusyHeartbeat(lambda: BOX, lambda: cloudwatch, clock=clock)
    assert beat.publish() is True
    assert beat.publish() is False  # the same minute
    clock.sleep(30)
    assert beat.publish() is False
    clock.sleep(25)
    assert beat.publish() is True
    assert _heartbeats(cloudwatch) == 2

    class Refusing:
        def put_metric_data(self, **kwargs: Any) -> None:
            raise PermissionError("AccessDenied: cloudwatch:PutMetricData")

    broken = BusyHeartbeat(lambda: BOX, Refusing, clock=clock)
    assert broken.publish() is False  # logged, not raised: a heartbeat must never break training


def test_the_agent_sends_the_heartbeat_while_someone_is_logged_in_and_still_stops_an_idle_box(
    cloudwatch: Any,
) -> None:
    clock = FakeClock()
    logged_in = {T0 + m * MINUTE for m in range(3)}  # an SSH session during minutes 0, 1 and 2
    stops: list[float] = []

    def stop() -> str:
        stops.append(clock.now)
        return "stopped"

    agent = IdleAgent(
        Probes(queued=lambda: 0, trainer=lambda: None, sessions=lambda: int(clock.now in logged_in)),
        stop,
        idle_period_s=5 * MINUTE,
        clock=clock,
        heartbeat=BusyHeartbeat(lambda: BOX, lambda: cloudwatch, clock=clock),
    )
    assert agent.run(interval_s=MINUTE, sleep=clock.sleep, max_checks=20) == "stopped"
    # One heartbeat per logged-in minute, none after: the alarm and the safety net see the box go idle.
    assert _heartbeats(cloudwatch) == 3
    # Idle by every signal from minute 3: the agent stops the box itself five minutes later.
    assert stops == [T0 + 8 * MINUTE]


def test_a_box_idle_by_every_signal_sends_no_heartbeat(cloudwatch: Any) -> None:
    clock = FakeClock()
    agent = IdleAgent(
        Probes(queued=lambda: 0, trainer=lambda: None, sessions=lambda: 0),
        lambda: "stopped",
        idle_period_s=5 * MINUTE,
        clock=clock,
        heartbeat=BusyHeartbeat(lambda: BOX, lambda: cloudwatch, clock=clock),
    )
    assert agent.run(interval_s=MINUTE, sleep=clock.sleep, max_checks=10) == "stopped"
    assert clock.now == T0 + 5 * MINUTE
    assert _heartbeats(cloudwatch) == 0


def test_the_agent_on_the_box_sends_its_heartbeat_for_its_own_instance(
    cloudwatch: Any, mocked_aws: boto3.Session, tmp_path: Path
) -> None:
    sqs = mocked_aws.client("sqs")
    url = sqs.create_queue(QueueName="training-jobs")["QueueUrl"]
    agent = idle.agent_from_environment(
        {
            "TESSERA_QUEUE_TRAINING_JOBS_URL": url,
            "TESSERA_TRAINER_STATE": str(tmp_path / "state.json"),
            "TESSERA_INSTANCE_ID": BOX,
        },
        sqs=sqs,
        cloudwatch=cloudwatch,
    )
    assert agent.heartbeat is not None and agent.heartbeat.publish()
    assert _heartbeats(cloudwatch) == 1


def test_the_trainer_beats_every_minute_while_a_job_runs_and_not_after(
    cloudwatch: Any, tmp_path: Path
) -> None:
    clock = FakeClock()
    state = handler.TrainerStateFile(
        tmp_path / "state.json", heartbeat=BusyHeartbeat(lambda: BOX, lambda: cloudwatch, clock=clock)
    )
    state.beat()  # no job: nothing
    assert _heartbeats(cloudwatch) == 0
    state.start("ships-1")
    for _ in range(6):  # the visibility heartbeat beats every 30 s for three minutes
        clock.sleep(30)
        state.beat()
    assert _heartbeats(cloudwatch) == 4  # at the start, then once a minute
    state.clear()
    clock.sleep(5 * MINUTE)
    state.beat()
    assert _heartbeats(cloudwatch) == 4


def test_on_a_training_box_the_trainer_heartbeat_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TESSERA_INSTANCE_ID", raising=False)
    assert handler.TrainerStateFile(tmp_path / "s.json").heartbeat is None  # a laptop, CI: no metric
    monkeypatch.setenv("TESSERA_INSTANCE_ID", BOX)
    assert handler.TrainerStateFile(tmp_path / "s.json").heartbeat is not None


def test_the_heartbeat_starts_before_the_job_stages_its_dataset(
    cloudwatch: Any, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = handler.TrainerStateFile(
        tmp_path / "state.json", heartbeat=BusyHeartbeat(lambda: BOX, lambda: cloudwatch)
    )
    seen_at_staging: list[int] = []

    def staging_run(task: Any, job: Any, *args: Any, **kwargs: Any) -> loop.RunResult:
        # loop.run fetches the dataset first: by now the box must already say it is busy.
        seen_at_staging.append(_heartbeats(cloudwatch))
        return loop.RunResult(job_id=job.job_id, steps=1, epochs=1, history=[], metrics={})

    monkeypatch.setattr(loop, "run", staging_run)
    body = {
        "job_id": "staged-1",
        "task": "detector",
        "dataset": "s3://datasets/ships/",
        "output": str(tmp_path / "out"),
        "steps": 1,
    }
    with connect(database_url) as conn:
        apply_migrations(conn)
        ctx = handler.Context(conn=conn, worker="w", state=state)
        outcome = handler.handle_job(ctx, Message("q", "m-1", "r-1", json.dumps(body), 1, T0))
    assert outcome.status == "SUCCESS"
    assert seen_at_staging == [1]
