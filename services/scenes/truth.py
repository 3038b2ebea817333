"""A generated scene's known objects as a file (the truth), and a detections GeoJSON scored against it.

Truth file (``tessera.scene-truth/v1``, JSON)::

    {"schema": "tessera.scene-truth/v1", "image": "scene.tif", "width": 8192, "height": 8192, "seed": 7,
     "classes": ["vehicle", "building", "tank"],
     "objects": [{"class": "vehicle", "pixel_bbox": [x1, y1, x2, y2]}, ...]}

Pixel boxes are in the image's pixels, x2/y2 exclusive, as the model runner's GeoJSON writes its
``pixel_bbox`` property; so a ``tessera run`` output is scored against the truth without any projection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import UserError
from services.scenes.scoring import Score, score_detections
from services.scenes.synthetic import SceneLayout

SCHEMA = "tessera.scene-truth/v1"


@dataclass(frozen=True)
class Truth:
    """Known objects: ``boxes`` float64 [N, 4] pixels (x1, y1, x2, y2); ``labels`` int64 [N] index
    ``classes``."""

    classes: tuple[str, ...]
    boxes: np.ndarray
    labels: np.ndarray


def write_truth(path: Path, layout: SceneLayout, image: str) -> Path:
    """Write ``layout``'s objects as a truth file for the scene at ``image`` (kept as given)."""
    objects = [
        {"class": layout.classes[int(label)], "pixel_bbox": [float(v) for v in box]}
        for box, label in zip(layout.boxes, layout.labels, strict=True)
    ]
    document = {
        "schema": SCHEMA,
        "image": image,
        "width": layout.width,
        "height": layout.height,
        "seed": layout.seed,
        "classes": list(layout.classes),
        "objects": objects,
    }
    path.write_text(json.dumps(document) + "\n", encoding="utf-8")
    return path


def read_truth(path: Path) -> Truth:
    """A truth file's objects; a file that is not one raises UserError saying what is wrong."""
    document = _json(path, "truth file")
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a scene truth file ({SCHEMA}); make one with `tessera scene make`")
    try:
        classes = tuple(str(c) for c in document["classes"])
        index = {name: i for i, name in enumerate(classes)}
        objects = document["objects"]
        boxes = np.array([o["pixel_bbox"] for o in objects], np.float64).reshape(-1, 4)
        labels = np.array([index[o["class"]] for o in objects], np.int64)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(
            f"{path}: a malformed truth file ({error!r}); make it again with `tessera scene make`"
        ) from None
    return Truth(classes, boxes, labels)


def read_detections(path: Path, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel boxes [N, 4], scores [N] and labels [N] (indices into ``classes``; -1 for a class the truth
    does not know) of a model runner GeoJSON's features."""
    document = _json(path, "detections GeoJSON")
    try:
        features = document["features"]
        boxes = np.array([f["properties"]["pixel_bbox"] for f in features], np.float64).reshape(-1, 4)
        scores = np.array([f["properties"]["score"] for f in features], np.float64)
        names = [f["properties"]["class"] for f in features]
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(
            f"{path} is not a model runner GeoJSON (features with pixel_bbox, score and class: {error!r}); "
            "give the output of `tessera run`"
        ) from None
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index.get(name, -1) for name in names], np.int64)
    return boxes, scores, labels


def score_file(detections: Path, truth: Path, *, iou: float = 0.5, min_score: float = 0.0) -> Score:
    """The detections in a GeoJSON matched to a truth file's objects at ``iou`` (those scoring at least
    ``min_score``), by class."""
    if not 0.0 < iou <= 1.0:
        raise UserError(f"--iou must be in (0, 1], got {iou}")
    known = read_truth(truth)
    boxes, scores, labels = read_detections(detections, known.classes)
    keep = scores >= min_score
    return score_detections(
        boxes[keep], scores[keep], labels[keep], known.boxes, known.labels, iou_threshold=iou
    )


def _json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{what} {path} cannot be read as JSON: {error}") from None
