"""The wire format of a model served over the OSML / SageMaker ``POST /invocations`` contract
(:mod:`services.inference.endpoint` says what travels): a tile as an image, and detections as a GeoJSON
FeatureCollection of unlocated features, both ways: what the client sends and reads, and what the server
reads and answers. Only NumPy and Pillow are used.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from services.errors import UserError
from services.inference.detections import Detections

#: The Pillow mode of a tile of 1, 3 or 4 bands.
TILE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
#: A tile encoding's Pillow format and Content-Type.
TILE_FORMATS = {"png": ("PNG", "image/png"), "tiff": ("TIFF", "image/tiff")}


def encode_tile(tile: np.ndarray, encoding: str = "png") -> bytes:
    """One tile ``[C, H, W]`` (float in [0, 1], or uint8) as an 8-bit PNG or TIFF."""
    if tile.dtype != np.uint8:
        tile = np.rint(np.clip(np.nan_to_num(tile.astype(np.float32)), 0.0, 1.0) * 255.0).astype(np.uint8)
    channels = tile.shape[0]
    if channels not in TILE_MODES:
        raise UserError(f"an endpoint tile must have 1, 3 or 4 bands, not {channels}")
    hwc = tile[0] if channels == 1 else np.ascontiguousarray(tile.transpose(1, 2, 0))
    buffer = io.BytesIO()
    # Pillow infers L, RGB or RGBA from the shape of uint8 data.
    Image.fromarray(hwc).save(buffer, format=TILE_FORMATS[encoding][0])
    return buffer.getvalue()


def decode_tile(body: bytes, channels: int, width: int, height: int) -> np.ndarray:
    """An image body as float32 ``[1, C, height, width]`` / 255, zero-padded right and bottom when smaller
    (edge tiles may be). Raises UserError on bodies that are not images or are too large."""
    try:
        image = Image.open(io.BytesIO(body))
    except Exception as exc:  # Pillow raises several types for bad input
        raise UserError(f"the request body is not an image Pillow can read: {excerpt(str(exc), 80)}") from exc
    # Checked before decoding, so a small body that claims a huge image is never decompressed.
    if image.width > width or image.height > height:
        raise UserError(f"tile is {image.width}x{image.height} but the model takes {width}x{height}")
    try:
        image.load()
        array = np.asarray(image.convert(TILE_MODES[channels]))
    except Exception as exc:
        raise UserError(
            f"the request body is not an image Pillow can decode: {excerpt(str(exc), 80)}"
        ) from exc
    if array.ndim == 2:
        array = array[:, :, None]
    out = np.zeros((1, channels, height, width), dtype=np.float32)
    out[0, :, : array.shape[0], : array.shape[1]] = array.transpose(2, 0, 1).astype(np.float32) / 255.0
    return out


def parse_features(doc: Any, label_of: Any, *, source: str = "endpoint") -> Detections:
    """Detections from a GeoJSON FeatureCollection in the OSML convention (module docstring).

    ``label_of`` maps a class name (or an integer class) to a label.
    """
    if (
        not isinstance(doc, dict)
        or doc.get("type") != "FeatureCollection"
        or not isinstance(doc.get("features"), list)
    ):
        raise UserError(f"{source} did not answer a GeoJSON FeatureCollection: {excerpt(json.dumps(doc))}")
    features = doc["features"]
    boxes = np.zeros((len(features), 4), dtype=np.float32)
    scores = np.ones(len(features), dtype=np.float32)
    labels = np.zeros(len(features), dtype=np.int32)
    for i, feature in enumerate(features):
        props = feature.get("properties") if isinstance(feature, dict) else None
        if not isinstance(props, dict):
            raise UserError(f"{source}: feature {i} has no properties")
        try:
            boxes[i] = _bbox(props)
            name, score = _class_and_score(props)
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise UserError(
                f"{source}: feature {i} is malformed ({exc}): {excerpt(json.dumps(props))}"
            ) from exc
        labels[i] = label_of(name)
        scores[i] = score
    return Detections(boxes, scores, labels)


def _bbox(props: dict[str, Any]) -> list[float]:
    box = props.get("imageBBox", props.get("bounds_imcoords"))
    if box is None and isinstance(props.get("imageGeometry"), dict):
        xy = np.asarray(_flatten_coordinates(props["imageGeometry"]["coordinates"]), dtype=np.float64)
        if xy.size == 0:
            raise ValueError("empty imageGeometry")
        xy = xy.reshape(-1, 2)
        return [*xy.min(axis=0).tolist(), *xy.max(axis=0).tolist()]
    if box is None:
        raise KeyError("no imageBBox, bounds_imcoords or imageGeometry")
    values = [float(v) for v in box]
    if len(values) == 6:  # [minx, miny, minz, maxx, maxy, maxz], as RFC 7946 bboxes allow
        values = [values[0], values[1], values[3], values[4]]
    if len(values) != 4:
        raise ValueError(f"a box needs 4 numbers, got {len(values)}")
    return values


def _flatten_coordinates(coords: Any) -> list[float]:
    if isinstance(coords, int | float):
        return [float(coords)]
    if isinstance(coords, list) and coords and isinstance(coords[0], int | float):
        return [float(c) for c in coords[:2]]
    out: list[float] = []
    for c in coords:
        out.extend(_flatten_coordinates(c))
    return out


def _class_and_score(props: dict[str, Any]) -> tuple[str | int, float]:
    classes = props.get("featureClasses", props.get("feature_types"))
    if isinstance(classes, dict):  # the older {name: score}
        classes = [{"iri": k, "score": v} for k, v in classes.items()]
    if isinstance(classes, list) and classes:
        best = max(classes, key=lambda c: float(c.get("score", 1.0)))
        return str(best["iri"]), float(best.get("score", 1.0))
    name = props.get("class", props.get("label"))
    if name is None:
        raise KeyError("no featureClasses, feature_types, class or label")
    score = float(props.get("score", props.get("detection_score", 1.0)))
    return (name if isinstance(name, int) else str(name)), score


def features_of(d: Detections, class_names: Sequence[str]) -> dict[str, Any]:
    """Detections (tile pixels) as an OSML-style FeatureCollection (what ``/invocations`` answers)."""
    features = []
    for (x1, y1, x2, y2), score, label in zip(
        d.boxes.tolist(), d.scores.tolist(), d.labels.tolist(), strict=True
    ):
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        features.append(
            {
                "type": "Feature",
                "geometry": None,
                "properties": {
                    "imageGeometry": {
                        "type": "Polygon",
                        "coordinates": [[[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]],
                    },
                    "imageBBox": [x1, y1, x2, y2],
                    "featureClasses": [{"iri": name, "score": score}],
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def excerpt(payload: bytes | str, limit: int = 200) -> str:
    """``payload`` as one line of text, cut to ``limit`` characters (for messages and logs)."""
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
