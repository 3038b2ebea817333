"""What mocks cannot show, checked over the program's own tables: the worker reads the environment the
platform gives the fits-classifier service, is notified of the prefix it accepts, may read and write where
it reads and writes, and finds its model in its image."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

from services.cloud.events import NOTIFICATIONS
from services.fits_classifier import worker
from services.fits_classifier.model import SHIPPED_MODEL
from stacks.services import env_name, service

ROOT = Path(__file__).resolve().parents[2]
SPEC = service("fits-classifier")


def test_the_worker_reads_the_environment_the_platform_sets() -> None:
    assert SPEC.consumes == ("fits-frames",) and SPEC.runs_on == "fleet"
    assert env_name("queue", "fits-frames") + "_URL" == worker.QUEUE_ENV
    assert env_name("bucket", "results") == worker.RESULTS_BUCKET_ENV
    settings = worker.WorkerSettings.from_env(
        {worker.QUEUE_ENV: "https://sqs.example/q", worker.RESULTS_BUCKET_ENV: "results-bucket"}
    )
    # No model configured: the one shipped in the package (and so in the image) is used.
    assert settings.model is None and SHIPPED_MODEL.is_file()
    assert settings.annotated == "s3://results-bucket/fits/annotated/"


def test_the_notified_prefix_is_the_one_the_worker_accepts_and_may_read() -> None:
    (route,) = [r for r in NOTIFICATIONS if r.queue == "fits-frames"]
    assert route.prefix == worker.DEFAULT_INCOMING_PREFIX
    reads = {use.purpose: use.prefix for use in SPEC.reads}
    assert route.bucket in reads and route.prefix.startswith(reads[route.bucket])
    writes = {use.purpose: use.prefix for use in SPEC.writes}
    assert worker.ANNOTATED_PREFIX.startswith(writes["results"])


def test_the_shipped_model_is_package_data_and_reaches_the_image() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    inside = SHIPPED_MODEL.relative_to(ROOT / "services").as_posix()
    assert any(fnmatch.fnmatch(inside, pattern) for pattern in patterns["services"])
    ignore = (ROOT / "images" / "fits-classifier.Dockerfile.dockerignore").read_text().splitlines()
    assert (
        "!services" in ignore
        and "COPY services/ services/" in (ROOT / "images" / "fits-classifier.Dockerfile").read_text()
    )
