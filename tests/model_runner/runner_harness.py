"""Running real workers against moto and PostgreSQL in tests: scenes uploaded, requests sent, workers on
threads polling until a condition holds (with a deadline, never a fixed sleep)."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import numpy as np
from square_world import place_squares, write_raster

from services.cloud.database import connect
from services.cloud.embedded import Resources
from services.cloud.queue import send_message
from services.model_runner import jobs
from services.model_runner.metrics import Metrics
from services.model_runner.worker import Worker, WorkerSettings


@dataclass
class Scene:
    """A square scene uploaded to the imagery bucket, with the model in the models bucket."""

    image_url: str
    model_url: str
    squares: np.ndarray
    results_prefix: str


def upload_scene(
    resources: Resources, tmp_path: Path, model: Path, *, width: int = 403, height: int = 297, seed: int = 3
) -> Scene:
    squares = place_squares(width, height, seed=seed, count=30, must=[(90, 20, 12), (91, 91, 12)])
    local = write_raster(tmp_path / f"scene-{seed}.tif", squares, width, height)
    s3 = boto3.client("s3")
    imagery, models = resources.buckets["imagery"], resources.buckets["models"]
    s3.upload_file(str(local), imagery, f"scenes/{local.name}")
    s3.upload_file(str(model), models, f"detectors/{model.name}")
    return Scene(
        image_url=f"s3://{imagery}/scenes/{local.name}",
        model_url=f"s3://{models}/detectors/{model.name}",
        squares=squares,
        results_prefix=f"s3://{resources.buckets['results']}/runs",
    )


def request_for(scene: Scene, job_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "schema": "tessera.image-request/v1",
        "job_id": job_id,
        "image": scene.image_url,
        "model": scene.model_url,
        "overlap": [16, 16],
        "region_size": [96, 96],
        "batch_size": 4,
        "outputs": {"s3": scene.results_prefix},
        **extra,
    }


def submit(resources: Resources, body: dict[str, Any] | str) -> None:
    url = resources.queue_urls["image-requests"]
    if isinstance(body, str):
        boto3.client("sqs").send_message(QueueUrl=url, MessageBody=body)
    else:
        send_message(url, body)


def read_geojson(url: str) -> dict[str, Any]:
    bucket, key = url[len("s3://") :].split("/", 1)
    body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    result: dict[str, Any] = json.loads(body)
    return result


def job_status(database_url: str, job_id: str) -> jobs.Job | None:
    with connect(database_url) as conn:
        return jobs.get_job(conn, job_id)


def job_done(database_url: str, job_id: str) -> Callable[[], bool]:
    def done() -> bool:
        job = job_status(database_url, job_id)
        return job is not None and job.status in jobs.FINAL

    return done


def queue_empty(url: str) -> Callable[[], bool]:
    sqs = boto3.client("sqs")

    def empty() -> bool:
        attributes = sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return (
            int(attributes["ApproximateNumberOfMessages"])
            + int(attributes["ApproximateNumberOfMessagesNotVisible"])
            == 0
        )

    return empty


@dataclass
class Crew:
    """Workers serving on threads until told to stop; their metrics go to ``metrics_lines``."""

    count: int = 1
    names: list[str] = field(default_factory=list)
    metrics: io.StringIO = field(default_factory=io.StringIO)
    workers: list[Worker] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Crew:
        sink = Metrics(stream=self.metrics)
        for i in range(self.count):
            name = self.names[i] if i < len(self.names) else f"worker-{i}"
            worker = Worker(WorkerSettings.from_env(worker_id=name, wait_s=0), metrics=sink)
            self.workers.append(worker)
            thread = threading.Thread(target=self._serve, args=(worker,), name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def _serve(self, worker: Worker) -> None:
        try:
            while not self._stop.is_set():
                if not worker.poll(wait_s=0):
                    self._stop.wait(0.05)
        except BaseException as error:  # surfaced by stop()
            self.errors.append(error)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        for worker in self.workers:
            worker.close()
        assert not self.errors, self.errors

    def metric_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.metrics.getvalue().splitlines() if line.strip()]

    def __enter__(self) -> Crew:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
