"""Decoding the raw head of Ultralytics YOLO detection exports (YOLOv8 / YOLO11 ``.onnx``).

Such a model has one output ``[N, 4 + classes, anchors]``: for each anchor, the box as ``(cx, cy, w, h)``
in input pixels, then one (already sigmoid-ed) score per class. No NMS is inside the model.
"""

from __future__ import annotations

import ast
import json

import numpy as np

from services.inference.detections import BoxChecks, Detections, check_boxes
from services.inference.merge import merge_detections


def decode_yolo(
    raw: np.ndarray,
    *,
    score_threshold: float,
    iou_threshold: float,
    tile_width: int,
    tile_height: int,
) -> tuple[list[Detections], BoxChecks]:
    """Per tile: best class and its score per anchor, scores below ``score_threshold`` dropped, the rest
    checked (:func:`check_boxes`: non-finite, inverted and off-tile boxes dropped, boxes clipped to the tile,
    as Ultralytics clips), then class-aware greedy NMS at ``iou_threshold``. Also what the checks did."""
    raw = np.asarray(raw, dtype=np.float32)
    class_scores = raw[:, 4:, :]
    labels = class_scores.argmax(axis=1)  # [N, anchors]
    scores = np.take_along_axis(class_scores, labels[:, None, :], axis=1)[:, 0, :]
    out: list[Detections] = []
    checks = BoxChecks()
    for i in range(raw.shape[0]):
        # A NaN score is not "below the threshold": it goes on to be counted as non-finite.
        keep = np.flatnonzero(~(scores[i] < score_threshold))
        cx, cy, w, h = raw[i, :4, keep].T if keep.size else np.zeros((4, 0), np.float32)
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        valid, found = check_boxes(
            Detections(boxes, scores[i, keep], labels[i, keep]), tile_width, tile_height
        )
        checks += found
        out.append(merge_detections(valid, iou_threshold=iou_threshold, algorithm="nms"))
    return out, checks


def ultralytics_class_names(metadata: dict[str, str], n_classes: int) -> list[str] | None:
    """Class names from an Ultralytics export's ``names`` metadata (a Python dict literal such as
    ``{0: 'car', 1: 'truck'}``), or None when absent or unreadable."""
    text = metadata.get("names")
    if not text:
        return None
    try:
        names = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        try:
            names = json.loads(text)
        except ValueError:
            return None
    if isinstance(names, dict):
        try:
            return [str(names[k]) for k in sorted(names, key=int)][:n_classes]
        except (TypeError, ValueError):
            return None
    if isinstance(names, list):
        return [str(n) for n in names][:n_classes]
    return None
