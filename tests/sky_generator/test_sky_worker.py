"""The sky generator on the embedded default: real Stellarium renders, moto's SQS and S3, a real
PostgreSQL. A job fans out to shards that two workers render, store and record once each; a job or shard
delivered twice adds no row and no object; a bad job is FAILED with its JSON path; a worker killed
mid-shard has its shard taken over by another."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from services.cloud.database import apply_migrations, connect
from services.cloud.embedded import Resources, create_resources, worker_environment
from services.cloud.queue import send_message
from services.sky_generator import records
from services.sky_generator.job import parse_job
from services.sky_generator.worker import Worker, WorkerSettings, shard_message

ROOT = Path(__file__).resolve().parents[2]
#: Visibility of the sky queue in these tests: a killed worker's shard comes back after this.
VISIBILITY_S = 8


def job_body(bucket: str, job_id: str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema": "tessera.sky-job/v1",
        "job_id": job_id,
        "count": 7,
        "seed": 11,
        "latitude": [41.0, 45.0],
        "longitude": [-71.0, -66.0],
        "time": ["2024-01-15T00:00:00Z", "2024-01-16T00:00:00Z"],
        "camera": {
            "altitude": 60,
            "azimuth": 180,
            "fov": 60,
            "projection": "perspective",
            "size": [320, 240],
        },
        "frames_per_shard": 3,
        "output": f"s3://{bucket}/sky",
    }
    body.update(changes)
    return body


@pytest.fixture
def sky(aws: str, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Resources:
    """Buckets and queues of this test, the sky queue with a short visibility; its environment set here."""
    resources = create_resources(
        aws,
        prefix=f"t{uuid.uuid4().hex[:10]}",
        max_receive_count=3,
        visibility_s={"sky-requests": VISIBILITY_S},
    )
    for key, value in worker_environment(aws, resources, database_url, service="sky-generator").items():
        monkeypatch.setenv(key, value)
    with connect(database_url) as conn:
        apply_migrations(conn)
    return resources


class Crew:
    """Sky workers serving on threads until the block ends."""

    def __init__(self, count: int) -> None:
        self.workers = [Worker(WorkerSettings.from_env(worker_id=f"sky-{i}", wait_s=0)) for i in range(count)]
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._serve, args=(w,), daemon=True) for w in self.workers]

    def _serve(self, worker: Worker) -> None:
        try:
            while not self.stop.is_set():
                if not worker.poll(wait_s=0):
                    self.stop.wait(0.1)
        except BaseException as error:
            self.errors.append(error)

    def __enter__(self) -> Crew:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        for worker in self.workers:
            worker.close()


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def job_record(database_url: str, job_id: str) -> records.SkyJobRecord | None:
    with connect(database_url) as conn:
        return records.get_job(conn, job_id)


def finished(database_url: str, job_id: str) -> Callable[[], bool]:
    def done() -> bool:
        record = job_record(database_url, job_id)
        return record is not None and record.status in records.FINAL

    return done


def keys(bucket: str, prefix: str) -> list[str]:
    s3 = boto3.client("s3")
    found: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found += [item["Key"] for item in page.get("Contents", [])]
    return sorted(found)


def manifest_rows(bucket: str, key: str) -> list[dict[str, Any]]:
    body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines()]


def test_two_workers_render_a_job_once_each_frame_proven(sky: Resources, database_url: str) -> None:
    bucket, queue = sky.buckets["datasets"], sky.queue_urls["sky-requests"]
    body = job_body(bucket, "sky-two")
    send_message(queue, body)
    send_message(queue, body)  # the job delivered twice
    with Crew(2) as crew:
        wait_for(finished(database_url, "sky-two"), 240, "the job to finish")
        # A shard message delivered again after the job ended: nothing new happens.
        send_message(queue, shard_message("sky-two", 1))
        time.sleep(2)
    assert not crew.errors
    record = job_record(database_url, "sky-two")
    assert record is not None and record.status == "SUCCESS", record
    assert (record.shards_total, record.frames_total, record.frames_done) == (3, 7, 7)
    assert record.manifest == f"s3://{bucket}/sky/sky-two/manifest.jsonl"
    with connect(database_url) as conn:
        shards = records.shards(conn, "sky-two")
    assert [(s.shard, s.frames, s.status, s.attempts) for s in shards] == [
        (0, 3, "DONE", 1),
        (1, 3, "DONE", 1),
        (2, 1, "DONE", 1),
    ]
    assert all(s.median_px is not None and s.median_px < 2.0 for s in shards)
    names = keys(bucket, "sky/sky-two/")
    frames = [k for k in names if k.startswith("sky/sky-two/frames/")]
    assert frames == [f"sky/sky-two/frames/sky-two-{i:06d}.png" for i in range(7)]
    assert [k for k in names if "/parts/" in k] == [
        f"sky/sky-two/parts/shard-{s:05d}.jsonl" for s in range(3)
    ]
    rows = manifest_rows(bucket, "sky/sky-two/manifest.jsonl")
    assert [r["index"] for r in rows] == list(range(7))
    assert all(r["geometry"]["verdict"] == "pass" and r["stellarium"] for r in rows)
    # The labels are the job's frames, as the job file says they are drawn.
    job = parse_job(body)
    assert [(r["lat"], r["lon"]) for r in rows] == [(f.lat, f.lon) for f in _all(job)]
    assert all(":" not in r["file"] for r in rows)


def _all(job: Any) -> list[Any]:
    from services.sky_generator.job import all_samples

    return all_samples(job)


def test_a_bad_job_is_failed_with_its_json_path_and_the_worker_goes_on(
    sky: Resources, database_url: str
) -> None:
    bucket, queue = sky.buckets["datasets"], sky.queue_urls["sky-requests"]
    send_message(queue, job_body(bucket, "sky-bad", camera={"altitude": 60, "azimuth": 180, "fov": 200}))
    send_message(queue, job_body("somebody-elses-bucket", "sky-elsewhere"))
    send_message(queue, job_body(bucket, "sky-fine", count=2))
    with Crew(1) as crew:
        for job_id in ("sky-bad", "sky-elsewhere", "sky-fine"):
            wait_for(finished(database_url, job_id), 180, f"job {job_id}")
    assert not crew.errors
    bad, elsewhere, fine = (job_record(database_url, j) for j in ("sky-bad", "sky-elsewhere", "sky-fine"))
    assert bad is not None and bad.status == "FAILED" and "$.camera.fov" in (bad.reason or "")
    assert elsewhere is not None and elsewhere.status == "FAILED" and "$.output" in (elsewhere.reason or "")
    assert fine is not None and fine.status == "SUCCESS"
    assert not keys("somebody-elses-bucket", "") if _bucket_exists("somebody-elses-bucket") else True


def _bucket_exists(name: str) -> bool:
    try:
        boto3.client("s3").head_bucket(Bucket=name)
    except Exception:
        return False
    return True


def _running_shard(database_url: str, worker: str) -> int | None:
    with connect(database_url) as conn:
        row = conn.execute(
            "SELECT shard FROM sky_shards WHERE worker = %s AND status = 'RUNNING'", (worker,)
        ).fetchone()
    return None if row is None else int(row[0])


@pytest.fixture
def victim_log(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "victim.log"


def test_a_worker_killed_mid_shard_is_taken_over(sky: Resources, database_url: str, victim_log: Path) -> None:
    bucket, queue = sky.buckets["datasets"], sky.queue_urls["sky-requests"]
    send_message(queue, job_body(bucket, "sky-kill", count=4, frames_per_shard=4))
    with victim_log.open("wb") as log:
        victim = subprocess.Popen(
            [sys.executable, "-m", "services.sky_generator.worker"],
            cwd=ROOT,
            env=dict(os.environ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        name = f"{socket.gethostname()}:{victim.pid}"
        try:
            wait_for(
                lambda: _running_shard(database_url, name) is not None, 90, "the victim to start the shard"
            )
            time.sleep(1.0)  # Stellarium is up and rendering
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
        finally:
            if victim.poll() is None:
                victim.kill()
    subprocess.run(["pkill", "-KILL", "-f", "tessera-sky-sky-kill"], check=False)  # its orphaned Stellarium
    with Crew(1) as crew:
        wait_for(finished(database_url, "sky-kill"), 180, "the rescuer to finish the job")
    assert not crew.errors
    record = job_record(database_url, "sky-kill")
    assert record is not None and record.status == "SUCCESS", (record, victim_log.read_text()[-2000:])
    with connect(database_url) as conn:
        (shard,) = records.shards(conn, "sky-kill")
    assert (shard.status, shard.attempts, shard.worker) == ("DONE", 2, "sky-0")
    frames = [k for k in keys(bucket, "sky/sky-kill/frames/")]
    assert frames == [f"sky/sky-kill/frames/sky-kill-{i:06d}.png" for i in range(4)]  # no duplicates
    assert len(manifest_rows(bucket, "sky/sky-kill/manifest.jsonl")) == 4


def test_sigterm_drains_a_worker_and_hands_its_shard_back_at_once(
    sky: Resources, database_url: str, victim_log: Path
) -> None:
    bucket, queue = sky.buckets["datasets"], sky.queue_urls["sky-requests"]
    send_message(queue, job_body(bucket, "sky-drain", count=30, frames_per_shard=30))
    with victim_log.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "services.sky_generator.worker"],
            cwd=ROOT,
            env={**os.environ, "TESSERA_DRAIN_S": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        name = f"{socket.gethostname()}:{worker.pid}"
        try:
            wait_for(
                lambda: _running_shard(database_url, name) is not None, 90, "the worker to start the shard"
            )
            asked = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
            took = time.monotonic() - asked
        finally:
            if worker.poll() is None:
                worker.kill()
    output = victim_log.read_text()
    assert worker.returncode == 0, output[-2000:]
    assert took < 10, (took, output[-2000:])  # the 1 s drain, Stellarium stopped, the hand-back
    with connect(database_url) as conn:
        (shard,) = records.shards(conn, "sky-drain")
    assert (shard.status, shard.worker) == ("PENDING", name), output[-2000:]
    assert shard.error is not None and "handed back" in shard.error
    assert not keys(bucket, "sky/sky-drain/")  # nothing of the unfinished shard was stored
    got = boto3.client("sqs").receive_message(QueueUrl=queue, WaitTimeSeconds=2, MaxNumberOfMessages=1)
    assert len(got.get("Messages", [])) == 1  # visible again at once, not after the visibility timeout
