"""Score detections against known objects: precision and recall at an IoU threshold.

Matching is the usual greedy one (as in PASCAL VOC / COCO): detections in descending score order each take
the unmatched known object of the same class with the highest IoU >= the threshold. Candidate pairs come
from a grid of box centres, so scoring a whole large scene (hundreds of thousands of boxes) stays near
linear; only boxes that can reach the threshold are ever compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Score:
    """Counts of a matching; precision and recall are 1.0 when their denominators are empty."""

    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def precision(self) -> float:
        """Matched detections / all detections."""
        found = self.true_positives + self.false_positives
        return self.true_positives / found if found else 1.0

    @property
    def recall(self) -> float:
        """Matched known objects / all known objects."""
        known = self.true_positives + self.false_negatives
        return self.true_positives / known if known else 1.0

    def rates(self) -> dict[str, float]:
        """``precision`` and ``recall`` rounded to 4 places, each only where it is defined: no detections
        leave precision out (not 1.0), no known objects leave recall out; the counts say why."""
        rates = {}
        if self.true_positives + self.false_positives:
            rates["precision"] = round(self.precision, 4)
        if self.true_positives + self.false_negatives:
            rates["recall"] = round(self.recall, 4)
        return rates

    def __add__(self, other: Score) -> Score:
        return Score(
            self.true_positives + other.true_positives,
            self.false_positives + other.false_positives,
            self.false_negatives + other.false_negatives,
        )


def score_detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    true_boxes: np.ndarray,
    true_labels: np.ndarray,
    *,
    iou_threshold: float = 0.5,
    class_aware: bool = True,
) -> Score:
    """Match detections (boxes [N, 4] x1 y1 x2 y2, scores [N], labels [N]) to known objects; count the result.

    Filter detections by score before calling (e.g. ``scores >= 0.3``). With ``class_aware=False`` a
    detection may match an object of any class.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    true_boxes = np.asarray(true_boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels, true_labels = np.asarray(labels).reshape(-1), np.asarray(true_labels).reshape(-1)
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    pred_index, true_index, iou = _pairs(boxes, true_boxes, iou_threshold)
    keep = iou >= iou_threshold
    if class_aware:
        keep &= labels[pred_index] == true_labels[true_index]
    pred_index, true_index, iou = pred_index[keep], true_index[keep], iou[keep]

    # Greedy: best-scoring detection first, then its best-overlapping object.
    order = np.lexsort((-iou, -scores[pred_index]))
    pred_taken = np.zeros(len(boxes), bool)
    true_taken = np.zeros(len(true_boxes), bool)
    matched = 0
    for p, t in zip(pred_index[order].tolist(), true_index[order].tolist(), strict=True):
        if not pred_taken[p] and not true_taken[t]:
            pred_taken[p] = true_taken[t] = True
            matched += 1
    return Score(matched, len(boxes) - matched, len(true_boxes) - matched)


def _pairs(boxes: np.ndarray, true_boxes: np.ndarray, threshold: float) -> tuple[np.ndarray, ...]:
    """(detection index, object index, IoU) for every pair that overlaps; found through a centre grid."""
    empty = np.zeros(0, np.int64)
    if len(boxes) == 0 or len(true_boxes) == 0:
        return empty, empty, np.zeros(0)
    true_size = true_boxes[:, 2:] - true_boxes[:, :2]
    size = boxes[:, 2:] - boxes[:, :2]
    # A detection wider (taller) than the widest (tallest) object / threshold can reach IoU >= threshold with
    # nothing; leaving such boxes out keeps the grid cell small.
    reachable = np.flatnonzero(np.all(size <= true_size.max(axis=0) / threshold, axis=1))
    if len(reachable) == 0:
        return empty, empty, np.zeros(0)
    cell = max(float(true_size.max()), float(size[reachable].max()), 1.0)
    # Overlapping boxes have centres less than one cell apart: look in the 3 x 3 neighbouring cells.
    true_cx = np.floor((true_boxes[:, 0] + true_boxes[:, 2]) / (2 * cell)).astype(np.int64)
    true_cy = np.floor((true_boxes[:, 1] + true_boxes[:, 3]) / (2 * cell)).astype(np.int64)
    origin_x, origin_y = true_cx.min() - 1, true_cy.min() - 1
    span = int(true_cx.max() - origin_x) + 2
    keys = (true_cy - origin_y) * span + (true_cx - origin_x)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]

    chosen = boxes[reachable]
    cx = np.floor((chosen[:, 0] + chosen[:, 2]) / (2 * cell)).astype(np.int64) - origin_x
    cy = np.floor((chosen[:, 1] + chosen[:, 3]) / (2 * cell)).astype(np.int64) - origin_y
    pred_parts, true_parts = [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            nx, ny = cx + dx, cy + dy
            inside = (nx >= 0) & (nx < span) & (ny >= 0)
            probe = np.where(inside, ny * span + nx, -1)
            lo = np.searchsorted(sorted_keys, probe, "left")
            hi = np.searchsorted(sorted_keys, probe, "right")
            counts = np.where(inside, hi - lo, 0)
            total = int(counts.sum())
            if total == 0:
                continue
            starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
            pred_parts.append(np.repeat(reachable, counts))
            true_parts.append(order[starts + np.arange(total)])
    if not pred_parts:
        return empty, empty, np.zeros(0)
    pred_index, true_index = np.concatenate(pred_parts), np.concatenate(true_parts)
    return pred_index, true_index, _iou(boxes[pred_index], true_boxes[true_index])


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    width = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    height = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = width * height
    union = np.prod(a[:, 2:] - a[:, :2], axis=1) + np.prod(b[:, 2:] - b[:, :2], axis=1) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
