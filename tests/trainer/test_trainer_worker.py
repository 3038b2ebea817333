"""The trainer's worker on moto SQS and a real PostgreSQL: bad jobs fail with clear reasons and the worker
keeps serving; a good job trains, registers and leaves its row SUCCESS; the trainer state file the idle agent
reads says busy only while a job runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from services.cloud.database import connect
from services.cloud.embedded import Resources
from services.cloud.queue import receive_messages, send_message
from services.trainer import idle, loop
from services.trainer.worker import Worker, WorkerSettings

TINY = {"batch_size": 2, "crop": 32, "width": 8, "tile": 64, "eval_scenes": 1, "steps_per_epoch": 2}


@pytest.fixture
def training_queue(aws: str) -> str:
    sqs = boto3.client("sqs")
    name = f"training-jobs-{abs(hash(aws)) % 10**8}-{id(object())}"
    return str(sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "30"})["QueueUrl"])


def _rows(database_url: str) -> dict[str, tuple[str, str | None, str | None]]:
    with connect(database_url) as conn:
        rows = conn.execute("SELECT id, status, reason, registered FROM training_jobs").fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_bad_jobs_fail_clearly_and_the_worker_keeps_serving(
    tmp_path: Path,
    training_queue: str,
    resources: Resources,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state_file = tmp_path / "trainer-state.json"
    datasets = resources.buckets["datasets"]
    # Queued jobs read and write local files only under the worker's roots (services/jobs/trust.py).
    monkeypatch.setenv("TESSERA_LOCAL_ROOT", str(tmp_path))
    monkeypatch.setenv("TESSERA_OUTPUT_ROOT", str(tmp_path))
    monkeypatch.setenv("TESSERA_ALLOWED_BUCKETS", ",".join(resources.buckets.values()))
    base = {"task": "detector", "dataset": "synthetic", "steps": 2, "params": TINY}
    jobs: list[Any] = [
        {**base, "job_id": "unknown-task", "task": "poetry", "output": str(tmp_path / "a")},
        {
            **base,
            "job_id": "missing-dataset",
            "dataset": str(tmp_path / "nothing"),
            "output": str(tmp_path / "b"),
        },
        {
            **base,
            "job_id": "empty-dataset",
            "dataset": f"s3://{datasets}/empty/",
            "output": str(tmp_path / "c"),
        },
        {**base, "job_id": "bad-params", "params": {**TINY, "batch_size": 0}, "output": str(tmp_path / "d")},
        {**base, "job_id": "no-length", "steps": None, "output": str(tmp_path / "e")},
        # Whoever can send to the queue writes the job: outside the roots and the buckets it is refused.
        {**base, "job_id": "output-outside", "output": "/etc/tessera-owned"},
        {
            **base,
            "job_id": "foreign-bucket",
            "dataset": "s3://someone-elses-bucket/data/",
            "output": str(tmp_path / "f"),
        },
        {
            **base,
            "job_id": "good",
            "output": f"s3://{resources.buckets['models']}/good",
            "register": {"name": "demo-detector"},
        },
    ]
    for job in jobs:
        send_message(training_queue, {k: v for k, v in job.items() if v is not None})
    send_message(training_queue, {"not": "a job"})

    seen_state: list[dict[str, Any]] = []
    real_run = loop.run

    def watching_run(*args: Any, **kwargs: Any) -> Any:
        seen_state.append(json.loads(state_file.read_text()))
        return real_run(*args, **kwargs)

    monkeypatch.setattr(loop, "run", watching_run)
    worker = Worker(
        WorkerSettings(
            queue_url=training_queue, database_url=database_url, wait_s=0, state_path=str(state_file)
        )
    )
    try:
        handled = 0
        while worker.poll(wait_s=0):
            handled += 1
    finally:
        worker.close()
    assert handled == len(jobs) + 1
    rows = _rows(database_url)
    reasons = {job_id: row[1] or "" for job_id, row in rows.items()}
    assert "unknown task 'poetry'" in reasons["unknown-task"]
    assert "does not exist" in reasons["missing-dataset"]
    assert "holds no files" in reasons["empty-dataset"]
    assert "$.params.batch_size" in reasons["bad-params"]
    assert "$.epochs: give epochs or steps" in reasons["no-length"]
    assert "$.output" in reasons["output-outside"] and "TESSERA_OUTPUT_ROOT" in reasons["output-outside"]
    assert "$.dataset" in reasons["foreign-bucket"] and "someone-elses-bucket" in reasons["foreign-bucket"]
    assert not Path("/etc/tessera-owned").exists()
    invalid = [row for job_id, row in rows.items() if job_id.startswith("message-")]
    assert len(invalid) == 1 and "$.task: required" in (invalid[0][1] or "")
    assert {job_id: row[0] for job_id, row in rows.items() if job_id != "good"} == {
        job_id: "FAILED" for job_id in rows if job_id != "good"
    }
    assert rows["good"] == ("SUCCESS", None, "demo-detector:1")
    # Every message was deleted: nothing comes back.
    sqs = boto3.client("sqs")
    attributes = sqs.get_queue_attributes(QueueUrl=training_queue, AttributeNames=["All"])["Attributes"]
    assert (
        int(attributes["ApproximateNumberOfMessages"])
        + int(attributes["ApproximateNumberOfMessagesNotVisible"])
        == 0
    )
    # The state file said busy with the job that ran while it ran, and not busy once it ended.
    assert [(m["busy"], m["job_id"]) for m in seen_state] == [
        (True, "missing-dataset"),
        (True, "empty-dataset"),
        (True, "bad-params"),
        (True, "good"),
    ]
    final = idle.read_trainer_state(state_file)
    assert final is not None and not final.busy


def test_a_stopped_job_goes_back_to_the_queue_and_resumes(
    tmp_path: Path, training_queue: str, database_url: str, aws: str
) -> None:
    job = {
        "task": "detector",
        "dataset": "synthetic",
        "steps": 4,
        "checkpoint_every": 100,
        "params": TINY,
        "job_id": "stopped",
        "output": str(tmp_path / "out"),
    }
    send_message(training_queue, job)
    worker = Worker(
        WorkerSettings(queue_url=training_queue, database_url=database_url, state_path=str(tmp_path / "b"))
    )
    try:
        worker.stop_event.set()  # as SIGTERM does: the job checkpoints after its first step
        assert worker.poll(wait_s=0)
        assert worker.outcomes[-1].status == "QUEUED" and worker.outcomes[-1].release
        assert _rows(database_url)["stopped"][0] == "QUEUED"
        worker.stop_event.clear()
        assert worker.poll(wait_s=1)
        assert worker.outcomes[-1].status == "SUCCESS"
    finally:
        worker.close()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 4
    # Stopped, then finished: not busy either way.
    state = idle.read_trainer_state(tmp_path / "b")
    assert state is not None and (state.busy, state.job_id) == (False, "stopped")


def test_the_idle_agent_sees_the_worker_busy_during_a_job_and_idle_after_it(
    tmp_path: Path, training_queue: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No --state-file: the worker writes where the agent looks ($TESSERA_TRAINER_STATE).
    state_file = tmp_path / "run" / "trainer-state.json"
    monkeypatch.setenv(idle.TRAINER_STATE_ENV, str(state_file))
    job = {"task": "detector", "dataset": "synthetic", "steps": 2, "params": TINY, "job_id": "watched"}
    send_message(training_queue, {**job, "output": str(tmp_path / "out")})

    def agent_reasons() -> list[str]:
        observation = idle.Observation(queued=0, trainer=idle.read_trainer_state(state_file), sessions=0)
        return idle.busy_reasons(observation, time.time())

    during: list[list[str]] = []
    real_run = loop.run

    def watching_run(*args: Any, **kwargs: Any) -> Any:
        during.append(agent_reasons())
        return real_run(*args, **kwargs)

    monkeypatch.setattr(loop, "run", watching_run)
    assert agent_reasons() == []  # no trainer has said anything yet
    worker = Worker(WorkerSettings(queue_url=training_queue, database_url=database_url))
    try:
        assert worker.state.path == state_file
        assert worker.poll(wait_s=0)
    finally:
        worker.close()
    assert worker.outcomes[-1].status == "SUCCESS"
    assert during == [["trainer busy with job watched"]]
    assert agent_reasons() == []


def test_the_worker_refreshes_the_state_file_at_least_every_minute(
    tmp_path: Path, aws: str, database_url: str
) -> None:
    # A long visibility timeout would beat every five minutes; the state file needs a refresh every minute.
    sqs = boto3.client("sqs")
    url = sqs.create_queue(QueueName=f"slow-{id(tmp_path)}", Attributes={"VisibilityTimeout": "900"})[
        "QueueUrl"
    ]
    send_message(url, {"job_id": "x"})
    worker = Worker(WorkerSettings(queue_url=url, database_url=database_url, state_path=str(tmp_path / "s")))
    try:
        (message,) = receive_messages(url, max_messages=1, wait_s=0, client=worker.sqs)
        beat = worker.heartbeat(message, worker.queues[0])
    finally:
        worker.close()
    assert beat.interval_s <= 60
    assert beat.on_beat == worker.state.beat
    # The beat refreshes the file while a job runs, and writes nothing when none does.
    beat.on_beat()
    assert not (tmp_path / "s").exists()
    worker.state.start("x")
    first = idle.read_trainer_state(tmp_path / "s")
    (tmp_path / "s").unlink()
    beat.on_beat()
    again = idle.read_trainer_state(tmp_path / "s")
    assert first is not None and again is not None and again.busy and again.job_id == "x"
