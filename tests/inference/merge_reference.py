"""The quadratic merge the bucketed one must reproduce exactly: one box at a time, in greedy order."""

from __future__ import annotations

import numpy as np


def reference_merge(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    algorithm: str = "nms+ios",
    iou_threshold: float = 0.5,
    ios_threshold: float = 0.8,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep mask and scores, by the rules of ``services.inference.merge`` (module docstring):
    containment pass (largest width + height first; a kept box takes the best score of the boxes it
    contains),
    then greedy NMS (highest score first) on what is left. Same float32 arithmetic as the real thing."""
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32).copy()
    labels = np.asarray(labels)
    n = len(boxes)
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[:, i]) for i in range(4))
    area = np.fmax(x2 - x1, 0) * np.fmax(y2 - y1, 0)
    size = np.fmax(x2 - x1, 0) + np.fmax(y2 - y1, 0)
    index = np.arange(n)
    keep = np.ones(n, dtype=bool)

    def intersection(i: int) -> np.ndarray:
        iw = np.minimum(x2[i], x2) - np.maximum(x1[i], x1)
        ih = np.minimum(y2[i], y2) - np.maximum(y1[i], y1)
        return np.where((iw > 0) & (ih > 0), iw * ih, np.float32(0))

    def greedy(order: np.ndarray, overlaps: object, promote: bool) -> tuple[np.ndarray, np.ndarray]:
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n)
        alive = keep.copy()
        suppressed = ~alive
        new_scores = scores.copy()
        for i in order:
            if suppressed[i]:
                continue
            hit = overlaps(i) & (labels == labels[i]) & (rank > rank[i]) & alive  # type: ignore[operator]
            if promote and hit.any():
                new_scores[i] = max(new_scores[i], scores[hit].max())
            suppressed |= hit
        return ~suppressed, new_scores

    if algorithm != "nms":
        order = np.lexsort((index, -scores, -size))
        keep, scores = greedy(
            order, lambda i: intersection(i) > ios_threshold * np.minimum(area[i], area), promote=True
        )
    if algorithm != "ios":
        order = np.lexsort((index, -scores))

        def iou(i: int) -> np.ndarray:
            inter = intersection(i)
            return inter > iou_threshold * (area[i] + area - inter)

        keep, _ = greedy(order, iou, promote=False)
    return keep, scores
