"""Detections as columns: dtypes, shapes, and the few operations the pipeline uses."""

from __future__ import annotations

import numpy as np
import pytest

from services.inference.detections import BoxChecks, Detections, check_boxes


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


def test_check_boxes_drops_clips_and_clamps_and_counts_each_kind() -> None:
    nan, inf = float("nan"), float("inf")
    rows = np.array(
        [
            [2, 2, 8, 8, 0.9],  # valid
            [nan, 2, 8, 8, 0.9],  # non-finite coordinate
            [2, 2, 8, 8, nan],  # non-finite score
            [2, 2, -inf, 8, 0.9],  # infinite coordinate
            [8, 2, 2, 8, 0.9],  # inverted x
            [2, 8, 8, 2, 0.9],  # inverted y
            [4, 4, 4, 9, 0.9],  # no width
            [40, 2, 50, 8, 0.9],  # right of the tile
            [-9, -9, -1, -1, 0.9],  # above-left of the tile
            [32, 0, 40, 8, 0.9],  # touching the right side only: outside
            [-4, 20, 6, 40, 0.8],  # partly outside: clipped
            [1, 1, 3, 3, 1.25],  # score past 1: clamped
            [1, 1, 3, 3, -0.5],  # negative score: clamped to 0
        ],
        dtype=np.float32,
    )
    d = Detections(rows[:, :4], rows[:, 4], np.arange(len(rows)))
    checked, checks = check_boxes(d, 32, 30)
    assert checks == BoxChecks(non_finite=3, inverted=3, outside=3, clipped=1, score_clamped=2)
    assert checks.dropped == 9 and checks.changed == 3
    np.testing.assert_array_equal(checked.labels, [0, 10, 11, 12])
    np.testing.assert_array_equal(checked.boxes, [[2, 2, 8, 8], [0, 20, 6, 30], [1, 1, 3, 3], [1, 1, 3, 3]])
    np.testing.assert_allclose(checked.scores, [0.9, 0.8, 1.0, 0.0])
    assert np.isfinite(checked.boxes).all() and np.isfinite(checked.scores).all()


def test_check_boxes_passes_valid_detections_through_untouched() -> None:
    d = sample()
    checked, checks = check_boxes(d, 200, 100)
    assert checked is d and checks == BoxChecks() and checks.dropped == 0
    assert check_boxes(Detections.empty(), 10, 10)[1] == BoxChecks()


def test_box_checks_add_up() -> None:
    total = BoxChecks(1, 2, 3, 4, 5) + BoxChecks(non_finite=1)
    assert total == BoxChecks(2, 2, 3, 4, 5)
    assert total.metrics()["DroppedNonFinite"] == 2 and total.metrics()["ScoresClamped"] == 5
