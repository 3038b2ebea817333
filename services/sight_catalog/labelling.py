"""Labelling a city's images: labellers, and the worker step that runs one over the images it has not seen.

A :class:`Labeller` looks at an image's bytes and returns boxes (:class:`~services.sight_catalog.labels.Box`)
naming the city's sights, in pixels of the image. Two kinds exist:

- :class:`DetectorLabeller`, the city's own detector in ONNX, run through the inference library
  (:class:`~services.inference.detector.OnnxDetector`); recorded as ``model:<name>@<version>``. The photo
  is letterboxed into the model's tile (shrunk or enlarged to fit, aspect kept, padded at the right and
  bottom), so a landmark is never cut in pieces, and the boxes are scaled back to the photo.
- :class:`~services.sight_catalog.rekognition.RekognitionLabeller`, a cloud vision API; it is
  ``external``: every call it sends is paid for and spent from the city's budget first.

Class names become sight names through :class:`SightNames`: the exact name, else the same name ignoring
case, spaces, ``_`` and ``-``, else a configured alias. Names that are none of the city's sights are
ignored.

:func:`label_city` is the worker step: the images the labeller has not labelled, oldest first; for an
external labeller the budget is spent before each call and the step stops, saying so, when it is used up.
Workers may run it side by side on one city (each with its own connection): each image is claimed
(:func:`~services.sight_catalog.labels.claim`) before it is sent, so none is sent twice.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import psycopg
from PIL import Image, ImageOps, UnidentifiedImageError

from services.cloud.objects import read_object, s3_client
from services.errors import UserError
from services.inference.detector import OnnxDetector
from services.sight_catalog import labels
from services.sight_catalog.labels import Box
from services.tiling.scaling import InputScaling

log = logging.getLogger(__name__)

#: Where a worker finds the datasets bucket (the platform sets it).
DATASETS_BUCKET_ENV = "TESSERA_BUCKET_DATASETS"


class BudgetExhaustedError(Exception):
    """The city's budget of external calls is used up: no call was made for this image (it stays
    unlabelled until the budget is raised)."""


class LabellerUnavailableError(Exception):
    """The labeller cannot label now (throttled past its retries, unreachable, its model not running, no
    permission): the image stays unlabelled, and the round stops. The message says what happened."""


class ImageRejectedError(UserError):
    """The labeller cannot label this image (not an image, a format or size it refuses): recorded as a
    labelling that found nothing, so it is not sent again; the message is the reason."""


class CallBudget(Protocol):
    """Permission for external calls, asked before each one."""

    def take(self) -> bool:
        """Count one call about to be sent; False when the budget cannot cover it (then do not send)."""
        ...

    def refund(self) -> None:
        """Give back the last call taken: it was never sent (no connection)."""
        ...


class Unmetered:
    """No budget: every call is allowed (local labellers, and external ones called outside a city's round)."""

    def take(self) -> bool:
        """Always allowed."""
        return True

    def refund(self) -> None:
        """Nothing was counted."""


UNMETERED = Unmetered()


class CityBudget:
    """A city's budget in the warehouse (:func:`~services.sight_catalog.labels.spend`), on an autocommit
    connection; counts the calls it allowed (``calls``, net of refunds)."""

    def __init__(self, conn: psycopg.Connection[Any], city_id: int) -> None:
        self.conn = conn
        self.city_id = city_id
        self.calls = 0

    def take(self) -> bool:
        """Spend one call of the city's budget, if it is left."""
        if labels.spend(self.conn, self.city_id):
            self.calls += 1
            return True
        return False

    def refund(self) -> None:
        """Give back one call that was never sent."""
        labels.refund(self.conn, self.city_id)
        self.calls -= 1


class Labeller(Protocol):
    """What labels a city's images. ``name`` is recorded as the labelling's labeller; ``external`` says
    whether each call is paid for (and spent from the city's budget)."""

    name: str
    external: bool

    def label(self, image: bytes, sights: Sequence[str], *, budget: CallBudget = UNMETERED) -> list[Box]:
        """Boxes of ``sights`` (the city's sight names) found on the encoded ``image``, in its pixels
        (EXIF orientation applied). ImageRejectedError for an image it cannot label; an external labeller asks
        ``budget`` before every call it sends (BudgetExhaustedError when refused) and raises
        LabellerUnavailableError when it cannot label now."""
        ...


class SightNames:
    """Maps a labeller's class names to the city's sights: exact, then ignoring case, spaces, ``_`` and
    ``-``, then ``aliases`` (class name -> sight name; aliases of sights the city lacks are ignored)."""

    def __init__(self, sights: Sequence[str], aliases: Mapping[str, str] | None = None) -> None:
        self.sights = list(sights)
        self._exact = set(self.sights)
        self._by_key: dict[str, str] = {}
        for sight in self.sights:
            self._by_key.setdefault(_key(sight), sight)
        for alias, sight in (aliases or {}).items():
            target = sight if sight in self._exact else self._by_key.get(_key(sight))
            if target is not None:
                self._by_key.setdefault(_key(alias), target)

    def match(self, name: str) -> str | None:
        """The sight ``name`` stands for, or None."""
        if name in self._exact:
            return name
        return self._by_key.get(_key(name))


def _key(name: str) -> str:
    return " ".join(part for part in re.split(r"[\s_\-]+", name.casefold()) if part)


def open_image(data: bytes) -> Image.Image:
    """The decoded image, EXIF orientation applied; ImageRejectedError when Pillow cannot read it."""
    try:
        picture = Image.open(io.BytesIO(data))
        picture.load()
        return ImageOps.exif_transpose(picture)
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageRejectedError(f"not an image that can be labelled: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's errors for truncated or corrupt files
        raise ImageRejectedError(f"the image is damaged: {exc}") from None


class DetectorLabeller:
    """A city's detector (ONNX, the tessera detector contract) as a labeller, ``model:<name>@<version>``.

    Boxes scoring under ``score_threshold`` are dropped, and so are classes that are none of the city's
    sights (see :class:`SightNames`). Runs on the model's single tile: see the module docstring.
    """

    external = False

    def __init__(
        self,
        detector: OnnxDetector,
        *,
        version: str | int,
        name: str | None = None,
        aliases: Mapping[str, str] | None = None,
        score_threshold: float = 0.25,
    ) -> None:
        if detector.channels not in (1, 3):
            raise UserError(
                f"model {detector.name} takes {detector.channels} channels; a photo labeller needs 1 or 3"
            )
        self.detector = detector
        self.name = f"model:{name or detector.name}@{version}"
        self.aliases = dict(aliases or {})
        self.score_threshold = float(score_threshold)
        self.scaling = InputScaling.from_metadata(detector.metadata, channels=detector.channels)

    @classmethod
    def open(
        cls,
        model: str | bytes | Path,
        *,
        version: str | int,
        name: str | None = None,
        aliases: Mapping[str, str] | None = None,
        score_threshold: float = 0.25,
        providers: str = "auto",
    ) -> DetectorLabeller:
        """Load ``model`` (a path or the model's bytes) into one session and wrap it."""
        detector = OnnxDetector(
            model, providers=providers, batch_size=1, score_threshold=score_threshold, sessions=1
        )
        return cls(detector, version=version, name=name, aliases=aliases, score_threshold=score_threshold)

    def label(self, image: bytes, sights: Sequence[str], *, budget: CallBudget = UNMETERED) -> list[Box]:
        """The detector's boxes on ``image`` that name one of ``sights``, in image pixels."""
        picture = open_image(image)
        width, height = picture.size
        matcher = SightNames(sights, self.aliases)
        tile_w, tile_h = self.detector.tile_width, self.detector.tile_height
        scale = min(tile_w / width, tile_h / height)
        fit_w, fit_h = max(1, min(tile_w, round(width * scale))), max(1, min(tile_h, round(height * scale)))
        picture = picture.convert("L" if self.detector.channels == 1 else "RGB")
        if (fit_w, fit_h) != (width, height):
            picture = picture.resize((fit_w, fit_h), Image.Resampling.BILINEAR)
        pixels = np.asarray(picture, dtype=np.uint8)
        raw = np.zeros((self.detector.channels, tile_h, tile_w), dtype=np.uint8)
        raw[:, :fit_h, :fit_w] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        (found,) = self.detector.detect(self.scaling.apply(raw)[None])
        sx, sy = fit_w / width, fit_h / height
        boxes = []
        for (x0, y0, x1, y1), score, label in zip(
            found.boxes.tolist(), found.scores.tolist(), found.labels.tolist(), strict=True
        ):
            sight = matcher.match(self.detector.class_name(int(label)))
            if sight is None or score < self.score_threshold:
                continue
            boxes.append(Box(sight, x0 / sx, y0 / sy, x1 / sx, y1 / sy, float(score)))
        kept, _ = labels.clip_boxes(boxes, width, height)
        return kept


class ImageStore(Protocol):
    """Where the images' encoded bytes are, by ``sight_images.s3_key``."""

    def read(self, key: str) -> bytes:
        """The bytes at ``key``; UserError when they are missing."""
        ...


class S3ImageStore:
    """The datasets bucket (``bucket``, or TESSERA_BUCKET_DATASETS) on S3."""

    def __init__(self, bucket: str | None = None, *, client: Any = None) -> None:
        bucket = bucket or os.environ.get(DATASETS_BUCKET_ENV)
        if not bucket:
            raise UserError(f"no datasets bucket: set {DATASETS_BUCKET_ENV}")
        self.bucket = bucket
        self.client = client if client is not None else s3_client()

    def read(self, key: str) -> bytes:
        """The object ``key`` of the bucket."""
        return read_object(f"s3://{self.bucket}/{key}", self.client)


@dataclass(frozen=True)
class Failure:
    """An image a round could not label: ``recorded`` when the labeller rejected it (recorded as a labelling
    that found nothing, not sent again), else its bytes could not be read (tried again next round)."""

    image_id: int
    reason: str
    recorded: bool


@dataclass
class LabelRun:
    """What one :func:`label_city` round did.

    ``labelled``: images labelled and recorded (``boxes`` boxes in all); ``failed``: see :class:`Failure`;
    ``skipped_for_budget``: images left unlabelled because the budget ran out; ``busy``: images another
    worker was labelling; ``calls``: external calls spent; ``stopped``: why the round ended before its
    images did (None: it went through them all).
    """

    city_id: int
    labeller: str
    labelled: int = 0
    boxes: int = 0
    failed: list[Failure] = field(default_factory=list)
    skipped_for_budget: int = 0
    busy: int = 0
    calls: int = 0
    stopped: str | None = None

    def summary(self) -> str:
        """One line for the worker's log."""
        text = (
            f"city {self.city_id}, {self.labeller}: {self.labelled} images labelled ({self.boxes} boxes), "
            f"{len(self.failed)} failed, {self.skipped_for_budget} left for the budget, {self.busy} busy, "
            f"{self.calls} external calls"
        )
        return f"{text}; stopped: {self.stopped}" if self.stopped else text


def label_city(
    conn: psycopg.Connection[Any],
    city_id: int,
    labeller: Labeller,
    store: ImageStore,
    *,
    limit: int = 100,
    unlabelled_only: bool = False,
) -> LabelRun:
    """Label up to ``limit`` of the city's images ``labeller`` has not labelled (``unlabelled_only``: that
    no labeller has), oldest first, and record each labelling (with its boxes, or none). See the module
    docstring; ``conn`` must be autocommit (the budget is spent and each labelling committed at once)."""
    if not conn.autocommit:
        raise UserError("label_city needs an autocommit connection (services.cloud.database.connect)")
    run = LabelRun(city_id, labeller.name)
    sights = labels.sight_names(conn, city_id)
    images = labels.images_to_label(
        conn, city_id, labeller.name, limit=limit, unlabelled_only=unlabelled_only
    )
    if not images:
        return run
    if not sights:
        run.stopped = f"city {city_id} has no sights to label"
        return run
    city_budget = CityBudget(conn, city_id) if labeller.external else None
    if city_budget is not None:
        left = labels.budget_of(conn, city_id)
        if left.remaining <= 0:
            run.skipped_for_budget = len(images)
            run.stopped = _exhausted(left)
            log.info("%s", run.summary())
            return run
    budget: CallBudget = city_budget or UNMETERED
    try:
        for index, image in enumerate(images):
            if not labels.claim(conn, image.id, labeller.name):
                run.busy += 1
                continue
            try:
                outcome = _label_one(
                    conn, image, sights=sights, labeller=labeller, store=store, budget=budget, run=run
                )
            finally:
                labels.release(conn, image.id, labeller.name)
            if outcome == "budget":  # this image and the rest wait for a larger budget
                run.skipped_for_budget = len(images) - index
            if outcome != "next":
                break
    finally:
        if city_budget is not None:
            run.calls = city_budget.calls
    log.info("%s", run.summary())
    return run


def _label_one(
    conn: psycopg.Connection[Any],
    image: labels.ImageToLabel,
    *,
    sights: list[str],
    labeller: Labeller,
    store: ImageStore,
    budget: CallBudget,
    run: LabelRun,
) -> Literal["next", "budget", "stop"]:
    """Label one claimed image into ``run``: "next", or why the round stops ("budget": the budget is used
    up; "stop": the labeller is unavailable), said in ``run.stopped``."""
    if labels.find_labelling(conn, image.id, labeller.name) is not None:  # another worker just did
        return "next"
    try:
        data = store.read(image.s3_key)
    except UserError as exc:
        run.failed.append(Failure(image.id, str(exc), recorded=False))
        return "next"
    try:
        boxes = labeller.label(data, sights, budget=budget)
    except BudgetExhaustedError as exc:
        run.stopped = str(exc) or _exhausted(labels.budget_of(conn, image.city_id))
        return "budget"
    except ImageRejectedError as exc:
        labels.record_labelling(conn, image.id, labeller.name, [], rejected=str(exc))
        run.failed.append(Failure(image.id, str(exc), recorded=True))
        log.warning("image %s rejected by %s: %s", image.id, labeller.name, exc)
        return "next"
    except LabellerUnavailableError as exc:
        run.stopped = str(exc)
        log.warning("labelling city %s stopped: %s", image.city_id, exc)
        return "stop"
    recorded = labels.record_labelling(conn, image.id, labeller.name, boxes)
    if recorded.new:
        run.labelled += 1
        run.boxes += recorded.boxes
    return "next"


def _exhausted(budget: labels.Budget) -> str:
    return (
        f"the labelling budget of city {budget.city_id} is used up ({budget.used} of {budget.budget} "
        f"external calls); raise it to label more"
    )
