"""Detections as columns: dtypes, shapes, and the few operations the pipeline uses."""

from __future__ import annotations

import numpy as np
import pytest

from services.inference.detections import Detections


def sample() -> Detections:
    return Detections(
        np.array([[0, 0, 10, 10], [5, 5, 20, 25], [100, 50, 110, 60]], dtype=np.float64),
        np.array([0.9, 0.2, 0.6]),
        np.array([2, 0, 1], dtype=np.int64),
    )


def test_columns_are_normalised_to_float32_and_int32() -> None:
    d = sample()
    assert d.boxes.dtype == np.float32 and d.scores.dtype == np.float32 and d.labels.dtype == np.int32
    assert d.boxes.shape == (3, 4) and len(d) == 3
    assert d.boxes.flags.c_contiguous


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match=r"boxes must be \[N, 4\]"):
        Detections(np.zeros((3, 5)), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="N = 3 boxes"):
        Detections(np.zeros((3, 4)), np.zeros(2), np.zeros(3))


def test_empty_and_concat() -> None:
    empty = Detections.empty()
    assert len(empty) == 0 and empty.boxes.shape == (0, 4)
    assert len(Detections.concat([])) == 0
    both = Detections.concat([sample(), empty, sample()])
    assert len(both) == 6
    np.testing.assert_array_equal(both.labels, [2, 0, 1, 2, 0, 1])
    # An empty list of boxes (as a model may give) is still [0, 4].
    nothing = np.array([])
    assert Detections(nothing, nothing, nothing).boxes.shape == (0, 4)


def test_select_by_mask_and_index() -> None:
    d = sample()
    np.testing.assert_array_equal(d.select(d.scores > 0.5).labels, [2, 1])
    np.testing.assert_array_equal(d.select(np.array([2, 0])).scores, np.array([0.6, 0.9], np.float32))
    assert len(d.above(0.6)) == 2


def test_shifted_moves_boxes_only() -> None:
    d = sample()
    moved = d.shifted(1000, 2000)
    np.testing.assert_array_equal(moved.boxes[0], [1000, 2000, 1010, 2010])
    np.testing.assert_array_equal(moved.scores, d.scores)
    np.testing.assert_array_equal(d.boxes[0], [0, 0, 10, 10])  # the original is untouched
