"""A city's detector: its labelled images exported as a training set, the training job sent, and the
trained model picked up from the registry.

**What is trained on** (:func:`plan_training`). The city's images that are not held out, each with the
boxes of one labelling: its newest DONE labelling by a person or an external labeller, else the newest by
one of the city's own models (a model trained on its own boxes learns its own mistakes, so they count
last); REJECTED labellings never. One class per sight, named as the sight; a sight is a class when at least
:attr:`TrainingSettings.min_per_sight` images show it. An image is left out when its labelling found
nothing (a labeller's miss would teach the detector that a landmark is background), when it shows a sight
that is not a class (for the same reason), or when it is under :data:`MIN_SIDE` pixels on a side. The city
is ready when :attr:`TrainingSettings.min_images` images are left.

**Starting** (:func:`start_training`). The city's next model version is recorded TRAINING first
(:func:`~services.sight_catalog.warehouse.start_model`: one training per city at a time, and the version is
reserved before anything is written, so a training set's prefix is never written twice); then the images are
written, decoded and re-encoded as PNG (stored JPEGs included), to the datasets bucket under
``catalog/<slug>/training/v<version>/`` in the trainer's detector dataset format (``classes.json``,
``image-<id>.png``, ``image-<id>.json``; see ``services/trainer/tasks/detector.py``), and a
``tessera.training-job/v1`` document (task ``detector``, registered as ``sights-<slug>``, results under
``s3://<models bucket>/catalog/<slug>/v<version>/``) is sent to the training-jobs queue. When writing or
sending fails the model is marked FAILED with the reason, and the error is raised.

The catalog only sends the job: its role may send to training-jobs, read the models bucket and write
``catalog/`` of the datasets bucket (``stacks/services.py``), nothing more; it may not start instances. The
trainer's role writes the results to the models bucket and registers the model. A running training
instance takes the job at once (its idle agent does not stop it while a job is queued); a stopped one runs
it once started (the auto-stop Lambda starts it within 5 minutes of a queued job, ``services/autostop``),
and a job nobody runs ends FAILED by the timeout below.

**Collecting** (:func:`collect`). A TRAINING model becomes READY when the registry holds a version of its
name registered by its training job (``models.job_id``), with that version's URI and metrics. The trainer's
own job records are not the catalog's to read, so a job that failed shows as no registration: a model still
TRAINING :attr:`TrainingSettings.timeout_h` hours after it was queued becomes FAILED, saying so.

Settings (:meth:`TrainingSettings.from_env`): ``TESSERA_CATALOG_MIN_IMAGES`` (default 4),
``TESSERA_CATALOG_MIN_PER_SIGHT`` (2), ``TESSERA_CATALOG_TRAIN_SIZE`` (``tiny``: trains in seconds on a CPU,
for demos; ``small``; ``full``: the detector's defaults), ``TESSERA_CATALOG_TRAIN_STEPS`` (the size's),
``TESSERA_CATALOG_TRAINING_TIMEOUT_H`` (6) and ``TESSERA_CATALOG_RETRY_FAILED_H`` (1: how long after a
failed training a city may try again); where things are: ``TESSERA_BUCKET_DATASETS``,
``TESSERA_BUCKET_MODELS`` and ``TESSERA_QUEUE_TRAINING_JOBS_URL`` (the platform sets them).

This module stays one file (~520 lines): planning, starting and collecting are the three steps of one model
version's life, sharing its settings, its names (registry name, dataset prefix, output URL) and its rows.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from botocore.exceptions import BotoCoreError, ClientError

from services.cloud import objects
from services.cloud.queue import send_message, sqs_client
from services.errors import UserError
from services.jobs.queue_worker import outage
from services.registry import list_versions
from services.sight_catalog import warehouse
from services.sight_catalog.labelling import ImageStore, S3ImageStore, open_image
from services.sight_catalog.warehouse import City, Model

log = logging.getLogger(__name__)

SCHEMA = "tessera.training-job/v1"
TASK = "detector"
DATASETS_BUCKET_ENV = "TESSERA_BUCKET_DATASETS"
MODELS_BUCKET_ENV = "TESSERA_BUCKET_MODELS"
QUEUE_ENV = "TESSERA_QUEUE_TRAINING_JOBS_URL"
MIN_IMAGES_ENV = "TESSERA_CATALOG_MIN_IMAGES"
MIN_PER_SIGHT_ENV = "TESSERA_CATALOG_MIN_PER_SIGHT"
SIZE_ENV = "TESSERA_CATALOG_TRAIN_SIZE"
STEPS_ENV = "TESSERA_CATALOG_TRAIN_STEPS"
TIMEOUT_ENV = "TESSERA_CATALOG_TRAINING_TIMEOUT_H"
RETRY_ENV = "TESSERA_CATALOG_RETRY_FAILED_H"
#: The registry name of a city's models: ``sights-<slug>``.
REGISTRY_PREFIX = "sights-"
#: An image smaller than this on a side is not trained on.
MIN_SIDE = 64
#: The detector's hyper-parameters by size (``batch_size`` and ``crop`` shrink to fit the training set) and
#: the optimiser steps each trains for unless told otherwise.
SIZES: Mapping[str, Mapping[str, Any]] = {
    "tiny": {"batch_size": 2, "crop": 64, "width": 8, "tile": 64, "eval_scenes": 1},
    "small": {"batch_size": 8, "crop": 128, "width": 16, "tile": 256, "eval_scenes": 4},
    "full": {"batch_size": 16, "crop": 256, "width": 32, "tile": 512, "eval_scenes": 8},
}
STEPS: Mapping[str, int] = {"tiny": 20, "small": 500, "full": 2000}
#: Checkpoints at most this many steps apart.
CHECKPOINT_EVERY = 500


@dataclass(frozen=True)
class TrainingSettings:
    """When a city is trained, how, and where its training set, job and model go (see the module doc)."""

    min_images: int = 4
    min_per_sight: int = 2
    size: str = "tiny"
    steps: int | None = None
    timeout_h: float = 6.0
    retry_failed_h: float = 1.0
    datasets_bucket: str | None = None
    models_bucket: str | None = None
    queue_url: str | None = None

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise UserError(f"a training size is one of {', '.join(SIZES)}, not {self.size!r}")
        for name in ("min_images", "min_per_sight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a whole number of at least 1, got {value!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 1):
            raise UserError(f"steps must be at least 1, got {self.steps!r}")
        if not self.timeout_h > 0 or not self.retry_failed_h >= 0:
            raise UserError("the training timeout must be over 0 hours and the retry delay 0 or more")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> TrainingSettings:
        """Settings from the environment (see the module doc); ``overrides`` win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "datasets_bucket": env.get(DATASETS_BUCKET_ENV) or None,
            "models_bucket": env.get(MODELS_BUCKET_ENV) or None,
            "queue_url": env.get(QUEUE_ENV) or None,
        }
        for key, name, kind in (
            ("min_images", MIN_IMAGES_ENV, int),
            ("min_per_sight", MIN_PER_SIGHT_ENV, int),
            ("steps", STEPS_ENV, int),
            ("timeout_h", TIMEOUT_ENV, float),
            ("retry_failed_h", RETRY_ENV, float),
        ):
            text = env.get(name, "").strip()
            if text:
                try:
                    values[key] = kind(text)
                except ValueError:
                    raise UserError(f"{name} must be a number, got {text!r}") from None
        size = env.get(SIZE_ENV, "").strip()
        if size:
            values["size"] = size
        return cls(**{**values, **overrides})

    @property
    def train_steps(self) -> int:
        """Optimiser steps a job trains for."""
        return self.steps if self.steps is not None else STEPS[self.size]

    def required(self, name: str) -> str:
        """The setting ``name`` (a bucket or the queue); UserError naming its variable when it is unset."""
        value: str | None = getattr(self, name)
        variables = {
            "datasets_bucket": DATASETS_BUCKET_ENV,
            "models_bucket": MODELS_BUCKET_ENV,
            "queue_url": QUEUE_ENV,
        }
        if not value:
            raise UserError(f"{variables[name]} is not set: the catalog's training needs it")
        return value


@dataclass(frozen=True)
class Example:
    """An image to train on: where its bytes are, its size, and its boxes (pixels) with their sights."""

    image_id: int
    s3_key: str
    width: int
    height: int
    boxes: tuple[tuple[float, float, float, float], ...]
    labels: tuple[str, ...]

    @property
    def scene(self) -> str:
        """Its file name in the training set, without the suffix."""
        return f"image-{self.image_id}"


@dataclass(frozen=True)
class TrainingPlan:
    """What a city would be trained on now: ``classes`` (sight names), ``examples``, and how many images
    were ``left_out`` for each reason; ``reason`` says why it is not ``ready`` (None when it is)."""

    city_id: int
    classes: tuple[str, ...]
    examples: tuple[Example, ...]
    left_out: dict[str, int] = field(default_factory=dict)
    reason: str | None = None

    @property
    def ready(self) -> bool:
        """Whether the city has enough to train on."""
        return self.reason is None


@dataclass(frozen=True)
class Started:
    """A training started: the TRAINING model, the job document sent and its message id."""

    model: Model
    job: dict[str, Any]
    message_id: str


@dataclass
class Collected:
    """What :func:`collect` did: models now ``ready``, now ``failed``, and how many are still training."""

    ready: list[Model] = field(default_factory=list)
    failed: list[Model] = field(default_factory=list)
    waiting: int = 0


def registry_name(slug: str) -> str:
    """The name a city's models are registered under: ``sights-<slug>``."""
    return f"{REGISTRY_PREFIX}{slug}"


def dataset_prefix(slug: str, version: int) -> str:
    """The key prefix of a city's training set in the datasets bucket."""
    return f"{warehouse.KEY_PREFIX}{slug}/training/v{version}/"


def output_url(models_bucket: str, slug: str, version: int) -> str:
    """Where the trainer writes a city's model version (the trainer's role writes the models bucket)."""
    return f"s3://{models_bucket}/{warehouse.KEY_PREFIX}{slug}/v{version}/"


# --- planning -----------------------------------------------------------------------------------------------


def plan_training(conn: psycopg.Connection[Any], city: City, settings: TrainingSettings) -> TrainingPlan:
    """What the city would be trained on now (see the module doc), read from the warehouse's tables."""
    own = f"model:{registry_name(city.slug)}@"
    rows = conn.execute(
        "WITH chosen AS ("
        " SELECT DISTINCT ON (l.image_id) l.image_id, l.labeller FROM sight_labellings l"
        " JOIN sight_images i ON i.id = l.image_id"
        " WHERE i.city_id = %s AND NOT i.held_out AND l.status = 'DONE'"
        " ORDER BY l.image_id, left(l.labeller, length(%s)) = %s, l.labelled_at DESC, l.labeller)"
        " SELECT i.id, i.s3_key, i.width, i.height, s.name, b.x0, b.y0, b.x1, b.y1"
        " FROM chosen c JOIN sight_images i ON i.id = c.image_id"
        " LEFT JOIN sight_labels b ON b.image_id = c.image_id AND b.labeller = c.labeller"
        " LEFT JOIN sight_sights s ON s.id = b.sight_id"
        " ORDER BY i.id, b.id",
        (city.id, own, own),
    ).fetchall()
    images: dict[int, dict[str, Any]] = {}
    for image_id, key, width, height, sight, x0, y0, x1, y1 in rows:
        image = images.setdefault(
            int(image_id), {"key": str(key), "size": (int(width), int(height)), "boxes": [], "labels": []}
        )
        if sight is not None:
            image["boxes"].append((float(x0), float(y0), float(x1), float(y1)))
            image["labels"].append(str(sight))
    shown: dict[str, int] = {}
    for image in images.values():
        for sight in set(image["labels"]):
            shown[sight] = shown.get(sight, 0) + 1
    order = [
        str(name)
        for (name,) in conn.execute(
            "SELECT name FROM sight_sights WHERE city_id = %s ORDER BY id", (city.id,)
        ).fetchall()
    ]
    classes = tuple(name for name in order if shown.get(name, 0) >= settings.min_per_sight)
    left_out: dict[str, int] = {}
    examples: list[Example] = []
    for image_id, image in images.items():
        width, height = image["size"]
        if not image["labels"]:
            why = "its labelling found no sight"
        elif not set(image["labels"]) <= set(classes):
            why = f"it shows a sight with fewer than {settings.min_per_sight} images"
        elif min(width, height) < MIN_SIDE:
            why = f"it is under {MIN_SIDE} pixels on a side"
        else:
            examples.append(
                Example(image_id, image["key"], width, height, tuple(image["boxes"]), tuple(image["labels"]))
            )
            continue
        left_out[why] = left_out.get(why, 0) + 1
    reason = None
    if not classes:
        reason = (
            f"no sight of {city.name!r} is shown on {settings.min_per_sight} labelled images yet "
            f"({_counts(shown) or 'no boxes at all'})"
        )
    elif len(examples) < settings.min_images:
        why_not = f" (left out: {_counts(left_out)})" if left_out else ""
        reason = (
            f"{city.name!r} has {len(examples)} images to train on, fewer than {settings.min_images}{why_not}"
        )
    return TrainingPlan(city.id, classes, tuple(examples), left_out, reason)


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name}: {n}" for name, n in counts.items())


def due_for_training(
    conn: psycopg.Connection[Any], city: City, settings: TrainingSettings, *, now: dt.datetime | None = None
) -> str | None:
    """None when the city should be trained again (as far as its labels go: see :func:`plan_training` for
    whether they are enough); else why not: a model is training; no labels by a person or an external
    labeller came since its newest model (labels by its own models do not count, or it would train on
    its own output for ever); its last training failed under ``retry_failed_h`` hours ago."""
    models = warehouse.list_models(conn, city.id)
    if any(m.status == "TRAINING" for m in models):
        return "a model is training"
    own = f"model:{registry_name(city.slug)}@"
    row = conn.execute(
        "SELECT max(l.labelled_at) FROM sight_labellings l JOIN sight_images i ON i.id = l.image_id"
        " WHERE i.city_id = %s AND NOT i.held_out AND l.status = 'DONE' AND l.boxes > 0"
        " AND left(l.labeller, length(%s)) <> %s",
        (city.id, own, own),
    ).fetchone()
    newest_label: dt.datetime | None = row[0] if row else None
    if newest_label is None:
        return "no labels by a person or an external labeller yet"
    if models and models[0].status == "FAILED":
        now = now or _db_now(conn)
        retry_at = models[0].updated_at + dt.timedelta(hours=settings.retry_failed_h)
        if now < retry_at:
            return f"version {models[0].version} failed; it is tried again from {retry_at:%Y-%m-%d %H:%M %Z}"
    ready = [m for m in models if m.status == "READY"]
    if ready and newest_label <= ready[0].created_at:
        return f"no new labels since version {ready[0].version}"
    return None


# --- starting -----------------------------------------------------------------------------------------------


def training_job(
    *, job_id: str, dataset: str, output: str, name: str, settings: TrainingSettings, plan: TrainingPlan
) -> dict[str, Any]:
    """The ``tessera.training-job/v1`` document for a plan (``services/trainer/job.py`` documents it)."""
    params = dict(SIZES[settings.size])
    params["batch_size"] = max(1, min(int(params["batch_size"]), len(plan.examples)))
    smallest = min((min(e.width, e.height) for e in plan.examples), default=MIN_SIDE)
    params["crop"] = max(16, min(int(params["crop"]), smallest // 16 * 16))
    steps = settings.train_steps
    params["schedule_steps"] = steps
    params["warmup_steps"] = max(1, min(60, steps // 10))
    params["classes"] = list(plan.classes)
    return {
        "schema": SCHEMA,
        "job_id": job_id,
        "task": TASK,
        "dataset": dataset,
        "params": params,
        "steps": steps,
        "checkpoint_every": min(CHECKPOINT_EVERY, steps),
        "output": output,
        "register": {"name": name},
        "device": "auto",
    }


def start_training(
    conn: psycopg.Connection[Any],
    city: City,
    settings: TrainingSettings,
    *,
    plan: TrainingPlan | None = None,
    store: ImageStore | None = None,
    s3: Any = None,
    sqs: Any = None,
) -> Started:
    """Record the city's next model TRAINING, export its training set and send its job (see the module doc).

    UserError when the city is not ready (:func:`plan_training`), trains already, or a bucket or the queue
    is not configured. When the export or the send fails, the model is marked FAILED and the error raised.
    """
    plan = plan or plan_training(conn, city, settings)
    if not plan.ready:
        raise UserError(plan.reason or f"{city.name!r} is not ready to train")
    datasets = settings.required("datasets_bucket")
    models_bucket = settings.required("models_bucket")
    queue_url = settings.required("queue_url")
    s3 = s3 if s3 is not None else objects.s3_client()
    store = store or S3ImageStore(datasets, client=s3)
    version = warehouse.next_model_version(conn, city.id)
    name = registry_name(city.slug)
    job_id = f"{name}-v{version}-{uuid.uuid4().hex[:12]}"
    dataset = f"s3://{datasets}/{dataset_prefix(city.slug, version)}"
    model = warehouse.start_model(
        conn,
        city.id,
        training_job_id=job_id,
        dataset=dataset,
        classes=plan.classes,
        images=len(plan.examples),
        registry_name=name,
    )
    try:
        if model.version != version:  # another version was taken between the two statements
            raise UserError(f"version {version} of {city.name!r} was taken meanwhile; trying again next pass")
        export_training_set(plan, datasets, dataset_prefix(city.slug, version), store=store, s3=s3)
        job = training_job(
            job_id=job_id,
            dataset=dataset,
            output=output_url(models_bucket, city.slug, version),
            name=name,
            settings=settings,
            plan=plan,
        )
        message_id = send_message(queue_url, job, sqs if sqs is not None else sqs_client())
    except Exception as exc:
        what = outage(exc) or str(exc) or type(exc).__name__
        try:
            warehouse.mark_model_failed(conn, model.id, f"the training could not be started: {what}")
        except psycopg.Error:
            log.warning("model %s of city %s stays TRAINING until it times out", model.version, city.id)
        raise
    log.info(
        "city %s (%r): training version %d on %d images of %d sights, job %s (message %s)",
        city.id,
        city.name,
        model.version,
        len(plan.examples),
        len(plan.classes),
        job_id,
        message_id,
    )
    return Started(model, job, message_id)


def export_training_set(
    plan: TrainingPlan, bucket: str, prefix: str, *, store: ImageStore, s3: Any = None
) -> int:
    """Write ``plan`` as the detector's dataset to ``s3://bucket/prefix``: every image decoded (EXIF
    orientation applied) and written as PNG beside its boxes, then ``classes.json`` last. UserError when the
    prefix holds objects already (a training set is written once), or an image's decoded size is not the
    one its boxes were drawn on. Returns the images written."""
    s3 = s3 if s3 is not None else objects.s3_client()
    if s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0):
        raise UserError(f"s3://{bucket}/{prefix} holds objects already; a training set is written once")
    for example in plan.examples:
        picture = open_image(store.read(example.s3_key))
        if picture.size != (example.width, example.height):
            raise UserError(
                f"image {example.image_id} decodes to {picture.size[0]} x {picture.size[1]} px, not the "
                f"{example.width} x {example.height} px its boxes were drawn on"
            )
        out = io.BytesIO()
        picture.convert("RGB").save(out, format="PNG")
        _put(s3, bucket, f"{prefix}{example.scene}.png", out.getvalue(), "image/png")
        labels = {"boxes": [list(box) for box in example.boxes], "labels": list(example.labels)}
        _put(s3, bucket, f"{prefix}{example.scene}.json", json.dumps(labels).encode(), "application/json")
    _put(s3, bucket, f"{prefix}classes.json", json.dumps(list(plan.classes)).encode(), "application/json")
    return len(plan.examples)


def _put(s3: Any, bucket: str, key: str, body: bytes, content_type: str) -> None:
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
    except (BotoCoreError, ClientError) as exc:
        if outage(exc):
            raise
        raise UserError(f"cannot write s3://{bucket}/{key}: {exc}") from exc


# --- collecting ---------------------------------------------------------------------------------------------


def collect(
    conn: psycopg.Connection[Any], settings: TrainingSettings, *, now: dt.datetime | None = None
) -> Collected:
    """Settle the models in training: READY when the registry holds their job's model, FAILED when still
    training ``timeout_h`` hours after they were queued (see the module doc)."""
    done = Collected()
    training = warehouse.training_models(conn)
    if not training:
        return done
    now = now or _db_now(conn)
    for model in training:
        registered = [
            m for m in list_versions(conn, model.registry_name) if m.job_id == model.training_job_id
        ]
        if registered:
            found = registered[-1]
            ready = warehouse.mark_model_ready(
                conn, model.id, registry_version=found.version, model_uri=found.uri, metrics=found.metrics
            )
            log.info(
                "city %s: version %d READY as %s (%s)", model.city_id, model.version, found.ref, found.uri
            )
            done.ready.append(ready)
        elif now - model.created_at > dt.timedelta(hours=settings.timeout_h):
            reason = (
                f"no model was registered as {model.registry_name} by training job {model.training_job_id} "
                f"within {settings.timeout_h:g} hours: the job failed (see the trainer's record of it), "
                "or it waits on the training-jobs queue (is the training instance running?)"
            )
            failed = warehouse.mark_model_failed(conn, model.id, reason)
            log.warning("city %s: version %d FAILED: %s", model.city_id, model.version, reason)
            done.failed.append(failed)
        else:
            done.waiting += 1
    return done


def _db_now(conn: psycopg.Connection[Any]) -> dt.datetime:
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    value: dt.datetime = row[0]
    return value
