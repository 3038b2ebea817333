"""Stopping what a hung model holds up: Ctrl-C ends ``tessera run`` at once; SIGTERM drains a worker within
its grace period and hands the region it held back, visible at once; a batch past the timeout fails its
region with the reason and the worker goes on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import onnx
import pytest
from model_stall import endless_loop
from runner_harness import Crew, job_done, job_status, request_for, submit, upload_scene, wait_until
from square_world import place_squares, write_raster

from services.cloud.database import connect
from services.cloud.embedded import Resources
from services.inference.run_control import BATCH_TIMEOUT_ENV
from services.jobs.queue_worker import DRAIN_ENV

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hung_model(square_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The square detector behind a loop that never ends."""
    path = tmp_path_factory.mktemp("hung") / "hung-squares.onnx"
    onnx.save(endless_loop(onnx.load(square_model), "images"), path)
    return path


class _Lines:
    """A child's stderr read on a thread, so a test can wait for a line without blocking on the pipe."""

    def __init__(self, stream: object) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in iter(stream.readline, ""):  # type: ignore[attr-defined]
            self.text += line


def test_ctrl_c_stops_tessera_run_at_once(hung_model: Path, tmp_path: Path) -> None:
    squares = place_squares(256, 256, seed=5, count=6)
    image = write_raster(tmp_path / "scene.tif", squares, 256, 256)
    out = tmp_path / "out" / "found.geojson"
    out.parent.mkdir()
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "run",
            str(image),
            "--model",
            str(hung_model),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env={**os.environ, BATCH_TIMEOUT_ENV: "0", "COLUMNS": "200"},  # no timeout: only Ctrl-C ends it
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr = _Lines(child.stderr)
    try:
        wait_until(lambda: "Ctrl-C stops" in stderr.text, 60, "tessera run to start detecting")
        time.sleep(0.5)  # inside the model's first batches
        assert child.poll() is None
        interrupted = time.monotonic()
        child.send_signal(signal.SIGINT)
        child.wait(timeout=10)
        took = time.monotonic() - interrupted
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, stderr.text[-2000:]
    assert took < 5, took
    assert "tessera run: interrupted" in stderr.text
    assert "Traceback" not in stderr.text
    assert list(out.parent.iterdir()) == []  # nothing half-written


def _region_row(database_url: str, job_id: str) -> tuple[str, str | None, str | None] | None:
    with connect(database_url) as conn:
        row = conn.execute(
            "SELECT status, worker, error FROM regions WHERE job_id = %s ORDER BY region_index LIMIT 1",
            (job_id,),
        ).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def test_sigterm_drains_a_worker_and_hands_its_region_back_at_once(
    runner_env: dict[str, str],
    resources: Resources,
    database_url: str,
    hung_model: Path,
    tmp_path: Path,
) -> None:
    scene = upload_scene(resources, tmp_path, hung_model)
    submit(resources, request_for(scene, "job-drain", region_size=[512, 512], batch_size=1))
    log = (tmp_path / "worker.log").open("w+")
    worker = subprocess.Popen(
        [sys.executable, "-m", "services.model_runner.worker"],
        cwd=ROOT,
        env={**os.environ, **runner_env, BATCH_TIMEOUT_ENV: "0", DRAIN_ENV: "2"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    name = f"{socket.gethostname()}:{worker.pid}"
    try:
        wait_until(
            lambda: (_region_row(database_url, "job-drain") or ("",))[0] == "RUNNING",
            90,
            "the worker to start the region",
        )
        time.sleep(0.5)
        asked = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=20)
        took = time.monotonic() - asked
    finally:
        if worker.poll() is None:
            worker.kill()
        log.seek(0)
        output = log.read()
        log.close()
    assert worker.returncode == 0, output[-3000:]
    assert 2 <= took < 8, (took, output[-3000:])  # the drain time, then the hand-back
    status, holder, error = _region_row(database_url, "job-drain") or ("", None, None)
    assert (status, holder) == ("PENDING", name), output[-3000:]
    assert error is not None and "handed back" in error and "drain time ran out" in error
    # The message is visible again at once, not after the queue's visibility timeout.
    got = boto3.client("sqs").receive_message(
        QueueUrl=resources.queue_urls["region-requests"], WaitTimeSeconds=2, MaxNumberOfMessages=1
    )
    assert len(got.get("Messages", [])) == 1, output[-3000:]


def test_a_batch_past_the_timeout_fails_its_region_and_the_worker_goes_on(  # noqa: PLR0917 - fixtures
    runner_env: dict[str, str],
    resources: Resources,
    database_url: str,
    hung_model: Path,
    square_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(BATCH_TIMEOUT_ENV, "0.5")
    hung = upload_scene(resources, tmp_path, hung_model, seed=4)
    fine = upload_scene(resources, tmp_path, square_model, seed=5)
    submit(resources, request_for(hung, "job-hung", region_size=[512, 512], batch_size=1))
    submit(resources, request_for(fine, "job-fine"))
    with Crew(count=1, names=["survivor"]) as crew:
        wait_until(job_done(database_url, "job-hung"), 90, "the hung job to fail")
        wait_until(job_done(database_url, "job-fine"), 90, "the next job to finish")
    assert not crew.errors
    hung_job, fine_job = job_status(database_url, "job-hung"), job_status(database_url, "job-fine")
    assert hung_job is not None and hung_job.status == "FAILED"
    assert hung_job.reason is not None and BATCH_TIMEOUT_ENV in hung_job.reason
    assert fine_job is not None and fine_job.status == "SUCCESS"
