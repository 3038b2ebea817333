"""The refresher's pass over real PostgreSQL with moto S3 and SQS, and ``tessera worker sight-catalog``:
which cities are labelled and in what order, the budget, cities with odd names or no images, errors in one
city, when a city is trained (again), and the worker's loop, backoff and SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from test_city_training import SIGHTS, TruthLabeller, add_photos, queued, settings_for

from services.cloud.embedded import Resources
from services.errors import UserError
from services.registry import register
from services.sight_catalog import labels, warehouse
from services.sight_catalog.labelling import Labeller
from services.sight_catalog.labels import Box
from services.sight_catalog.photos import draw_photos
from services.sight_catalog.refresher import (
    CityError,
    PassSummary,
    Refresher,
    RefresherSettings,
    cities_to_label,
)
from services.sight_catalog.rekognition import RekognitionLabeller
from services.sight_catalog.warehouse import City
from services.sight_catalog.worker import Worker, WorkerSettings, add_worker_options

ROOT = Path(__file__).resolve().parents[2]
ARN = "arn:aws:rekognition:us-east-1:123456789012:project/lyon/version/lyon.2026/1736499600000"
SMALL = (128, 96)


@pytest.fixture
def sqs(aws: str) -> Any:
    """An SQS client talking to moto."""
    import boto3

    return boto3.client("sqs")


class Photos:
    """Cities with generated photos in the datasets bucket, and the photos' own boxes by MD5."""

    def __init__(self, conn: psycopg.Connection[Any], s3: Any, resources: Resources) -> None:
        self.conn, self.s3, self.bucket = conn, s3, resources.buckets["datasets"]
        self.truth: dict[str, list[Box]] = {}
        self.seed = 1000

    def city(self, name: str, count: int = 0, kinds: Sequence[str] = ("tower", "arch")) -> City:
        """The city ``name`` with ``count`` more photos of ``kinds``."""
        city, _ = warehouse.request_city(self.conn, name)
        self.add(city, count, kinds)
        return city

    def add(self, city: City, count: int, kinds: Sequence[str] = ("tower", "arch")) -> list[int]:
        """``count`` more photos in the city; their image ids."""
        if count == 0:
            return []
        photos = draw_photos(self.seed, count, kinds=kinds, size=SMALL, second=0.0)
        self.seed += count
        return add_photos(self.conn, self.s3, self.bucket, city, photos, truth=self.truth)


@pytest.fixture
def photos(conn: psycopg.Connection[Any], s3: Any, resources: Resources) -> Photos:
    """Cities with photos."""
    return Photos(conn, s3, resources)


def refresher(resources: Resources, labeller: Any = None, **settings: Any) -> Refresher:
    """A refresher on the test's buckets and queue; ``labeller``: every city's (a callable, or None for
    the refresher's own choice)."""
    training = settings.pop("training", settings_for(resources))
    chosen = RefresherSettings(training=training, **settings)
    if labeller is None:
        return Refresher(chosen)
    choose = (
        labeller if callable(labeller) and not hasattr(labeller, "label") else lambda conn, city: labeller
    )
    return Refresher(chosen, labellers=choose)


def test_a_pass_with_no_cities_does_nothing(
    conn: psycopg.Connection[Any], sqs: Any, resources: Resources
) -> None:
    summary = refresher(resources).run_pass(conn)
    assert summary.idle and summary.cities == 0 and summary.errors == []
    assert summary.labelled == [] and summary.trained == [] and summary.collected.waiting == 0
    assert queued(sqs, resources.queue_urls["training-jobs"]) == []
    assert "0 cities" in summary.line()


def test_cities_are_labelled_never_labelled_first_then_the_most_waiting_up_to_the_cap(
    conn: psycopg.Connection[Any], photos: Photos, resources: Resources
) -> None:
    alpha, beta = photos.city("Alpha", 3), photos.city("Beta", 6)
    gamma, delta = photos.city("Gamma", 1), photos.city("Delta", 3)
    photos.city("Empty")
    for city in (alpha, beta):  # one image each already looked at
        first = warehouse.list_images(conn, city.id, limit=1).items[0]
        labels.record_labelling(conn, first.id, "annotator:earlier", [])
    chosen: list[str] = []

    def choose(conn: psycopg.Connection[Any], city: City) -> Labeller:
        chosen.append(city.name)
        return TruthLabeller(photos.truth)

    summary = refresher(resources, choose, label_cities=3, train_cities=0).run_pass(conn)

    assert chosen == ["Delta", "Gamma", "Beta"]
    assert [run.city_id for run in summary.labelled] == [delta.id, gamma.id, beta.id]
    # Only images nobody looked at: Beta's one already labelled by a person is left alone.
    assert [run.labelled for run in summary.labelled] == [3, 1, 5]
    assert summary.errors == [] and not summary.idle
    # The next pass takes the one city left with images nobody labelled.
    assert refresher(resources, choose, label_cities=3, train_cities=0).run_pass(conn).labelled[
        0
    ].city_id == (alpha.id)
    marts = warehouse.all_city_marts(conn)
    assert cities_to_label(marts) == [] and len(marts) == 5


def test_a_city_named_true_is_a_city_like_any_other(
    conn: psycopg.Connection[Any], sqs: Any, photos: Photos, resources: Resources
) -> None:
    # The bug this replaces trained a city named "True". Here "True" has no images and is not trained;
    # the cities whose names read as false, zero or null are trained once labelled; an empty city is left be.
    odd = ("False", "0", "None", "null", "'; DROP TABLE sight_cities; --")
    true = photos.city("True")
    for name in odd:
        photos.city(name, 4)
    photos.city("Nowhere")
    run = refresher(resources, TruthLabeller(photos.truth), label_cities=10, train_cities=10)

    summary = run.run_pass(conn)

    assert summary.errors == []
    assert sorted(r.labelled for r in summary.labelled) == [4] * len(odd)
    names = [s.model.registry_name for s in summary.trained]
    assert sorted(names) == sorted(
        ["sights-false", "sights-0", "sights-none", "sights-null", "sights-drop-table-sight-cities"]
    )
    assert warehouse.list_models(conn, true.id) == []
    jobs = queued(sqs, resources.queue_urls["training-jobs"])
    assert sorted(job["register"]["name"] for job in jobs) == sorted(names)
    assert "sights-true" not in names

    # Labelled photos make "True" ready like any other city: it is trained on the next pass, alone.
    photos.add(true, 4)
    summary = run.run_pass(conn)
    assert [s.model.registry_name for s in summary.trained] == ["sights-true"]
    assert summary.trained[0].model.classes == [SIGHTS["tower"], SIGHTS["arch"]]
    assert summary.collected.waiting == len(odd)
    assert run.run_pass(conn).trained == []


def test_the_budget_caps_the_paid_calls_across_passes(
    conn: psycopg.Connection[Any], photos: Photos, resources: Resources
) -> None:
    city = photos.city("Lyon", 5)
    labels.set_budget(conn, city.id, 3)
    paid = TruthLabeller(photos.truth, name="rekognition", external=True)
    run = refresher(resources, paid, label_images=2, train_cities=0)

    first, second, third = (run.run_pass(conn) for _ in range(3))

    assert (first.labelled[0].labelled, first.labelled[0].calls) == (2, 2)
    assert (second.labelled[0].labelled, second.labelled[0].calls) == (1, 1)
    assert second.labelled[0].skipped_for_budget == 1 and "budget" in (second.labelled[0].stopped or "")
    assert third.labelled == [] and "used up" in third.label_skipped[0].reason
    assert len(paid.calls) == 3 and labels.budget_of(conn, city.id).used == 3
    assert labels.remaining(conn, city.id) == 0


def test_a_city_without_a_model_uses_rekognition_or_is_skipped_saying_why(
    conn: psycopg.Connection[Any], photos: Photos, resources: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    lyon = photos.city("Lyon", 1)
    monkeypatch.delenv("TESSERA_REKOGNITION_PROJECT_VERSIONS", raising=False)
    summary = refresher(resources).run_pass(conn)
    (skipped,) = summary.label_skipped
    assert skipped.city_id == lyon.id and "TESSERA_REKOGNITION_PROJECT_VERSIONS" in skipped.reason
    assert summary.labelled == [] and summary.errors == []

    monkeypatch.setenv("TESSERA_REKOGNITION_PROJECT_VERSIONS", f'{{"lyon": "{ARN}"}}')
    chosen = refresher(resources).choose_labeller(conn, lyon)
    assert isinstance(chosen, RekognitionLabeller) and chosen.project_version_arn == ARN


def test_an_error_in_one_city_is_recorded_and_the_pass_goes_on(
    conn: psycopg.Connection[Any], photos: Photos, resources: Resources
) -> None:
    broken, fine = photos.city("Broken", 2), photos.city("Fine", 2)

    def choose(conn: psycopg.Connection[Any], city: City) -> Labeller:
        if city.id == broken.id:
            raise RuntimeError("the labeller fell over")
        return TruthLabeller(photos.truth)

    summary = refresher(resources, choose, train_cities=0).run_pass(conn)

    assert summary.errors == [CityError(broken.id, "Broken", "label", "RuntimeError: the labeller fell over")]
    assert [(r.city_id, r.labelled) for r in summary.labelled] == [(fine.id, 2)]


def test_an_outage_ends_the_pass(conn: psycopg.Connection[Any], photos: Photos, resources: Resources) -> None:
    photos.city("Paris", 1)

    def choose(conn: psycopg.Connection[Any], city: City) -> Labeller:
        raise psycopg.OperationalError("connection refused")

    with pytest.raises(psycopg.OperationalError):
        refresher(resources, choose).run_pass(conn)


def test_a_city_is_trained_again_only_for_new_labels_not_its_own_models(
    conn: psycopg.Connection[Any], photos: Photos, resources: Resources
) -> None:
    paris = photos.city("Paris", 4)
    truth = TruthLabeller(photos.truth)
    run = refresher(resources, lambda conn, city: current[0])
    current: list[Labeller] = [truth]
    (started,) = run.run_pass(conn).trained
    uri = f"s3://{resources.buckets['models']}/catalog/paris/v1/model/detector.onnx"
    register(conn, "sights-paris", task="detector", uri=uri, job_id=started.job["job_id"])

    summary = run.run_pass(conn)
    assert [m.version for m in summary.collected.ready] == [1] and summary.trained == []
    assert [s.reason for s in summary.train_skipped] == ["no new labels since version 1"]

    # Its own model's labels on new photos do not make it train again...
    photos.add(paris, 2)
    current[0] = TruthLabeller(photos.truth, name="model:sights-paris@1")
    summary = run.run_pass(conn)
    assert summary.labelled[0].labelled == 2 and summary.trained == []  # the new photos only
    # ...an annotator's do.
    photos.add(paris, 2)
    current[0] = truth
    (again,) = run.run_pass(conn).trained
    assert again.model.version == 2 and again.model.images == 8


# --- the worker ---------------------------------------------------------------------------------------------


def test_the_worker_runs_passes_and_logs_a_heartbeat(
    database_url: str, resources: Resources, caplog: pytest.LogCaptureFixture
) -> None:
    settings = WorkerSettings(
        refresh_s=0,
        database_url=database_url,
        max_messages=2,
        refresher=RefresherSettings(training=settings_for(resources)),
    )
    worker = Worker(settings)
    with caplog.at_level(logging.INFO):
        assert worker.serve() == 2
    worker.close()
    beats = [r.getMessage() for r in caplog.records if "heartbeat" in r.getMessage()]
    assert len(beats) == 2 and "pass 2 idle: 0 cities" in beats[1]


class Flaky(Refresher):
    """A refresher whose first pass finds the database down."""

    def __init__(self) -> None:
        self.passes = 0

    def run_pass(self, conn: psycopg.Connection[Any]) -> PassSummary:
        """Down once, then an idle pass."""
        self.passes += 1
        if self.passes == 1:
            raise psycopg.OperationalError("connection refused")
        return PassSummary()


def test_the_worker_backs_off_while_the_database_is_down(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = Flaky()
    worker = Worker(WorkerSettings(refresh_s=0, database_url=database_url, max_messages=1), refresher=flaky)
    with caplog.at_level(logging.INFO):
        started = time.monotonic()
        assert worker.serve() == 1
    worker.close()
    assert flaky.passes == 2 and time.monotonic() - started >= 1.0
    text = caplog.text
    assert "the database is unreachable" in text and "retry 1 in 1 s" in text and "reachable again" in text


def test_sigterm_stops_the_worker_between_passes(
    database_url: str, resources: Resources, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "TESSERA_DB_URL": database_url,
        "TESSERA_BUCKET_DATASETS": resources.buckets["datasets"],
        "TESSERA_BUCKET_MODELS": resources.buckets["models"],
        "TESSERA_QUEUE_TRAINING_JOBS_URL": resources.queue_urls["training-jobs"],
        "TESSERA_CATALOG_REFRESH_S": "120",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "services.sight_catalog.worker"], cwd=ROOT, env=env, stderr=log_file
        )
        try:
            deadline = time.monotonic() + 60
            while "heartbeat" not in log_path.read_text() and time.monotonic() < deadline:
                assert worker.poll() is None, log_path.read_text()
                time.sleep(0.2)
            assert "pass 1 idle" in log_path.read_text()
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=20) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    text = log_path.read_text()
    assert "finishing the city in hand, then stopping" in text and "pass 2" not in text


def test_worker_settings_and_options() -> None:
    settings = WorkerSettings.from_env(
        {"TESSERA_CATALOG_REFRESH_S": "5", "TESSERA_CATALOG_LABEL_CITIES": "9"}
    )
    assert settings.refresh_s == 5 and settings.refresher.label_cities == 9
    assert WorkerSettings.from_env({}).refresh_s == 60
    with pytest.raises(UserError, match="TESSERA_BUCKET_DATASETS is not set"):
        Worker(WorkerSettings(refresher=RefresherSettings()))  # said before anything is reached
    parser = argparse.ArgumentParser()
    add_worker_options(parser)
    args = parser.parse_args(["--once", "--refresh-s", "2.5"])
    assert args.once and args.refresh_s == 2.5 and args.max_messages is None
