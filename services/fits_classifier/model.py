"""A frame classifier in ONNX, with everything needed to use it read from the model itself.

The classifier contract (what ``tessera train classifier`` exports):

- one input ``[N, V, S, S]`` float32, frames prepared by
  :meth:`services.frames.PreprocessSpec.prepare_views` with the spec recorded in the metadata
  (``tessera.frames.*``): ``V`` = 1 (the whole frame; every model before the star stamps) or 2 (whole frame
  and star stamps, ``tessera.frames.stamps``); one output ``[N, classes]`` of logits;
- ``tessera.class_names``: a JSON list, one name per output column;
- ``tessera.good_class``: the name of the class of a frame with nothing wrong (default ``good`` when that
  name is among the classes);
- ``tessera.threshold``: a fault is declared when its probability reaches this (0 < t < 1); below it the
  frame is ``good``. With no good class the verdict is the most probable class.

The model's identity in verdicts is its name (``tessera.name``, else the file's stem) and its version
(``tessera.version``, else ``sha256:`` and the first 16 hex digits of the file's SHA-256), so a retrained
model never shares verdicts with the one before it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import UserError
from services.frames import PreprocessSpec
from services.inference.session import create_session

CLASS_NAMES_KEY = "tessera.class_names"
GOOD_CLASS_KEY = "tessera.good_class"
THRESHOLD_KEY = "tessera.threshold"
NAME_KEY = "tessera.name"
VERSION_KEY = "tessera.version"
DEFAULT_GOOD_CLASS = "good"
#: The classifier that ships with tessera (``services/models/README.md`` says how it was trained).
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "tessera-frame-classifier.onnx"


@dataclass(frozen=True)
class Scores:
    """What the model made of one frame: ``label`` (the verdict's class), its ``score`` and every class's
    probability (``probabilities``, in ``class_names`` order)."""

    label: str
    score: float
    probabilities: dict[str, float]


class FrameClassifier:
    """An ONNX frame classifier; :meth:`classify` takes prepared frames, :meth:`prepare` makes them."""

    def __init__(
        self,
        model: str | Path | bytes,
        *,
        providers: str = "auto",
        threads: int | None = None,
        name: str | None = None,
    ) -> None:
        """Open ``model`` (a path or its bytes; ``name`` stands for the file's stem when bytes are given) and
        read its contract from the metadata; UserError naming what the model lacks."""
        raw = Path(model).read_bytes() if isinstance(model, str | Path) else bytes(model)
        source = str(model) if isinstance(model, str | Path) else f"model {name or 'bytes'}"
        self.sha256 = hashlib.sha256(raw).hexdigest()
        try:
            opened = create_session(raw, providers=providers, intra_op_threads=threads)
        except UserError as error:
            raise UserError(f"{source}: {error}") from error
        self.session = opened.session
        self.provider = opened.provider
        meta: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map or {})
        self.metadata = meta
        stem = Path(model).stem if isinstance(model, str | Path) else (name or "model")
        self.name: str = meta.get(NAME_KEY) or stem
        self.version: str = meta.get(VERSION_KEY) or f"sha256:{self.sha256[:16]}"
        self.class_names = _class_names(source, meta)
        self.spec = _spec(source, meta)
        self.good_class = _good_class(source, meta, self.class_names)
        self.threshold = _threshold(source, meta, self.good_class)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise UserError(
                f"{source}: a classifier has one input and one output; this model has "
                f"{len(inputs)} inputs and {len(outputs)} outputs"
            )
        self.input_name: str = inputs[0].name
        shape = list(inputs[0].shape)
        views = self.spec.views
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != views):
            raise UserError(
                f"{source}: the classifier's input must be [N, {views}, S, S] (its preprocessing makes "
                f"{views} view{'s' if views > 1 else ''} per frame); the model has {shape}"
            )
        size = self.spec.size
        fixed = [d for d in shape[2:] if isinstance(d, int)]
        if any(d != size for d in fixed):
            raise UserError(
                f"{source}: the model's input is {shape[2:]} pixels but its preprocessing makes {size}x{size}"
            )
        width = outputs[0].shape[-1] if outputs[0].shape else None
        if isinstance(width, int) and width != len(self.class_names):
            raise UserError(
                f"{source}: the model has {width} outputs per frame but {len(self.class_names)} class names"
            )

    def describe(self) -> str:
        """One line for people: which model, classes, rule and preprocessing."""
        rule = (
            f"a fault when its probability >= {self.threshold:g}, else {self.good_class}"
            if self.good_class
            else "the most probable class"
        )
        return (
            f"{self.name} {self.version} ({self.provider}): classes {', '.join(self.class_names)}; {rule}; "
            f"{self.spec.describe()}"
        )

    def prepare(self, data: np.ndarray) -> np.ndarray:
        """A frame's 2-D data as the model's input row ``[V, S, S]`` (the spec the model was trained with;
        view 0 is the whole frame)."""
        return self.spec.prepare_views(data)

    def classify(self, batch: np.ndarray) -> list[Scores]:
        """Scores for prepared frames ``[N, V, S, S]``."""
        if batch.ndim != 4 or batch.shape[0] == 0:
            raise ValueError(f"expected a batch [N, V, S, S], got {batch.shape}")
        logits = np.asarray(
            self.session.run(None, {self.input_name: batch.astype(np.float32)})[0], np.float64
        )
        if logits.shape != (batch.shape[0], len(self.class_names)):
            raise UserError(
                f"model {self.name} returned logits of shape {logits.shape} for {batch.shape[0]} frames and "
                f"{len(self.class_names)} classes"
            )
        if not np.isfinite(logits).all():
            raise UserError(
                f"model {self.name} returned non-finite logits: it cannot be trusted on this input"
            )
        shifted = logits - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return [self._verdict(row) for row in probabilities]

    def _verdict(self, row: np.ndarray) -> Scores:
        named = {name: float(p) for name, p in zip(self.class_names, row, strict=True)}
        if self.good_class is None:
            best = int(np.argmax(row))
            return Scores(self.class_names[best], float(row[best]), named)
        faults = [(p, name) for name, p in named.items() if name != self.good_class]
        probability, fault = max(faults)
        if probability >= self.threshold:
            return Scores(fault, probability, named)
        return Scores(self.good_class, named[self.good_class], named)


def _class_names(source: str, meta: dict[str, str]) -> list[str]:
    text = meta.get(CLASS_NAMES_KEY)
    if text is None:
        raise UserError(
            f"{source}: the model's metadata has no {CLASS_NAMES_KEY}; export it with the trainer's "
            "classifier task (tessera train classifier)"
        )
    try:
        names: Any = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{source}: metadata {CLASS_NAMES_KEY} is not JSON: {error}") from error
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"{source}: metadata {CLASS_NAMES_KEY} must be a JSON list of two or more names")
    if len(set(names)) != len(names):
        raise UserError(f"{source}: metadata {CLASS_NAMES_KEY} names a class twice: {names}")
    return names


def _spec(source: str, meta: dict[str, str]) -> PreprocessSpec:
    try:
        return PreprocessSpec.from_metadata(meta)
    except UserError as error:
        raise UserError(f"{source}: {error}") from error


def _good_class(source: str, meta: dict[str, str], names: list[str]) -> str | None:
    good = meta.get(GOOD_CLASS_KEY)
    if good is None:
        return DEFAULT_GOOD_CLASS if DEFAULT_GOOD_CLASS in names else None
    if good not in names:
        raise UserError(f"{source}: metadata {GOOD_CLASS_KEY} is {good!r}, not one of its classes {names}")
    return good


def _threshold(source: str, meta: dict[str, str], good: str | None) -> float:
    text = meta.get(THRESHOLD_KEY)
    if text is None:
        if good is None:
            return 0.0
        raise UserError(
            f"{source}: the model's metadata has no {THRESHOLD_KEY} (the probability at which a fault is "
            "declared); retrain with tessera train classifier, which records it"
        )
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{source}: metadata {THRESHOLD_KEY} must be a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise UserError(f"{source}: metadata {THRESHOLD_KEY} must be between 0 and 1, got {value}")
    return value
