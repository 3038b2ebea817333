"""Detections as columns: one array per attribute, never one Python object per box.

Every stage of the pipeline (detector output, tile -> image shift, merge, GeoJSON) passes a
:class:`Detections`; a million boxes are three arrays, not a million objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class Detections:
    """Boxes with their scores and class labels, as columns.

    ``boxes`` float32 ``[N, 4]`` as ``(x1, y1, x2, y2)`` in pixels (tile or image, depending on the stage),
    ``scores`` float32 ``[N]``, ``labels`` int32 ``[N]`` (indices into the detector's class names).
    Inputs are converted to those dtypes (no copy when they already are).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        boxes = np.ascontiguousarray(self.boxes, dtype=np.float32)
        scores = np.ascontiguousarray(self.scores, dtype=np.float32)
        labels = np.ascontiguousarray(self.labels, dtype=np.int32)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be [N, 4], got shape {boxes.shape}")
        n = boxes.shape[0]
        if scores.shape != (n,) or labels.shape != (n,):
            raise ValueError(
                f"scores and labels must be [N] with N = {n} boxes, got {scores.shape} and {labels.shape}"
            )
        # Frozen dataclass: the normalised arrays replace what the caller passed.
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def __repr__(self) -> str:
        return f"Detections(n={len(self)})"

    @classmethod
    def empty(cls) -> Detections:
        """No detections."""
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))

    @classmethod
    def concat(cls, parts: Sequence[Detections]) -> Detections:
        """All detections of ``parts``, in order."""
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        return cls(
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.labels for p in parts]),
        )

    def select(self, which: Any) -> Detections:
        """The detections picked by a boolean mask or an index array (any NumPy index)."""
        return Detections(self.boxes[which], self.scores[which], self.labels[which])

    def shifted(self, dx: float, dy: float) -> Detections:
        """The same detections moved by ``(dx, dy)`` pixels (tile -> image coordinates)."""
        offset = np.array([dx, dy, dx, dy], dtype=np.float32)
        return Detections(self.boxes + offset, self.scores, self.labels)

    def above(self, score_threshold: float) -> Detections:
        """The detections scoring at least ``score_threshold``."""
        return self.select(self.scores >= score_threshold)
