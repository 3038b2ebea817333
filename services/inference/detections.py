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

    def split(self, counts: Sequence[int] | np.ndarray) -> list[Detections]:
        """The detections in consecutive groups of ``counts[i]`` (which add up to ``len(self)``): views,
        no copy — e.g. a batch's detections back into its tiles'."""
        ends = np.cumsum(np.asarray(counts, dtype=np.intp))
        total = int(ends[-1]) if len(ends) else 0
        if total != len(self):
            raise ValueError(f"counts add up to {total}, not the {len(self)} detections")
        starts = ends - np.asarray(counts, dtype=np.intp)
        return [
            Detections(self.boxes[a:b], self.scores[a:b], self.labels[a:b])
            for a, b in zip(starts.tolist(), ends.tolist(), strict=True)
        ]

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


@dataclass(frozen=True)
class BoxChecks:
    """What :func:`check_boxes` did to a model's boxes: how many it dropped, and why, and how many it changed.

    ``non_finite``: a NaN or infinite coordinate or score (dropped). ``inverted``: ``x2 <= x1`` or
    ``y2 <= y1``, inverted or without extent (dropped: which corner was meant is not knowable).
    ``outside``: no part inside the tile (dropped). ``clipped``: partly outside the tile (clipped to it).
    ``score_clamped``: a score outside [0, 1] (clamped to it: a model's rounding past 1 keeps its box).
    """

    non_finite: int = 0
    inverted: int = 0
    outside: int = 0
    clipped: int = 0
    score_clamped: int = 0

    def __add__(self, other: BoxChecks) -> BoxChecks:
        return BoxChecks(
            self.non_finite + other.non_finite,
            self.inverted + other.inverted,
            self.outside + other.outside,
            self.clipped + other.clipped,
            self.score_clamped + other.score_clamped,
        )

    @property
    def dropped(self) -> int:
        """Boxes dropped, for any reason."""
        return self.non_finite + self.inverted + self.outside

    @property
    def changed(self) -> int:
        """Boxes kept but altered (clipped or score clamped; one box may count twice)."""
        return self.clipped + self.score_clamped

    def metrics(self) -> dict[str, float]:
        """The counts as metric values (names in services/model_runner/metrics.py)."""
        return {
            "DroppedNonFinite": self.non_finite,
            "DroppedInverted": self.inverted,
            "DroppedOutsideTile": self.outside,
            "ClippedToTile": self.clipped,
            "ScoresClamped": self.score_clamped,
        }


def check_boxes(detections: Detections, width: float, height: float) -> tuple[Detections, BoxChecks]:
    """A model's detections on a ``width`` x ``height`` tile made safe to place and to write, and counts.

    Boxes with a non-finite coordinate or score, inverted or empty boxes and boxes wholly outside the tile
    are dropped; boxes partly outside are clipped to it; scores outside [0, 1] are clamped to it (see
    :class:`BoxChecks`). Already valid detections come back as they are.
    """
    checked, checks, _ = _checked(detections, width, height)
    return checked, checks


def check_tiles(
    every: Detections, counts: Sequence[int] | np.ndarray, width: float, height: float
) -> tuple[list[Detections], BoxChecks]:
    """:func:`check_boxes` for a batch of ``width`` x ``height`` tiles at once: ``every`` holds the tiles'
    detections in tile order, ``counts[i]`` of them tile i's. Per tile its checked detections (views of one
    array, no copy per tile), and what the checks did over the batch. A few array operations per batch
    instead of a dozen per tile."""
    counts = np.asarray(counts, dtype=np.intp)
    if int(counts.sum()) != len(every):
        raise ValueError(
            f"tile counts add up to {int(counts.sum())}, not the batch's {len(every)} detections"
        )
    checked, checks, keep = _checked(every, width, height)
    if keep is not None:
        tile_of = np.repeat(np.arange(len(counts)), counts)[keep]
        counts = np.bincount(tile_of, minlength=len(counts))
    return checked.split(counts), checks


def _checked(
    detections: Detections, width: float, height: float
) -> tuple[Detections, BoxChecks, np.ndarray | None]:
    """:func:`check_boxes`, and the mask of the boxes it kept (None: it kept them all, unchanged)."""
    if not len(detections):
        return detections, BoxChecks(), None
    boxes, scores = detections.boxes, detections.scores
    finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
    x1, y1, x2, y2 = (np.where(finite, boxes[:, i], 0.0) for i in range(4))
    inverted = finite & ((x2 <= x1) | (y2 <= y1))
    outside = finite & ~inverted & ((x2 <= 0) | (y2 <= 0) | (x1 >= width) | (y1 >= height))
    keep = finite & ~inverted & ~outside
    partly = keep & ((x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height))
    unscaled = keep & ((scores < 0) | (scores > 1))
    checks = BoxChecks(
        non_finite=int((~finite).sum()),
        inverted=int(inverted.sum()),
        outside=int(outside.sum()),
        clipped=int(partly.sum()),
        score_clamped=int(unscaled.sum()),
    )
    if checks == BoxChecks():
        return detections, checks, None
    kept = detections.select(keep)
    limits = np.array([width, height, width, height], dtype=np.float32)
    return (
        Detections(np.clip(kept.boxes, 0, limits), np.clip(kept.scores, 0, 1), kept.labels),
        checks,
        keep,
    )
