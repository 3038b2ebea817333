"""The bucketed merge gives exactly what the quadratic greedy algorithm gives, on random boxes."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from merge_reference import reference_merge

from services.errors import UserError
from services.inference import merge
from services.inference.detections import Detections
from services.inference.merge import merge_detections, merge_keep

ALGORITHMS = ["nms", "ios", "nms+ios"]


def random_boxes(rng: np.random.Generator, scenario: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = int(rng.integers(40, 250))
    extent = 300.0
    size = rng.uniform(2, 40, (n, 2))
    if scenario == "outliers":  # under 1% of boxes far above the rest: the coarser grid levels
        n = int(rng.integers(150, 300))
        extent = 1000.0
        size = rng.uniform(2, 40, (n, 2))
        size[rng.choice(n, max(1, n // 150), replace=False)] = rng.uniform(100, 700, 2)
    if scenario == "sparse":  # clusters scattered over a huge extent: the binary-search cell lookup
        centres = rng.uniform(-5e6, 5e6, (5, 2))
        xy = centres[rng.integers(0, 5, n)] + rng.uniform(0, 120, (n, 2))
    else:
        xy = rng.uniform(-50, extent, (n, 2))
    boxes = np.concatenate([xy, xy + size], axis=1)
    if scenario == "ties":  # equal areas and equal scores: the tie-breaks must agree
        boxes = np.round(boxes / 4) * 4
    if scenario == "degenerate":  # zero-area, inverted and NaN boxes overlap nothing
        flat = rng.random(n) < 0.1
        boxes[flat, 2] = boxes[flat, 0]
        flip = rng.random(n) < 0.05
        boxes[flip] = boxes[flip][:, [2, 3, 0, 1]]
        boxes[rng.random(n) < 0.03, 1] = np.nan
    scores = rng.random(n)
    if scenario == "ties":
        scores = rng.choice([0.3, 0.5, 0.9], n)
    labels = rng.integers(0, int(rng.integers(1, 4)), n) * (100_000 if scenario == "outliers" else 1)
    return boxes.astype(np.float32), scores.astype(np.float32), labels


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("scenario", ["dense", "outliers", "sparse", "ties", "degenerate"])
def test_bucketed_merge_equals_the_quadratic_one(algorithm: str, scenario: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{algorithm}/{scenario}".encode()))
    paths = set()
    dropped = 0
    for _ in range(12):
        boxes, scores, labels = random_boxes(rng, scenario)
        iou_t = float(rng.choice([0.0, 0.3, 0.5, 0.7]))
        ios_t = float(rng.choice([0.0, 0.5, 0.8, 0.95]))
        keep, new_scores = merge_keep(
            boxes, scores, labels, algorithm=algorithm, iou_threshold=iou_t, ios_threshold=ios_t
        )
        ref_keep, ref_scores = reference_merge(
            boxes, scores, labels, algorithm=algorithm, iou_threshold=iou_t, ios_threshold=ios_t
        )
        np.testing.assert_array_equal(keep, ref_keep)
        np.testing.assert_array_equal(new_scores[keep], ref_scores[ref_keep])
        dropped += int((~keep).sum())
        cols = merge._columns(boxes, scores, labels)
        paths.add("big" if cols.n_small < len(boxes) else "grid")
        paths.add("dense" if cols.cell_starts is not None else "search")
    assert dropped > 0
    # The scenarios reach the code paths they are meant for.
    if scenario == "outliers":
        assert "big" in paths
    if scenario == "sparse":
        assert paths >= {"search"}
    else:
        assert "dense" in paths


def test_large_box_meets_small_boxes_on_every_side() -> None:
    # One box far larger than the rest (its own grid level) whose top-left corner sits just inside a cell
    # of its level, with small same-class boxes straddling each edge and corner, so that some of them
    # start in the row or column before: every pair must still be found.
    rng = np.random.default_rng(3)
    small_xy = rng.uniform(0, 2000, (300, 2))
    small = np.concatenate([small_xy, small_xy + rng.uniform(5, 20, (300, 2))], axis=1)
    probe = np.concatenate([small, [[0, 0, 300, 250]]]).astype(np.float32)
    cols = merge._columns(probe, np.ones(len(probe), np.float32), np.zeros(len(probe)))
    assert cols.n_small == len(probe) - 1
    cell = cols.cell * 2 ** int(cols.big_levels[0])  # the big box's level
    x0 = y0 = cell + 4
    big = np.array([[x0, y0, x0 + 300, y0 + 250]])
    xs = np.array([x0 - 6, x0 + 140, x0 + 294])
    ys = np.array([y0 - 6, y0 + 120, y0 + 244])
    gx, gy = np.meshgrid(xs, ys)
    straddling = np.stack([gx.ravel(), gy.ravel(), gx.ravel() + 10, gy.ravel() + 10], axis=1)
    boxes = np.concatenate([small, straddling, big]).astype(np.float32)
    scores = rng.random(len(boxes)).astype(np.float32)
    labels = np.zeros(len(boxes), np.int64)
    for algorithm in ALGORITHMS:
        for ios_t in (0.0, 0.3, 0.8):
            keep, new_scores = merge_keep(boxes, scores, labels, algorithm=algorithm, ios_threshold=ios_t)
            ref, ref_scores = reference_merge(boxes, scores, labels, algorithm=algorithm, ios_threshold=ios_t)
            np.testing.assert_array_equal(keep, ref)
            np.testing.assert_array_equal(new_scores, ref_scores)
    # The boxes on its top and left edges are 40% inside it, the top-left corner one 16%.
    first = len(small)
    keep, _ = merge_keep(boxes, scores, labels, algorithm="ios", ios_threshold=0.3)
    assert keep[first] and not keep[first + 1] and not keep[first + 3] and keep[-1]
    keep, _ = merge_keep(boxes, scores, labels, algorithm="ios", ios_threshold=0.1)
    assert not keep[first] and keep[-1]


def test_many_boxes_chunked_equal_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunks: pairs from many chunks, and edges resolved over several rounds.
    monkeypatch.setattr(merge, "_PAIRS_PER_CHUNK", 100)
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, 600, (1500, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (1500, 2))], axis=1).astype(np.float32)
    scores = rng.random(1500).astype(np.float32)
    labels = rng.integers(0, 2, 1500)
    for algorithm in ALGORITHMS:
        keep, _ = merge_keep(boxes, scores, labels, algorithm=algorithm)
        ref, _ = reference_merge(boxes, scores, labels, algorithm=algorithm)
        np.testing.assert_array_equal(keep, ref)


def test_crowded_cell_is_merged_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1500 near-identical boxes in one cell (a detector's raw anchors on one object): ~1.1M candidate
    # pairs, processed 50k at a time; one box per class survives.
    monkeypatch.setattr(merge, "_PAIRS_PER_CHUNK", 50_000)
    rng = np.random.default_rng(5)
    boxes = (np.array([100, 100, 140, 130]) + rng.uniform(-2, 2, (1500, 4))).astype(np.float32)
    scores = rng.random(1500).astype(np.float32)
    labels = rng.integers(0, 2, 1500)
    chunks = [len(a) for a, _ in merge._candidate_pairs(merge._columns(boxes, scores, labels))]
    assert len(chunks) > 10 and max(chunks) <= 50_000 + 1500
    keep, _ = merge_keep(boxes, scores, labels)
    ref, _ = reference_merge(boxes, scores, labels)
    np.testing.assert_array_equal(keep, ref)
    assert sorted(labels[keep].tolist()) == [0, 1]


def test_key_sort_packs_or_falls_back_to_argsort() -> None:
    key = np.array([7, 3, 9, 3, 0], dtype=np.int64)
    for n_keys in (10, 1 << 61):  # packed into one int64; too large to pack
        sorted_key, perm = merge._sort_keys(key, n_keys)
        np.testing.assert_array_equal(sorted_key, [0, 3, 3, 7, 9])
        np.testing.assert_array_equal(key[perm], sorted_key)


def test_greedy_order_is_respected_along_a_chain() -> None:
    # a suppresses b; b would suppress c, but b is gone, so c stays (greedy, not transitive).
    boxes = np.array([[0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]], np.float32)
    d = Detections(boxes, np.array([0.9, 0.8, 0.7]), np.zeros(3))
    out = merge_detections(d, iou_threshold=0.3, algorithm="nms")
    np.testing.assert_array_equal(out.boxes, boxes[[0, 2]])


def test_kept_detections_come_back_in_input_order() -> None:
    boxes = np.array([[100, 100, 110, 110], [0, 0, 10, 10], [0, 0, 10, 10.5], [50, 50, 60, 60]], np.float32)
    d = Detections(boxes, np.array([0.2, 0.5, 0.9, 0.4]), np.zeros(4))
    out = merge_detections(d, algorithm="nms")
    np.testing.assert_array_equal(out.boxes, boxes[[0, 2, 3]])


def test_empty_and_single() -> None:
    assert len(merge_detections(Detections.empty())) == 0
    one = Detections(np.array([[0, 0, 5, 5]]), np.array([0.5]), np.array([3]))
    assert len(merge_detections(one)) == 1


def test_bad_settings_are_user_errors() -> None:
    d = Detections.empty()
    with pytest.raises(UserError, match="unknown merge algorithm 'soft-nms'"):
        merge_detections(d, algorithm="soft-nms")
    with pytest.raises(UserError, match="iou_threshold must be between 0 and 1"):
        merge_detections(d, iou_threshold=1.5)
    with pytest.raises(UserError, match="ios_threshold"):
        merge_detections(d, ios_threshold=-0.1)
