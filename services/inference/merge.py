"""Merging the detections of overlapping tiles: exact greedy NMS and a containment rule, spatially bucketed.

Why a merge is needed. Tiles overlap, so an object near a tile seam is seen by several tiles: wholly by
some (near-identical *full* boxes) and cut by the edges of others (*partial* boxes, each contained in the
full box). The merged output must hold the object once, with its full extent.

The rules (class-aware: boxes of different classes never suppress each other):

- ``"nms"``: exact greedy non-maximum suppression. Boxes are visited by score, highest first (ties: lower
  index first); a box is dropped when a box kept before it has IoU > ``iou_threshold`` with it.
- ``"ios"``: containment. IoS is the intersection over the *smaller* box's area. Boxes are visited by
  size (width + height), largest first (ties: higher score, then lower index); a box is dropped when a
  box kept before it has IoS > ``ios_threshold`` with it. The kept box takes the highest score among the
  boxes it dropped, so the object keeps its best confidence and its full extent. Ordering by size rather
  than by score is what makes a partial box lose to the full box even when the detector scored the
  partial one higher; width + height rather than area, because a cut shortens one side while the
  detector's jitter moves all of them, and area would let jitter on a long side outweigh a cut on it.
- ``"nms+ios"`` (default): the containment pass, then NMS on what it kept (IoU catches shifted
  duplicates that neither contains the other).

Conditions under which an object cut by a tile edge comes out once, with its full extent:

1. The tile overlap is at least the largest object's size (plus the detector's box jitter), so every
   object lies wholly inside at least one tile and that tile reports its full box.
2. A partial box (the object clipped by another tile's edge) lies inside the full box, up to
   ``1 - ios_threshold`` of its area (box jitter).
3. Objects of one class do not contain one another (a same-class box that covers most of another is taken
   for the same object). Nested objects of different classes are fine.

Cost. Boxes are hashed into a grid whose cell is the largest box side (boxes above twice the 99th
percentile side go to coarser grids, one per power of two, so a few huge boxes cannot blow the cell up);
a box is compared only with boxes of its class in its own and the neighbouring cells. Two boxes that
overlap have top-left corners less than one cell apart, so this misses no pair: the result is exactly
that of the quadratic algorithm, in time near-linear in the number of boxes. The greedy order is then
resolved on the (few) suppression edges in rounds of vectorised NumPy, one round per link of the longest
chain of boxes that suppress one another.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from services.errors import UserError
from services.inference.detections import Detections

#: The merge rules (see above); a request's JSON and the model runner's job records carry these strings.
MergeAlgorithm = Literal["nms", "ios", "nms+ios"]
ALGORITHMS: tuple[MergeAlgorithm, ...] = ("nms", "ios", "nms+ios")

#: Candidate pairs per chunk: bounds the temporary arrays even where many boxes crowd one cell.
_PAIRS_PER_CHUNK = 1 << 17
#: Boxes sampled to estimate the 99th-percentile side (exactness does not depend on it).
_SIDE_SAMPLE = 1 << 16
#: Most grid cells per box for which the cell-start table is dense (4 bytes a cell).
_DENSE_CELLS_PER_BOX = 16


def merge_detections(
    d: Detections,
    *,
    iou_threshold: float = 0.5,
    ios_threshold: float = 0.8,
    algorithm: MergeAlgorithm = "nms+ios",
) -> Detections:
    """Drop duplicate and partial detections (see the module docstring for the rules and conditions).

    ``d`` holds boxes in one coordinate frame (image pixels, after shifting each tile's boxes). Returns
    the kept detections in their input order; with ``"ios"`` and ``"nms+ios"`` a kept box may carry a
    higher score taken from a box it absorbed.
    """
    keep, scores = merge_keep(
        d.boxes,
        d.scores,
        d.labels,
        iou_threshold=iou_threshold,
        ios_threshold=ios_threshold,
        algorithm=algorithm,
    )
    return Detections(d.boxes[keep], scores[keep], d.labels[keep])


def merge_keep(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    iou_threshold: float = 0.5,
    ios_threshold: float = 0.8,
    algorithm: MergeAlgorithm = "nms+ios",
) -> tuple[np.ndarray, np.ndarray]:
    """The merge on bare columns: a keep mask ``[N]`` and the (possibly raised) scores ``[N]``."""
    if algorithm not in ALGORITHMS:
        raise UserError(f"unknown merge algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    for name, value in (("iou_threshold", iou_threshold), ("ios_threshold", ios_threshold)):
        if not 0.0 <= float(value) <= 1.0:
            raise UserError(f"{name} must be between 0 and 1, got {value}")
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    n = boxes.shape[0]
    if n < 2:
        return np.ones(n, dtype=bool), scores.copy()
    cols = _columns(boxes, scores, labels)
    iou_src, iou_dst, ios_src, ios_dst = _edges(
        cols,
        float(iou_threshold),
        float(ios_threshold),
        want_iou=algorithm != "ios",
        want_ios=algorithm != "nms",
    )
    keep = np.ones(n, dtype=bool)
    out_scores = cols.score.copy()
    if algorithm != "nms":
        # Containment pass: the larger box (width + height) wins (ties: higher score, then lower index).
        src, dst = _directed(ios_src, ios_dst, cols.size, cols.score, cols.order)
        suppressed = _greedy_suppressed(n, src, dst)
        keep &= ~suppressed
        kept_src = ~suppressed[src]
        np.maximum.at(out_scores, src[kept_src], cols.score[dst[kept_src]])
    if algorithm != "ios":
        alive = keep[iou_src] & keep[iou_dst]
        src, dst = _directed(iou_src[alive], iou_dst[alive], None, out_scores, cols.order)
        keep &= ~_greedy_suppressed(n, src, dst)
    # Back from grid order to input order.
    keep_in = np.empty(n, dtype=bool)
    keep_in[cols.order] = keep
    scores_in = np.empty(n, dtype=np.float32)
    scores_in[cols.order] = out_scores
    return keep_in, scores_in


@dataclass(frozen=True)
class _Columns:
    """Box columns permuted into grid order (``order[i]`` is the input index of row ``i``)."""

    x1: np.ndarray
    y1: np.ndarray
    x2: np.ndarray
    y2: np.ndarray
    area: np.ndarray
    size: np.ndarray  # width + height: the containment pass's order
    score: np.ndarray
    order: np.ndarray
    # Grid of the level-0 boxes, in grid order: cell key per box and cumulative counts per key.
    key: np.ndarray
    cell_starts: np.ndarray | None
    row_stride: int
    n_small: int
    # Boxes too large for the level-0 grid (input order indices live in ``order[n_small:]``).
    big_levels: np.ndarray
    class_ids: np.ndarray  # only when there are big boxes (the coarse grids need it)
    cell: float


def _columns(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> _Columns:
    n = boxes.shape[0]
    x1 = np.ascontiguousarray(boxes[:, 0])
    y1 = np.ascontiguousarray(boxes[:, 1])
    x2 = np.ascontiguousarray(boxes[:, 2])
    y2 = np.ascontiguousarray(boxes[:, 3])
    w = x2 - x1
    h = y2 - y1
    # NaN and inverted boxes have no area and overlap nothing; give them a harmless grid position.
    side = np.fmax(np.fmax(w, h), 0)
    gx0 = x1
    gy0 = y1
    if not (np.isfinite(x1).all() and np.isfinite(y1).all()):
        gx0 = np.where(np.isfinite(x1), x1, 0).astype(np.float32)
        gy0 = np.where(np.isfinite(y1), y1, 0).astype(np.float32)
        side = np.where(np.isfinite(side), side, 0).astype(np.float32)
    class_ids = _class_ids(labels)

    sample = side[:: max(1, n // _SIDE_SAMPLE)]
    cut = 2.0 * float(np.percentile(sample, 99))
    small = side <= cut
    all_small = bool(small.all())
    cell = float(side.max()) if all_small else float(side[small].max(initial=0.0))
    span = float(max(np.ptp(gx0), np.ptp(gy0), 1.0))
    # Slightly larger than the largest side so that float rounding never puts two overlapping boxes two
    # cells apart; the floor keeps the grid's integer keys bounded whatever the extent.
    cell = max(cell * (1 + 1e-4), span / float(1 << 20), 1e-3)

    if all_small:
        idx_small = np.arange(n)
        big_levels = np.zeros(0, dtype=np.int64)
        idx_big = np.zeros(0, dtype=np.int64)
    else:
        idx_small = np.flatnonzero(small)
        idx_big = np.flatnonzero(~small)
        # Padded like the base cell, so a box never sits exactly on its level's cell size.
        big_levels = np.ceil(np.log2(side[idx_big].astype(np.float64) * (1 + 1e-4) / cell)).astype(np.int64)
        big_levels = np.maximum(big_levels, 1)
    gx = np.floor(gx0[idx_small].astype(np.float64) / cell).astype(np.int64)
    gy = np.floor(gy0[idx_small].astype(np.float64) / cell).astype(np.int64)
    key, row_stride, n_keys = _cell_keys(gx, gy, class_ids[idx_small])
    key, local = _sort_keys(key, n_keys)
    order = idx_small[local]
    cell_starts: np.ndarray | None = None
    # A dense table of cell starts is the fastest lookup; past a few cells per box (sparse boxes over a
    # vast extent) binary search on the sorted keys takes over.
    if n_keys <= _DENSE_CELLS_PER_BOX * len(key) + (1 << 22):
        dtype = np.int32 if n < 1 << 31 else np.int64
        cell_starts = np.zeros(n_keys + 1, dtype=dtype)
        counts = np.bincount(key, minlength=n_keys).astype(dtype, copy=False)
        np.cumsum(counts, dtype=dtype, out=cell_starts[1:])
    if idx_big.size:
        by_level = np.argsort(big_levels, kind="stable")
        order = np.concatenate([order, idx_big[by_level]])
        big_levels = big_levels[by_level]
    x1, y1, x2, y2 = x1[order], y1[order], x2[order], y2[order]
    # Computed after the permutation: arithmetic is cheaper than more random gathers.
    w = np.fmax(x2 - x1, 0)
    h = np.fmax(y2 - y1, 0)
    return _Columns(
        x1=x1,
        y1=y1,
        x2=x2,
        y2=y2,
        area=w * h,
        size=w + h,
        score=scores[order],
        order=order,
        key=key,
        cell_starts=cell_starts,
        row_stride=row_stride,
        n_small=len(idx_small),
        big_levels=big_levels,
        class_ids=class_ids[order] if idx_big.size else class_ids[:0],
        cell=cell,
    )


def _sort_keys(key: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """The keys sorted, and the permutation that sorts them. Key and index packed into one int64 and
    sorted by value is about three times faster than an argsort; argsort where they do not fit."""
    bits = max(1, (len(key) - 1).bit_length())
    if n_keys >= 1 << (62 - bits):
        local = np.argsort(key)
        return key[local], local
    packed = (key << bits) | np.arange(len(key), dtype=np.int64)
    packed.sort()
    return packed >> bits, packed & ((1 << bits) - 1)


def _class_ids(labels: np.ndarray) -> np.ndarray:
    """Labels as dense non-negative integers (so they can lead a grid key)."""
    lab = np.asarray(labels).astype(np.int64)
    if lab.size == 0:
        return lab
    lo, hi = int(lab.min()), int(lab.max())
    if hi - lo < 1 << 16:
        return lab - lo
    return np.unique(lab, return_inverse=True)[1].astype(np.int64).reshape(-1)


def _cell_keys(gx: np.ndarray, gy: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Integer keys ordered by (class, row, column) with an empty column on each side and an empty row
    below, so that the neighbour cells ``key + 1`` and ``key + W - 1 .. key + W + 1`` never wrap into
    another row or class. Returns the keys, the row stride W and the number of keys."""
    if gx.size == 0:
        return np.zeros(0, dtype=np.int64), 3, 1
    gx = gx - gx.min() + 1
    gy = gy - gy.min()
    width = int(gx.max()) + 2
    height = int(gy.max()) + 2
    n_classes = int(cls.max()) + 1
    key = (cls * height + gy) * width + gx
    return key, width, n_classes * height * width


def _edges(
    c: _Columns, iou_t: float, ios_t: float, *, want_iou: bool, want_ios: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Undirected same-class pairs (grid-order indices) whose IoU, resp. IoS, exceeds the threshold."""
    iou_a: list[np.ndarray] = []
    iou_b: list[np.ndarray] = []
    ios_a: list[np.ndarray] = []
    ios_b: list[np.ndarray] = []
    for first, second in _candidate_pairs(c):
        # x overlap first: it rejects most candidates with half the gathers.
        iw = np.minimum(c.x2[first], c.x2[second]) - np.maximum(c.x1[first], c.x1[second])
        hit = np.flatnonzero(iw > 0)
        a, b, iw = first[hit], second[hit], iw[hit]
        ih = np.minimum(c.y2[a], c.y2[b]) - np.maximum(c.y1[a], c.y1[b])
        hit = np.flatnonzero(ih > 0)
        a, b = a[hit], b[hit]
        inter = iw[hit] * ih[hit]
        area_a = c.area[a]
        area_b = c.area[b]
        if want_iou:
            m = inter > iou_t * (area_a + area_b - inter)
            iou_a.append(a[m])
            iou_b.append(b[m])
        if want_ios:
            m = inter > ios_t * np.minimum(area_a, area_b)
            ios_a.append(a[m])
            ios_b.append(b[m])
    return _cat(iou_a), _cat(iou_b), _cat(ios_a), _cat(ios_b)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _candidate_pairs(c: _Columns) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every unordered pair of same-class boxes that could overlap, each once, in chunks."""
    key = c.key
    w = c.row_stride
    pos = np.arange(c.n_small)
    # The half neighbourhood as two runs of consecutive keys: the rest of this cell plus the next cell
    # in the row (from pos + 1 to end_a), and the three cells of the row below (start_b to end_b).
    if c.cell_starts is not None:
        end_a = c.cell_starts[key + 2]
        start_b = c.cell_starts[key + (w - 1)]
        end_b = c.cell_starts[key + (w + 2)]
    else:
        end_a = np.searchsorted(key, key + 2)
        start_b = np.searchsorted(key, key + (w - 1))
        end_b = np.searchsorted(key, key + (w + 2))
    pairs = np.cumsum((end_a - pos - 1) + (end_b - start_b))
    bounds = np.searchsorted(
        pairs, np.arange(_PAIRS_PER_CHUNK, int(pairs[-1]) if pairs.size else 0, _PAIRS_PER_CHUNK)
    )
    for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), c.n_small], strict=True):
        if hi > lo:
            yield _expand(pos[lo:hi], pos[lo:hi] + 1, end_a[lo:hi])
            yield _expand(pos[lo:hi], start_b[lo:hi], end_b[lo:hi])
    yield from _big_pairs(c)


def _expand(query: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (query[i], j) for every j in [start[i], end[i])."""
    count = end - start
    total = int(count.sum())
    if total == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    first = np.cumsum(count) - count
    a = np.repeat(query, count)
    b = np.arange(total, dtype=np.int64) + np.repeat(start - first, count)
    return a, b


def _big_pairs(c: _Columns) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs involving boxes too large for the level-0 grid: per level (cell = base cell x 2^level), the
    level's boxes against every box of that level or below, in the full 3 x 3 neighbourhood."""
    n_small = c.n_small
    n = len(c.order)
    if n_small == n:
        return
    levels = c.big_levels
    for level in np.unique(levels):
        cell = c.cell * float(2 ** int(level))
        n_targets = n_small + int(np.searchsorted(levels, level, side="right"))
        first_query = n_small + int(np.searchsorted(levels, level, side="left"))
        x1 = np.nan_to_num(c.x1[:n_targets].astype(np.float64), posinf=0.0, neginf=0.0)
        y1 = np.nan_to_num(c.y1[:n_targets].astype(np.float64), posinf=0.0, neginf=0.0)
        # The row above a class's first row is the previous class's empty padding row (or a negative
        # key), so the full neighbourhood needs no extra padding.
        key, w, _ = _cell_keys(
            np.floor(x1 / cell).astype(np.int64),
            np.floor(y1 / cell).astype(np.int64),
            c.class_ids[:n_targets],
        )
        order = np.argsort(key)
        sorted_key = key[order]
        queries = np.arange(first_query, n_targets)
        qk = key[first_query:n_targets]
        for row in (-w, 0, w):
            start = np.searchsorted(sorted_key, qk + (row - 1))
            end = np.searchsorted(sorted_key, qk + (row + 2))
            a, b = _expand(queries, start, end)
            b = order[b]
            # Same-level pairs appear from both ends: keep one; never pair a box with itself.
            one = (b < first_query) | (b > a)
            yield a[one], b[one]


def _directed(
    a: np.ndarray, b: np.ndarray, size: np.ndarray | None, score: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Orient each pair from the box that comes first in the greedy order to the other.

    Order: larger ``size`` first when given, then higher score, then lower input index.
    """
    sa, sb = score[a], score[b]
    a_first = (sa > sb) | ((sa == sb) & (order[a] < order[b]))
    if size is not None:
        za, zb = size[a], size[b]
        a_first = (za > zb) | ((za == zb) & a_first)
    return np.where(a_first, a, b), np.where(a_first, b, a)


def _greedy_suppressed(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Which boxes greedy suppression drops, given edges ``src -> dst`` (src comes first and would
    suppress dst if kept). Resolved in rounds: a box with no live incoming edge is kept and suppresses
    its targets; edges from or to decided boxes are dropped; repeat."""
    suppressed = np.zeros(n, dtype=bool)
    while src.size:
        has_in = np.zeros(n, dtype=bool)
        has_in[dst] = True
        kept_src = ~has_in[src]
        suppressed[dst[kept_src]] = True
        live = ~kept_src & ~suppressed[src] & ~suppressed[dst]
        src, dst = src[live], dst[live]
    return suppressed


class WindowLike(Protocol):
    """Anything with a tile's pixel position and size (``services.tiling.windows.Window``)."""

    @property
    def col_off(self) -> int: ...
    @property
    def row_off(self) -> int: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...


def image_edges(tile: WindowLike, image_width: int, image_height: int) -> tuple[bool, bool, bool, bool]:
    """Which sides of ``tile`` (left, top, right, bottom) lie on the image's edge."""
    return (
        tile.col_off <= 0,
        tile.row_off <= 0,
        tile.col_off + tile.width >= image_width,
        tile.row_off + tile.height >= image_height,
    )


def drop_edge_truncated(
    d: Detections,
    tile_size: tuple[int, int],
    edges: tuple[bool, bool, bool, bool],
    *,
    margin: float = 1.0,
) -> Detections:
    """Drop a tile's boxes (in tile pixels) that touch one of its interior sides.

    ``tile_size`` is ``(width, height)``; ``edges`` says which sides (left, top, right, bottom) lie on the
    image edge (see :func:`image_edges`) — boxes touching those are real and kept. A box within
    ``margin`` pixels of an interior side is partial by construction; when the overlap is at least the
    largest object's size plus ``2 * margin``, the same object lies wholly inside a neighbouring tile,
    which reports its full box. Call this per tile, before shifting to image pixels.
    """
    width, height = tile_size
    left, top, right, bottom = edges
    interior = (not left, not top, not right, not bottom)
    touches = _cut_by_interior_sides(d.boxes, width, height, interior, margin)
    return d.select(~touches) if touches.any() else d


def _cut_by_interior_sides(
    boxes: np.ndarray, width: Any, height: Any, interior: tuple[Any, Any, Any, Any], margin: float
) -> np.ndarray:
    """Which ``boxes`` (tile pixels) lie within ``margin`` of a tile side that is ``interior`` (left, top,
    right, bottom) — one tile's scalars, or per box arrays of their tiles' sizes and sides."""
    left, top, right, bottom = interior
    touches = left & (boxes[:, 0] <= margin)
    touches |= top & (boxes[:, 1] <= margin)
    touches |= right & (boxes[:, 2] >= width - margin)
    touches |= bottom & (boxes[:, 3] >= height - margin)
    return np.asarray(touches, dtype=bool)


def whole_boxes_in_image(
    found: Sequence[Detections],
    tiles: Sequence[WindowLike],
    image_width: int,
    image_height: int,
    *,
    margin: float | None = 1.0,
) -> Detections:
    """The boxes of a set of tiles (``found[i]`` in the pixels of ``tiles[i]``; the pipeline passes a
    region's) in image pixels, less those an interior tile side cut: :func:`drop_edge_truncated` then a
    shift by the tile's offset, for every tile at once (a few array operations in all instead of a dozen per
    tile). ``margin`` None keeps every box. The boxes come out in the tiles' order."""
    counts = np.fromiter((len(d) for d in found), dtype=np.intp, count=len(found))
    if not counts.any():
        return Detections.empty()
    every = Detections.concat([d for d in found if len(d)])
    # Per box: its tile's offset, size, and which of the tile's sides lie on the image's edge.
    frame = np.array(
        [
            (t.col_off, t.row_off, t.width, t.height, *image_edges(t, image_width, image_height))
            for t in tiles
        ],
        dtype=np.int64,
    ).repeat(counts, axis=0)
    col, row, width, height, *on_edge = frame.T
    b = every.boxes
    keep: slice | np.ndarray = slice(None)  # margin None: every box
    if margin is not None:
        left, top, right, bottom = (side == 0 for side in on_edge)
        keep = ~_cut_by_interior_sides(b, width, height, (left, top, right, bottom), margin)
    offset = np.stack([col, row, col, row], axis=1).astype(np.float32)
    return Detections(b[keep] + offset[keep], every.scores[keep], every.labels[keep])
