"""The memory a stream gives back is the next stream's: strips and batches are not allocated afresh per
region (a narrower region's strips reuse a wider one's), and the pool never holds more than its limit nor
hands one buffer out twice."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.tiling import batches
from services.tiling.arrays import ArrayPool
from services.tiling.batches import iter_tile_batches
from services.tiling.reader import RasterSource
from services.tiling.scaling import InputScaling
from services.tiling.windows import Grid, Window

RasterMaker = Callable[..., tuple[Path, np.ndarray]]
MB = 1 << 20


def test_a_buffer_given_back_serves_the_next_array_that_fits() -> None:
    pool = ArrayPool(limit_bytes=64 * MB)
    first = pool.take((3, 256, 1040), "uint8")
    assert first.shape == (3, 256, 1040) and first.dtype == np.uint8 and first.flags.c_contiguous
    pool.give(first)
    again = pool.take((3, 256, 1040), "uint8")
    assert np.shares_memory(again, first)
    assert not np.shares_memory(pool.take((3, 256, 1040), "uint8"), first)  # in use: not handed out twice
    pool.give(again)
    narrower = pool.take((3, 256, 976), "uint8")  # a narrower region's strip: the same memory
    assert np.shares_memory(narrower, first) and narrower.shape == (3, 256, 976)
    pool.give(narrower)
    wider = pool.take((3, 256, 1100), "uint8")  # larger than any idle buffer: a new one
    assert not np.shares_memory(wider, first)
    small = pool.take((2, 8, 8), "float32")  # far smaller: does not pin the large buffer
    assert not np.shares_memory(small, first)
    as_float = pool.take((3 * 256 * 1040 // 4,), "float32")  # another dtype, the same bytes
    assert np.shares_memory(as_float, first) and as_float.dtype == np.float32


def test_only_the_pools_own_buffers_are_kept_and_each_once() -> None:
    pool = ArrayPool(limit_bytes=64 * MB)
    pool.give(np.empty((4, 4), np.uint8))  # not the pool's: ignored
    assert pool.idle_bytes == 0
    array = pool.take((4, 1024), "uint8")
    pool.give(array)
    pool.give(array[:2])  # a view of the same buffer, given again: kept once
    assert pool.idle_bytes == array.nbytes
    assert np.shares_memory(pool.take((4, 1024), "uint8"), array)
    assert pool.idle_bytes == 0


def test_the_pool_keeps_at_most_its_limit_dropping_the_oldest() -> None:
    pool = ArrayPool(limit_bytes=3 * MB)
    old, mid, new = (pool.take((MB,), "uint8") for _ in range(3))
    for array in (old, mid, new):
        pool.give(array)
    big = pool.take((MB + MB // 2,), "uint8")  # no idle buffer that large (within the waste): a new one
    pool.give(big)  # over the limit: the two oldest go
    assert pool.idle_bytes <= 3 * MB
    assert np.shares_memory(pool.take((MB,), "uint8"), new)
    assert not np.shares_memory(pool.take((MB,), "uint8"), mid)
    pool.clear()
    assert pool.idle_bytes == 0


def test_a_second_region_reads_into_the_first_ones_strips(
    make_raster: RasterMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = ArrayPool()
    monkeypatch.setattr(batches, "ARRAYS", pool)
    size = 1024
    path, data = make_raster(width=size, height=size, count=3, tiled=True, block=256, compress="deflate")
    filled: list[list[np.ndarray]] = [[], []]
    original = RasterSource.read
    phase = {"run": 0}

    def read(source: RasterSource, window: Window, **kwargs: Any) -> np.ndarray:
        got = original(source, window, **kwargs)
        filled[phase["run"]].append(got)
        return got

    monkeypatch.setattr(RasterSource, "read", read)
    tiles = Grid(256, 256, 64, 64).tiles_of(Window(0, 0, size, size), size, size)
    with RasterSource.open(str(path)) as source:
        for run in (0, 1):
            phase["run"] = run
            for batch in iter_tile_batches(source, tiles, 4, InputScaling()):
                for window, pixels in zip(batch.tiles, batch.pixels, strict=True):
                    expected = data[:, window.row_off : window.row_end, window.col_off : window.col_end]
                    np.testing.assert_array_equal(pixels, expected / np.float32(255))
                batch.release()
    assert filled[0] and filled[1]
    # Every strip of the second run went into memory the first run used.
    assert all(any(np.shares_memory(b, a) for a in filled[0]) for b in filled[1])


def test_released_batches_are_filled_again_and_batches_held_never_share(
    make_raster: RasterMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = ArrayPool()
    monkeypatch.setattr(batches, "ARRAYS", pool)
    width, height = 1024, 1536
    path, data = make_raster(width=width, height=height, count=3, tiled=True, block=256, compress="deflate")
    tiles = Grid(256, 256, 0, 0).tiles_of(Window(0, 0, width, height), width, height)  # 24 tiles, 12 batches

    roots: list[np.ndarray] = []  # kept alive, so that no freed array's address is taken by a new one

    def memory(pixels: np.ndarray) -> int:
        root = pixels
        while isinstance(root.base, np.ndarray):
            root = root.base
        roots.append(root)
        return int(root.__array_interface__["data"][0])

    def check(batch: batches.TileBatch) -> None:
        for window, pixels in zip(batch.tiles, batch.pixels, strict=True):
            expected = data[:, window.row_off : window.row_end, window.col_off : window.col_end]
            np.testing.assert_array_equal(pixels, expected / np.float32(255))

    with RasterSource.open(str(path)) as source:
        held = list(iter_tile_batches(source, tiles, 2, InputScaling()))  # none released
        assert len(held) == 12 and len({memory(b.pixels) for b in held}) == 12
        for batch in held:  # none overwritten by a later one
            check(batch)
        used = set()
        for batch in iter_tile_batches(source, tiles, 2, InputScaling()):
            check(batch)
            used.add(memory(batch.pixels))
            batch.release()
    # Released batches are filled again: no more arrays than can be alive at once (prefetch 2 queued, one
    # waiting for room, one being filled, the consumer's, and the next one's, taken as one is queued).
    assert len(used) <= 6, f"{len(used)} batch arrays for 12 batches"
