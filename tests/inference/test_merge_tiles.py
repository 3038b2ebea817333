"""What the merge is for: objects seen by several overlapping tiles come out once, with their full extent."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from services.inference.detections import Detections
from services.inference.merge import drop_edge_truncated, image_edges, merge_detections, whole_boxes_in_image

JITTER = 0.3  # px, on each box side


@dataclass(frozen=True)
class Tile:
    """Window-like: what ``image_edges`` reads from ``services.tiling.windows.Window``."""

    col_off: int
    row_off: int
    width: int
    height: int


def test_object_cut_by_a_tile_edge_comes_out_once_with_its_full_extent() -> None:
    # Tiles of 100 px overlapping by 30: origins 0 and 70. The object spans x 85..105: whole in the second
    # tile, cut at x = 100 by the first. The partial box scores higher than the full one.
    full = [85, 40, 105, 60]
    partial = [85, 40, 100, 60]
    d = Detections(np.array([partial, full], np.float32), np.array([0.95, 0.7]), np.array([1, 1]))
    out = merge_detections(d)
    assert len(out) == 1
    np.testing.assert_array_equal(out.boxes[0], full)
    assert out.scores[0] == pytest.approx(0.95)  # the object keeps its best confidence


def test_object_at_a_tile_corner_seen_whole_once_and_cut_three_times() -> None:
    # 2 x 2 tiles of 100 px, overlap 30 (origins 0 and 70). The object spans 62..82 in x and y: whole in
    # the top-left tile only; the others cut it at x = 70 and/or y = 70 (boxes jittered by a few tenths).
    full = [62.2, 61.8, 82.1, 82.3]
    cut_right = [70.3, 62.0, 81.8, 82.0]
    cut_below = [62.1, 70.2, 82.0, 81.9]
    cut_both = [69.8, 70.1, 82.2, 81.7]
    boxes = np.array([cut_both, cut_right, full, cut_below], np.float32)
    d = Detections(boxes, np.array([0.9, 0.85, 0.6, 0.8]), np.zeros(4))
    out = merge_detections(d)
    assert len(out) == 1
    np.testing.assert_array_equal(out.boxes[0], np.array(full, np.float32))
    # Greedy NMS alone keeps partial boxes whose IoU with the full one is low (here cut_both, IoU 0.36).
    assert len(merge_detections(d, algorithm="nms")) > 1


def test_different_classes_are_never_suppressed() -> None:
    same_box = [10, 10, 50, 50]
    inside = [20, 20, 30, 30]  # a car in a parking lot
    boxes = np.array([same_box, same_box, [10, 10, 50, 50.5], inside], np.float32)
    d = Detections(boxes, np.array([0.9, 0.8, 0.7, 0.95]), np.array([0, 1, 2, 3]))
    for algorithm in ("nms", "ios", "nms+ios"):
        assert len(merge_detections(d, algorithm=algorithm)) == 4
    # The same boxes in one class: one survives.
    assert len(merge_detections(Detections(boxes, d.scores, np.zeros(4)))) == 1


def test_neighbouring_objects_of_one_class_are_kept() -> None:
    boxes = np.array([[0, 0, 20, 20], [18, 0, 38, 20], [0, 21, 20, 41]], np.float32)  # touching, 10% IoU
    out = merge_detections(Detections(boxes, np.array([0.9, 0.8, 0.7]), np.zeros(3)))
    assert len(out) == 3


def tile_grid(extent: int, tile: int, overlap: int) -> np.ndarray:
    origins = np.arange(0, extent - tile + 1, tile - overlap)
    return origins if origins[-1] + tile >= extent else np.append(origins, extent - tile)


def tiled_scene(
    rng: np.random.Generator, *, extent: int = 1000, tile: int = 128, overlap: int = 40
) -> tuple[np.ndarray, np.ndarray, list[tuple[Tile, Detections]]]:
    """Non-overlapping objects (<= 32 px) and what a detector would report per tile, in tile pixels:
    the full box where an object is whole, the visible part (>= 25% in each direction) where cut."""
    cells = extent // 50
    cy, cx = np.divmod(rng.choice(cells * cells, cells * cells // 2, replace=False), cells)
    size = rng.integers(8, 33, (len(cx), 2))
    x1 = cx * 50 + rng.integers(0, 50 - size[:, 0] + 1)
    y1 = cy * 50 + rng.integers(0, 50 - size[:, 1] + 1)
    objects = np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], axis=1).astype(np.float32)
    labels = rng.integers(0, 3, len(objects))
    per_tile = []
    origins = tile_grid(extent, tile, overlap)
    for ty in origins:
        for tx in origins:
            seen = np.clip(objects - [tx, ty, tx, ty], 0, tile)
            extent_seen = seen[:, 2:] - seen[:, :2]
            show = (extent_seen >= 0.25 * size).all(axis=1)
            boxes = seen[show] + rng.uniform(-JITTER, JITTER, (int(show.sum()), 4))
            scores = rng.uniform(0.3, 1.0, len(boxes))
            per_tile.append((Tile(int(tx), int(ty), tile, tile), Detections(boxes, scores, labels[show])))
    return objects, labels, per_tile


def assert_each_object_once(objects: np.ndarray, labels: np.ndarray, merged: Detections) -> None:
    assert len(merged) == len(objects)
    # Objects are at most one per 50 px cell, so the cell of a box's centre names its object.
    centre = (merged.boxes[:, :2] + merged.boxes[:, 2:]) / 2 // 50
    cell_of_object = {(int(x), int(y)): i for i, (x, y) in enumerate(objects[:, :2] // 50)}
    which = np.array([cell_of_object[(int(x), int(y))] for x, y in centre])
    assert sorted(which.tolist()) == list(range(len(objects)))
    np.testing.assert_array_equal(merged.labels, labels[which])
    # Full extent, up to what geometry cannot tell apart: a box cut by less than the jitter can add back
    # (each of 4 sides moves by up to JITTER, so about 8 x JITTER in width + height) may win.
    np.testing.assert_allclose(merged.boxes, objects[which], atol=8 * JITTER)


def test_tiled_scene_merges_to_the_known_objects() -> None:
    rng = np.random.default_rng(11)
    objects, labels, per_tile = tiled_scene(rng)
    everything = Detections.concat([d.shifted(t.col_off, t.row_off) for t, d in per_tile])
    assert len(everything) > 1.3 * len(objects)  # plenty of duplicates and partials
    assert_each_object_once(objects, labels, merge_detections(everything))


def test_dropping_edge_truncated_boxes_then_nms_also_merges_exactly() -> None:
    rng = np.random.default_rng(12)
    objects, labels, per_tile = tiled_scene(rng)
    kept = []
    for tile, d in per_tile:
        edges = image_edges(tile, 1000, 1000)
        kept.append(
            drop_edge_truncated(d, (tile.width, tile.height), edges, margin=0.5).shifted(
                tile.col_off, tile.row_off
            )
        )
    assert_each_object_once(objects, labels, merge_detections(Detections.concat(kept), algorithm="nms"))


def test_edge_truncated_boxes_touch_interior_sides_only() -> None:
    boxes = np.array(
        [[0, 40, 10, 50], [40, 0, 50, 10], [90, 40, 100, 50], [40, 90, 50, 100], [40, 40, 50, 50]], np.float32
    )
    d = Detections(boxes, np.ones(5), np.zeros(5))
    # Interior tile: every box touching a side goes.
    np.testing.assert_array_equal(drop_edge_truncated(d, (100, 100), (False,) * 4).boxes, boxes[[4]])
    # The top-left tile of the image: its left and top sides are the image's, so those boxes stay.
    top_left = image_edges(Tile(0, 0, 100, 100), 1000, 1000)
    assert top_left == (True, True, False, False)
    np.testing.assert_array_equal(drop_edge_truncated(d, (100, 100), top_left).boxes, boxes[[0, 1, 4]])
    # The last tile, shifted back to end at the image's right and bottom edges.
    assert image_edges(Tile(900, 900, 100, 100), 1000, 1000) == (False, False, True, True)


@pytest.mark.parametrize("margin", [1.0, 3.5, None])
def test_a_batch_at_once_keeps_and_shifts_what_each_tile_alone_would(margin: float | None) -> None:
    """whole_boxes_in_image (many tiles at once: the pipeline passes a region's) against drop_edge_truncated
    and a shift, tile by tile: the same boxes, bit for bit, in the same order — interior tiles, tiles on
    each image edge, a short edge tile, and tiles with no boxes."""
    rng = np.random.default_rng(7)
    width, height = 250, 180
    tiles = [
        Tile(c, r, min(100, width - c), min(100, height - r)) for r in (0, 70, 140) for c in (0, 70, 150)
    ]
    found = []
    for i, tile in enumerate(tiles):
        n = 0 if i in (2, 5) else int(rng.integers(1, 12))
        x1 = rng.uniform(-1, tile.width - 5, n)
        y1 = rng.uniform(-1, tile.height - 5, n)
        x2 = np.minimum(x1 + rng.uniform(2, 40, n), tile.width)  # some reach the tile's far sides
        y2 = np.minimum(y1 + rng.uniform(2, 40, n), tile.height)
        boxes = np.stack([np.maximum(x1, 0), np.maximum(y1, 0), x2, y2], axis=1)
        found.append(Detections(boxes, rng.uniform(0.3, 1, n), rng.integers(0, 3, n)))
    expected = []
    for d, tile in zip(found, tiles, strict=True):
        kept = d
        if margin is not None:
            edges = image_edges(tile, width, height)
            kept = drop_edge_truncated(d, (tile.width, tile.height), edges, margin=margin)
        expected.append(kept.shifted(tile.col_off, tile.row_off))
    want = Detections.concat(expected)
    got = whole_boxes_in_image(found, tiles, width, height, margin=margin)
    assert 0 < len(got) < sum(len(d) for d in found) or margin is None
    np.testing.assert_array_equal(got.boxes, want.boxes)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.labels, want.labels)
    assert len(whole_boxes_in_image([Detections.empty()] * 2, tiles[:2], width, height)) == 0
