"""A city's training: the training set exported from the warehouse (real PostgreSQL, moto S3) and loaded by
the trainer's detector task through the public CLI, the job on the training-jobs queue (moto SQS) parsed by
the trainer, and the model collected from the registry, or failed once it is overdue."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from PIL import Image

from services.cloud.embedded import Resources
from services.errors import UserError
from services.registry import list_versions, register
from services.sight_catalog import labels, warehouse
from services.sight_catalog.labelling import (
    UNMETERED,
    BudgetExhaustedError,
    CallBudget,
    S3ImageStore,
    label_city,
)
from services.sight_catalog.labels import Box
from services.sight_catalog.photos import Photo, draw_photos
from services.sight_catalog.refresher import Refresher, RefresherSettings
from services.sight_catalog.training import (
    TrainingSettings,
    collect,
    dataset_prefix,
    due_for_training,
    plan_training,
    registry_name,
    start_training,
)
from services.sight_catalog.warehouse import City
from services.trainer.job import parse_job

ROOT = Path(__file__).resolve().parents[2]
#: The photos' landmarks and the sights they stand for.
SIGHTS = {"tower": "Eiffel Tower", "arch": "Arc de Triomphe", "dome": "Sacré-Cœur"}


class TruthLabeller:
    """Labels a photo with its own boxes (found by the MD5 of the stored bytes); ``external`` ones ask the
    budget before each call. Remembers the cities it was called for, in order."""

    def __init__(self, truth: dict[str, list[Box]], name: str = "annotator:truth", external: bool = False):
        self.truth = truth
        self.name = name
        self.external = external
        self.calls: list[str] = []

    def label(self, image: bytes, sights: Sequence[str], *, budget: CallBudget = UNMETERED) -> list[Box]:
        """The photo's boxes (none for a photo it does not know)."""
        if self.external and not budget.take():
            raise BudgetExhaustedError()
        md5 = hashlib.md5(image).hexdigest()
        self.calls.append(md5)
        return self.truth.get(md5, [])


def settings_for(resources: Resources, **changes: Any) -> TrainingSettings:
    """Training settings on the test's buckets and queue."""
    values: dict[str, Any] = {
        "datasets_bucket": resources.buckets["datasets"],
        "models_bucket": resources.buckets["models"],
        "queue_url": resources.queue_urls["training-jobs"],
        "min_images": 4,
        "min_per_sight": 2,
        **changes,
    }
    return TrainingSettings(**values)


def add_photos(
    conn: psycopg.Connection[Any],
    s3: Any,
    bucket: str,
    city: City,
    photos: Sequence[Photo],
    *,
    truth: dict[str, list[Box]] | None = None,
) -> list[int]:
    """Store ``photos`` as the city's images (JPEG and PNG by turns, their sights added); their boxes go in
    ``truth`` by MD5. Returns the image ids."""
    ids = []
    for index, photo in enumerate(photos):
        data, media_type = (photo.jpeg(), "image/jpeg") if index % 2 == 0 else (photo.png(), "image/png")
        md5 = hashlib.md5(data).hexdigest()
        key = warehouse.image_key(city.slug, md5, media_type)
        s3.put_object(Bucket=bucket, Key=key, Body=data)
        image, _ = warehouse.add_image(
            conn,
            city.id,
            md5=md5,
            s3_key=key,
            source=f"generated:{photo.plan.seed}",
            media_type=media_type,
            width=photo.image.width,
            height=photo.image.height,
            size_bytes=len(data),
        )
        ids.append(image.id)
        for landmark in photo.landmarks:
            warehouse.add_sight(conn, city.id, SIGHTS[landmark.kind])
        if truth is not None:
            truth[md5] = [Box(SIGHTS[m.kind], *map(float, m.box)) for m in photo.landmarks]
    return ids


def labelled_city(
    conn: psycopg.Connection[Any],
    s3: Any,
    resources: Resources,
    name: str = "Paris",
    *,
    count: int = 6,
    kinds: Sequence[str] = ("tower", "arch"),
    seed: int = 100,
) -> tuple[City, list[int], dict[str, list[Box]]]:
    """A city with ``count`` photos of ``kinds``, each labelled with its own boxes by ``annotator:truth``."""
    city, _ = warehouse.request_city(conn, name)
    truth: dict[str, list[Box]] = {}
    photos = draw_photos(seed, count, kinds=kinds, second=0.0)
    ids = add_photos(conn, s3, resources.buckets["datasets"], city, photos, truth=truth)
    store = S3ImageStore(resources.buckets["datasets"], client=s3)
    run = label_city(conn, city.id, TruthLabeller(truth), store)
    assert run.labelled == count
    return city, ids, truth


def queued(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    """The bodies waiting on a queue (received, so hidden for its visibility timeout)."""
    bodies: list[dict[str, Any]] = []
    while True:
        messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        found = messages.get("Messages", [])
        if not found:
            return bodies
        bodies.extend(json.loads(m["Body"]) for m in found)


@pytest.fixture
def sqs(aws: str) -> Any:
    """An SQS client talking to moto."""
    import boto3

    return boto3.client("sqs")


def test_export_is_a_dataset_the_trainer_trains_on_and_collect_marks_it_ready(  # noqa: PLR0917 (fixtures)
    conn: psycopg.Connection[Any],
    s3: Any,
    sqs: Any,
    resources: Resources,
    database_url: str,
    tmp_path: Path,
) -> None:
    city, ids, truth = labelled_city(conn, s3, resources, count=7)
    datasets = resources.buckets["datasets"]
    # One image held out, one whose newest labelling is a refusal, one relabelled by the city's own model:
    # the first is not exported, the other two keep the annotator's boxes.
    warehouse.set_held_out(conn, [ids[6]])
    labels.record_labelling(conn, ids[1], "rekognition", [], rejected="ImageTooLargeException")
    labels.record_labelling(conn, ids[2], "model:sights-paris@9", [Box("Arc de Triomphe", 1, 1, 9, 9, 0.9)])
    settings = settings_for(resources)

    started = start_training(conn, city, settings)

    model = started.model
    assert (model.status, model.version, model.registry_name) == ("TRAINING", 1, "sights-paris")
    assert model.classes == ["Eiffel Tower", "Arc de Triomphe"] and model.images == 6
    prefix = dataset_prefix("paris", 1)
    assert prefix == "catalog/paris/training/v1/"
    assert model.dataset == f"s3://{datasets}/{prefix}"
    listed = s3.list_objects_v2(Bucket=datasets, Prefix=prefix)["Contents"]
    names = sorted(item["Key"].removeprefix(prefix) for item in listed)
    assert names == ["classes.json", *sorted(f"image-{i}.{e}" for i in ids[:6] for e in ("json", "png"))]
    read = lambda key: s3.get_object(Bucket=datasets, Key=prefix + key)["Body"].read()  # noqa: E731
    assert json.loads(read("classes.json")) == ["Eiffel Tower", "Arc de Triomphe"]
    for image_id in ids[:6]:
        image = warehouse.get_image(conn, image_id)
        stored = s3.get_object(Bucket=datasets, Key=image.s3_key)["Body"].read()
        exported = Image.open(io.BytesIO(read(f"image-{image_id}.png")))
        assert exported.format == "PNG"
        assert np.array_equal(np.asarray(exported), np.asarray(Image.open(io.BytesIO(stored)).convert("RGB")))
        boxes = truth[image.md5]
        assert json.loads(read(f"image-{image_id}.json")) == {
            "boxes": [[b.x0, b.y0, b.x1, b.y1] for b in boxes],
            "labels": [b.sight for b in boxes],
        }

    # The job on the queue is the one recorded, and the trainer reads it.
    (body,) = queued(sqs, resources.queue_urls["training-jobs"])
    assert body == started.job
    job = parse_job(body)
    assert (job.job_id, job.task, job.dataset) == (model.training_job_id, "detector", model.dataset)
    assert job.output == f"s3://{resources.buckets['models']}/catalog/paris/v1/"
    assert job.register_name == "sights-paris" and job.steps == 20
    assert job.params["batch_size"] == 2 and job.params["classes"] == ["Eiffel Tower", "Arc de Triomphe"]

    # Nothing is registered yet: still training.
    assert collect(conn, settings).waiting == 1

    # The trainer's detector task trains on the exported prefix, through the public CLI (2 steps).
    command = [sys.executable, "-m", "services.cli", "train", "detector", "--dataset", job.dataset]
    command += ["--out", job.output, "--steps", "2", "--register", "sights-paris", "--job-id", job.job_id]
    for key, value in job.params.items():
        command += ["--param", f"{key}={json.dumps(value)}"]
    env = {**os.environ, "TESSERA_DB_URL": database_url, "TESSERA_TRAINER_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered sights-paris:1" in done.stdout

    collected = collect(conn, settings)

    (ready,) = collected.ready
    assert (ready.id, ready.status, ready.registry_version) == (model.id, "READY", 1)
    assert ready.model_uri is not None and ready.model_uri.startswith(job.output)
    assert ready.metrics == list_versions(conn, "sights-paris")[0].metrics
    assert warehouse.ready_model(conn, city.id) == ready
    assert due_for_training(conn, city, settings) == "no new labels since version 1"

    # The refresher labels the city's new photos with the model it just trained (read from the models bucket).
    add_photos(conn, s3, datasets, city, draw_photos(900, 1, kinds=("tower",), second=0.0))
    summary = Refresher(RefresherSettings(training=settings)).run_pass(conn)
    assert summary.errors == [] and summary.trained == []
    assert [(run.labeller, run.failed) for run in summary.labelled] == [("model:sights-paris@1", [])]
    assert summary.labelled[0].labelled == 1  # the new photo: the ones a person labelled are left alone


def test_a_city_without_enough_labels_is_not_ready(
    conn: psycopg.Connection[Any], s3: Any, resources: Resources
) -> None:
    settings = settings_for(resources)
    empty, _ = warehouse.request_city(conn, "Nowhere")
    plan = plan_training(conn, empty, settings)
    assert not plan.ready and plan.examples == () and "no boxes at all" in (plan.reason or "")
    assert due_for_training(conn, empty, settings) == "no labels by a person or an external labeller yet"
    with pytest.raises(UserError, match="no boxes at all"):
        start_training(conn, empty, settings)

    # Three towers and one arch: the arch is one image short of a class, so its image is left out too.
    city, _ids, _ = labelled_city(
        conn, s3, resources, "Lyon", count=4, kinds=("tower", "tower", "tower", "arch")
    )
    plan = plan_training(conn, city, settings)
    assert plan.classes == ("Eiffel Tower",) and len(plan.examples) == 3
    assert plan.left_out == {"it shows a sight with fewer than 2 images": 1}
    assert plan.reason == (
        "'Lyon' has 3 images to train on, fewer than 4 "
        "(left out: it shows a sight with fewer than 2 images: 1)"
    )
    assert plan_training(conn, city, settings_for(resources, min_images=3)).ready
    with pytest.raises(UserError, match="fewer than 4"):
        start_training(conn, city, settings)
    assert warehouse.list_models(conn, city.id) == []


def test_one_training_at_a_time_and_a_job_that_never_registers_fails(
    conn: psycopg.Connection[Any], s3: Any, sqs: Any, resources: Resources
) -> None:
    city, _, _ = labelled_city(conn, s3, resources)
    settings = settings_for(resources, timeout_h=6.0)
    started = start_training(conn, city, settings)
    with pytest.raises(UserError, match="training already"):
        start_training(conn, city, settings)
    assert len(queued(sqs, resources.queue_urls["training-jobs"])) == 1
    assert due_for_training(conn, city, settings) == "a model is training"

    # Another job's registration of the same name is not this model's.
    register(conn, "sights-paris", task="detector", uri="s3://elsewhere/model.onnx", job_id="someone-else")
    created = started.model.created_at
    assert collect(conn, settings, now=created + dt.timedelta(hours=5)).waiting == 1
    collected = collect(conn, settings, now=created + dt.timedelta(hours=7))

    (failed,) = collected.failed
    assert failed.status == "FAILED" and started.model.training_job_id in (failed.reason or "")
    assert "within 6 hours" in (failed.reason or "")
    # A failed training is tried again once the retry delay has passed, and then gets the next version.
    assert "failed" in (due_for_training(conn, city, settings) or "")
    assert due_for_training(conn, city, settings, now=failed.updated_at + dt.timedelta(hours=2)) is None
    again = start_training(conn, city, settings)
    assert again.model.version == 2 and again.job["output"].endswith("/catalog/paris/v2/")


def test_collect_marks_ready_when_the_registry_has_the_jobs_model(
    conn: psycopg.Connection[Any], s3: Any, resources: Resources
) -> None:
    city, _, _ = labelled_city(conn, s3, resources, "True")
    settings = settings_for(resources)
    started = start_training(conn, city, settings)
    assert started.model.registry_name == registry_name("true") == "sights-true"
    uri = f"s3://{resources.buckets['models']}/catalog/true/v1/model/detector.onnx"
    register(
        conn, "sights-true", task="detector", uri=uri, metrics={"recall": 0.5}, job_id=started.job["job_id"]
    )

    (ready,) = collect(conn, settings).ready

    assert (ready.status, ready.registry_version, ready.model_uri) == ("READY", 1, uri)
    assert ready.metrics == {"recall": 0.5}
    assert collect(conn, settings).ready == []


def test_a_job_that_cannot_be_sent_fails_its_model(
    conn: psycopg.Connection[Any], s3: Any, resources: Resources
) -> None:
    city, _, _ = labelled_city(conn, s3, resources)
    gone = resources.queue_urls["training-jobs"].rsplit("/", 1)[0] + "/no-such-queue"
    with pytest.raises(UserError, match="does not exist"):
        start_training(conn, city, settings_for(resources, queue_url=gone))
    (model,) = warehouse.list_models(conn, city.id)
    assert model.status == "FAILED" and "could not be started" in (model.reason or "")


def test_settings_come_from_the_environment() -> None:
    env = {
        "TESSERA_BUCKET_DATASETS": "d",
        "TESSERA_BUCKET_MODELS": "m",
        "TESSERA_QUEUE_TRAINING_JOBS_URL": "q",
        "TESSERA_CATALOG_MIN_IMAGES": "10",
        "TESSERA_CATALOG_TRAIN_SIZE": "small",
        "TESSERA_CATALOG_TRAINING_TIMEOUT_H": "2.5",
    }
    settings = TrainingSettings.from_env(env)
    assert (settings.datasets_bucket, settings.models_bucket, settings.queue_url) == ("d", "m", "q")
    assert (settings.min_images, settings.min_per_sight, settings.train_steps, settings.timeout_h) == (
        10,
        2,
        500,
        2.5,
    )
    assert TrainingSettings.from_env({}).train_steps == 20
    with pytest.raises(UserError, match="size"):
        TrainingSettings.from_env({"TESSERA_CATALOG_TRAIN_SIZE": "huge"})
    with pytest.raises(UserError, match="TESSERA_CATALOG_MIN_IMAGES"):
        TrainingSettings.from_env({"TESSERA_CATALOG_MIN_IMAGES": "many"})
    with pytest.raises(UserError, match="TESSERA_QUEUE_TRAINING_JOBS_URL"):
        TrainingSettings().required("queue_url")
