"""The global tile grid and its regions: coverage, full-size tiles, one region per tile, seam objects."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest

from services.errors import UserError
from services.tiling.windows import Grid, Window


# (image w, h, tile w, h, overlap x, y, region w, h): odd sizes, non-square tiles, regions not multiples
# of the stride, an image smaller than a tile on one axis, a single region, zero overlap.
class Case(NamedTuple):
    w: int
    h: int
    tw: int
    th: int
    ox: int
    oy: int
    rw: int
    rh: int


GRIDS = [
    Case(1037, 771, 256, 256, 32, 32, 600, 500),
    Case(1037, 771, 300, 200, 50, 20, 700, 333),
    Case(4099, 2050, 512, 384, 128, 64, 1500, 1100),
    Case(200, 771, 256, 128, 40, 16, 1000, 300),
    Case(513, 511, 512, 512, 100, 100, 5000, 5000),
    Case(1000, 1000, 250, 250, 0, 0, 500, 500),
    Case(1300, 257, 256, 256, 255, 255, 256, 256),
]


def all_tiles(grid: Case) -> list[list[Window]]:
    w, h, tw, th, ox, oy, rw, rh = grid
    tiling = Grid(tw, th, ox, oy, rw, rh)
    return [tiling.tiles_of(region, w, h) for region in tiling.regions(w, h)]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_tiles_cover_every_pixel_at_full_size(grid: Case) -> None:
    w, h, tw, th = grid.w, grid.h, grid.tw, grid.th
    coverage = np.zeros((h, w), dtype=np.int32)
    for tiles in all_tiles(grid):
        for tile in tiles:
            assert (tile.width, tile.height) == (min(tw, w), min(th, h))
            assert tile.col_off >= 0 and tile.col_end <= w
            assert tile.row_off >= 0 and tile.row_end <= h
            coverage[tile.row_off : tile.row_end, tile.col_off : tile.col_end] += 1
    assert coverage.min() >= 1


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_regions_partition_the_image_and_own_each_tile_once(grid: Case) -> None:
    w, h, tw, th, ox, oy, rw, rh = grid
    regions = Grid(tw, th, ox, oy, rw, rh).regions(w, h)
    owner = np.zeros((h, w), dtype=np.int32)
    for region in regions:
        owner[region.row_off : region.row_end, region.col_off : region.col_end] += 1
    assert (owner == 1).all(), "regions must partition the image"

    xs, ys = Grid(tw, th, ox, oy).origins(w, h)
    origins = {(int(x), int(y)) for y in ys for x in xs}
    seen: list[tuple[int, int]] = []
    for region in regions:
        tiles = Grid(tw, th, ox, oy).tiles_of(region, w, h)
        assert tiles, f"region {region} has no tiles"
        for tile in tiles:
            # A region's tiles start inside it and reach past it by at most the overlap.
            assert region.col_off <= tile.col_off < region.col_end
            assert region.row_off <= tile.row_off < region.row_end
            assert tile.col_end <= max(region.col_end + ox, region.col_off + min(tw, w))
            assert tile.row_end <= max(region.row_end + oy, region.row_off + min(th, h))
            seen.append((tile.col_off, tile.row_off))
    assert len(seen) == len(set(seen)) == len(origins)
    assert set(seen) == origins


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_every_object_no_larger_than_the_overlap_lies_inside_one_tile(grid: Case) -> None:
    w, h, tw, ox, oy = grid.w, grid.h, grid.tw, grid.ox, grid.oy
    tiles = np.array([(t.col_off, t.row_off, t.col_end, t.row_end) for ts in all_tiles(grid) for t in ts])
    rng = np.random.default_rng(7)
    count = 4000
    sizes_x = rng.integers(1, max(ox, 1) + 1, count) if ox else np.ones(count, dtype=np.int64)
    sizes_y = rng.integers(1, max(oy, 1) + 1, count) if oy else np.ones(count, dtype=np.int64)
    sizes_x = np.minimum(sizes_x, w)
    sizes_y = np.minimum(sizes_y, h)
    x1 = rng.integers(0, w - sizes_x + 1)
    y1 = rng.integers(0, h - sizes_y + 1)
    # Objects exactly on the stride seams are the hard cases: add them on purpose.
    stride_x = tw - ox
    seam = rng.integers(1, max(w // stride_x, 1) + 1, count) * stride_x - sizes_x // 2
    x1[: count // 2] = np.clip(seam[: count // 2], 0, w - sizes_x[: count // 2])
    x2, y2 = x1 + sizes_x, y1 + sizes_y
    inside = (
        (tiles[None, :, 0] <= x1[:, None])
        & (tiles[None, :, 1] <= y1[:, None])
        & (tiles[None, :, 2] >= x2[:, None])
        & (tiles[None, :, 3] >= y2[:, None])
    )
    if ox and oy:
        assert inside.any(axis=1).all()
    else:
        # With no overlap only one-pixel objects are guaranteed; they must still all be inside a tile.
        assert inside[(sizes_x == 1) & (sizes_y == 1)].any(axis=1).all()


def test_grid_strides_and_edge_shift() -> None:
    xs, ys = Grid(256, 200, 56, 40).origins(1037, 771)
    assert xs.tolist() == [0, 200, 400, 600, 781]  # last shifted back to 1037 - 256
    assert ys.tolist() == [0, 160, 320, 480, 571]
    xs, ys = Grid(256, 256, 32, 32).origins(100, 50)
    assert xs.tolist() == [0] and ys.tolist() == [0]
    assert Grid(256, 256, 32, 32).tiles_of(Window(0, 0, 100, 50), 100, 50) == [Window(0, 0, 100, 50)]


def test_region_size_rounds_to_whole_strides() -> None:
    regions = Grid(512, 512, 64, 64, 1000, 1000).regions(5000, 300)
    # 1000 rounds down to 896, two strides of 448.
    assert [r.col_off for r in regions] == [0, 896, 1792, 2688, 3584, 4480]
    assert regions[-1].col_end == 5000
    # 4900 wide: the last tile starts at 4388, a region at 4480 would hold no tile: it joins the one before.
    regions = Grid(512, 512, 64, 64, 1000, 1000).regions(4900, 300)
    assert [(r.col_off, r.col_end) for r in regions][-2:] == [(2688, 3584), (3584, 4900)]


@pytest.mark.parametrize(
    ("tile", "overlap", "region"),
    [((0, 256), (0, 0), (512, 512)), ((256, 256), (256, 0), (512, 512)), ((256, 256), (-1, 0), (512, 512))],
)
def test_bad_grid_settings_raise_user_errors(
    tile: tuple[int, int], overlap: tuple[int, int], region: tuple[int, int]
) -> None:
    with pytest.raises(UserError, match=r"tile|overlap"):
        Grid(*tile, *overlap, *region).regions(1000, 1000)
    with pytest.raises(UserError, match="region size"):
        Grid(256, 256, 0, 0, 0, 512).regions(1000, 1000)


def test_window_geometry() -> None:
    a = Window(10, 20, 100, 50)
    assert (a.col_end, a.row_end) == (110, 70)
    assert a.intersection(Window(100, 60, 50, 50)) == Window(100, 60, 10, 10)
    assert a.intersection(Window(110, 20, 5, 5)) is None
    assert a.shifted(-10, 5) == Window(0, 25, 100, 50)
