"""Recognising a city's sights in a photo with the city's newest READY model.

:meth:`Recogniser.recognise` looks the model up (:func:`~services.sight_catalog.warehouse.ready_model`),
opens it from its ``model_uri`` (an ``s3://`` URL or a path) through the inference library's ONNX detector,
wrapped as a :class:`~services.sight_catalog.labelling.DetectorLabeller` (which letterboxes the photo into the
model's single tile and scales the boxes back), and answers the boxes in the photo's pixels (EXIF orientation
applied), each named by a sight: the model's class names are the city's sight names.

Opened models are kept (least recently used first out, :attr:`Recogniser.capacity` of them) by model id,
version and URI, so a city's requests share one session and a newer READY version is opened on its first
use. A model that cannot be opened (missing object, not an ONNX detector) is not kept: the next request
tries again.

Errors say what to do: :class:`NoModelError` when the city has no READY model (with what it has instead),
:class:`ModelUnavailableError` when its model cannot be opened, :class:`UnreadableImageError` for a file
that is not a photo this can read.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from PIL import Image, UnidentifiedImageError

from services.errors import UserError
from services.sight_catalog import warehouse
from services.sight_catalog.ingest import MAX_PIXELS, sniff
from services.sight_catalog.labelling import DetectorLabeller, ImageRejectedError

#: Boxes scoring under this are not answered (a request may ask for a higher floor).
DEFAULT_SCORE_THRESHOLD = 0.3
#: Models kept open at once.
DEFAULT_CAPACITY = 4


class NoModelError(UserError):
    """The city has no READY model yet; ``training`` is the version in training (None: none is)."""

    def __init__(self, city: warehouse.City, training: warehouse.Model | None, failed: int) -> None:
        self.city = city
        self.training = training
        self.failed = failed
        if training is not None:
            state = f"version {training.version} is training (job {training.training_job_id})"
        elif failed:
            state = f"{failed} training run(s) failed and none is running"
        else:
            state = "no model has been trained yet"
        super().__init__(
            f"{city.name} has no model to recognise its sights with yet: {state}; try again once a version "
            "is READY"
        )


class ModelUnavailableError(UserError):
    """The city's READY model could not be opened (its file is missing or is not a detector)."""


class UnreadableImageError(UserError):
    """The upload is not a JPEG, PNG or WebP photo that can be decoded within the pixel limit."""


@dataclass(frozen=True)
class Found:
    """A sight found on the photo: its name, the score, and its box in the photo's pixels."""

    sight: str
    score: float
    x0: float
    y0: float
    x1: float
    y1: float

    def as_json(self) -> dict[str, Any]:
        """``{"sight", "score", "box": {"x0", "y0", "x1", "y1"}}``, rounded to 0.01 pixel."""
        return {
            "sight": self.sight,
            "score": round(self.score, 4),
            "box": {
                k: round(v, 2)
                for k, v in (("x0", self.x0), ("y0", self.y0), ("x1", self.x1), ("y1", self.y1))
            },
        }


@dataclass(frozen=True)
class Recognition:
    """What :meth:`Recogniser.recognise` found, with the model that looked and the photo's oriented size."""

    city: warehouse.City
    model: warehouse.Model
    width: int
    height: int
    found: list[Found]

    def as_json(self) -> dict[str, Any]:
        """The API's answer."""
        return {
            "city": {"id": self.city.id, "name": self.city.name, "slug": self.city.slug},
            "model": {
                "version": self.model.version,
                "registry_name": self.model.registry_name,
                "registry_version": self.model.registry_version,
            },
            "width": self.width,
            "height": self.height,
            "sights": [f.as_json() for f in self.found],
        }


def check_photo(data: bytes, *, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The photo's stored size (before EXIF orientation) read from its header;
    :class:`UnreadableImageError` when it is empty, not a JPEG, PNG or WebP, or over ``max_pixels``."""
    if not data:
        raise UnreadableImageError("the file is empty: send a JPEG, PNG or WebP photo")
    if sniff(data) is None:
        raise UnreadableImageError(f"not a JPEG, PNG or WebP image ({len(data)} bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImageError(f"cannot read the image: {exc}") from None
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(f"too many pixels to decode safely: {exc}") from None
    if width * height > max_pixels:
        raise UnreadableImageError(f"{width} x {height} pixels is over the limit of {max_pixels} pixels")
    return width, height


ModelKey = tuple[int, int | None, str]


class Recogniser:
    """Recognises sights with each city's newest READY model; see the module docstring.

    ``open_model(model_uri)`` returns the model's bytes or path (default: ``s3://`` through
    :func:`~services.cloud.objects.read_object` with ``s3_client``, anything else as a local path).
    """

    def __init__(
        self,
        *,
        capacity: int = DEFAULT_CAPACITY,
        providers: str = "auto",
        s3_client: Any = None,
        open_model: Callable[[str], bytes | Path] | None = None,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        if capacity < 1:
            raise UserError(f"the model cache holds at least 1 model, not {capacity}")
        self.capacity = capacity
        self.providers = providers
        self.max_pixels = max_pixels
        self._s3_client = s3_client
        self._open_model = open_model or self._read_model
        self._cache: OrderedDict[ModelKey, DetectorLabeller] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._opening: dict[ModelKey, threading.Lock] = {}

    def _read_model(self, uri: str) -> bytes | Path:
        if uri.startswith("s3://"):
            from services.cloud.objects import read_object, s3_client

            if self._s3_client is None:
                self._s3_client = s3_client()
            return read_object(uri, self._s3_client)
        path = Path(uri.removeprefix("file://"))
        if not path.is_file():
            raise ModelUnavailableError(f"the model file {path} does not exist")
        return path

    def cached(self) -> list[ModelKey]:
        """The models open now, least recently used first: ``(model id, registry version, uri)``."""
        with self._cache_lock:
            return list(self._cache)

    def labeller(self, model: warehouse.Model) -> DetectorLabeller:
        """The open detector of ``model`` (a READY model), opened on first use; ModelUnavailableError when
        it cannot be."""
        if model.model_uri is None:
            raise ModelUnavailableError(f"model version {model.version} has no model_uri")
        key: ModelKey = (model.id, model.registry_version, model.model_uri)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            opening = self._opening.setdefault(key, threading.Lock())
        with opening:  # one thread opens a model; the others wait for it
            with self._cache_lock:
                if key in self._cache:
                    return self._cache[key]
            try:
                source = self._open_model(model.model_uri)
                opened = DetectorLabeller.open(
                    source,
                    version=model.version,
                    name=model.registry_name,
                    score_threshold=0.0,
                    providers=self.providers,
                )
            except ModelUnavailableError:
                raise
            except (UserError, OSError, RuntimeError, ValueError) as exc:
                raise ModelUnavailableError(
                    f"cannot open model version {model.version} ({model.model_uri}): {exc}"
                ) from None
            except Exception as exc:  # onnxruntime's own errors (InvalidProtobuf, Fail...) and botocore's
                raise ModelUnavailableError(
                    f"cannot open model version {model.version} ({model.model_uri}): "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            finally:
                with self._cache_lock:
                    self._opening.pop(key, None)
            with self._cache_lock:
                self._cache[key] = opened
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
            return opened

    def model_for(self, conn: psycopg.Connection[Any], city: warehouse.City) -> warehouse.Model:
        """The city's newest READY model; :class:`NoModelError` when it has none."""
        model = warehouse.ready_model(conn, city.id)
        if model is not None:
            return model
        failed = sum(1 for m in warehouse.list_models(conn, city.id) if m.status == "FAILED")
        raise NoModelError(city, warehouse.training_model(conn, city.id), failed)

    def recognise(
        self,
        conn: psycopg.Connection[Any],
        city: warehouse.City,
        photo: bytes,
        *,
        min_score: float = DEFAULT_SCORE_THRESHOLD,
    ) -> Recognition:
        """The city's sights on ``photo`` (encoded bytes) scoring at least ``min_score``, best first."""
        check_photo(photo, max_pixels=self.max_pixels)
        model = self.model_for(conn, city)
        return self.recognise_with(model, city, photo, min_score=min_score)

    def recognise_with(
        self,
        model: warehouse.Model,
        city: warehouse.City,
        photo: bytes,
        *,
        min_score: float = DEFAULT_SCORE_THRESHOLD,
    ) -> Recognition:
        """Like :meth:`recognise` with a model already looked up (no database needed)."""
        check_photo(photo, max_pixels=self.max_pixels)
        labeller = self.labeller(model)
        names = [str(c) for c in model.classes] or list(labeller.detector.class_names)
        try:
            boxes = labeller.label(photo, names)
            with Image.open(io.BytesIO(photo)) as probe:
                width, height = _oriented_size(probe)
        except ImageRejectedError as exc:
            raise UnreadableImageError(str(exc)) from None
        found = [
            Found(b.sight, float(b.score or 0.0), b.x0, b.y0, b.x1, b.y1)
            for b in boxes
            if (b.score or 0.0) >= min_score
        ]
        found.sort(key=lambda f: -f.score)
        return Recognition(city, model, width, height, found)


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """The size ``image`` shows at once its EXIF orientation is applied (5 to 8 swap the sides)."""
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
