"""Detections as columns: dtypes, shapes, and the few operations the pipeline uses."""

from __future__ import annotations

import numpy as np
import pytest

from services.inference.detections import BoxChecks, Detections, check_boxes, check_tiles


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


def test_split_gives_each_group_its_rows_as_views() -> None:
    d = Detections.concat([sample(), sample()])
    first, none, rest = d.split([2, 0, 4])
    np.testing.assert_array_equal(first.labels, [2, 0])
    assert len(none) == 0 and none.boxes.shape == (0, 4)
    np.testing.assert_array_equal(rest.labels, [1, 2, 0, 1])
    assert np.shares_memory(rest.boxes, d.boxes)
    with pytest.raises(ValueError, match="add up to 5, not the 6"):
        d.split([2, 3])
    with pytest.raises(ValueError, match="add up to 0, not the 6"):
        d.split([])
    assert Detections.empty().split([]) == []


def test_check_tiles_is_check_boxes_per_tile() -> None:
    """A batch checked at once: every tile gets what check_boxes gives it alone, the counts add up, and a
    tile whose boxes were all dropped (or that had none) comes back empty in its place."""
    nan = float("nan")
    tiles = [
        Detections(np.array([[2, 2, 8, 8], [nan, 1, 2, 3]]), np.array([0.9, 0.5]), np.array([1, 2])),
        Detections.empty(),
        Detections(np.array([[40, 2, 50, 8]]), np.array([0.7]), np.array([3])),  # outside: dropped
        Detections(np.array([[-4, 20, 6, 40], [1, 1, 3, 3]]), np.array([0.8, 1.5]), np.array([4, 5])),
    ]
    checked, checks = check_tiles(Detections.concat(tiles), [len(t) for t in tiles], 32, 30)
    alone = [check_boxes(t, 32, 30) for t in tiles]
    assert checks == sum((c for _, c in alone), BoxChecks())
    assert checks == BoxChecks(non_finite=1, outside=1, clipped=1, score_clamped=1)
    assert [len(c) for c in checked] == [1, 0, 0, 2]
    for got, (want, _) in zip(checked, alone, strict=True):
        np.testing.assert_array_equal(got.boxes, want.boxes)
        np.testing.assert_array_equal(got.scores, want.scores)
        np.testing.assert_array_equal(got.labels, want.labels)
    # Nothing to fix: the tiles come back as they were, as views of the batch's arrays.
    valid = [sample(), Detections.empty(), sample()]
    every = Detections.concat(valid)
    back, none = check_tiles(every, [3, 0, 3], 200, 100)
    assert none == BoxChecks() and [len(b) for b in back] == [3, 0, 3]
    assert np.shares_memory(back[2].boxes, every.boxes)
    with pytest.raises(ValueError, match="add up to 5, not the batch's 6"):
        check_tiles(every, [3, 0, 2], 200, 100)


def test_box_checks_add_up() -> None:
    total = BoxChecks(1, 2, 3, 4, 5) + BoxChecks(non_finite=1)
    assert total == BoxChecks(2, 2, 3, 4, 5)
    assert total.metrics()["DroppedNonFinite"] == 2 and total.metrics()["ScoresClamped"] == 5
