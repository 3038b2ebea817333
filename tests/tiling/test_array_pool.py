"""The arrays a stream gives back are the next stream's: strips and batches are not allocated afresh per
region, and the pool never holds more than its limit nor hands one array out twice."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.tiling import arrays, batches
from services.tiling.arrays import ArrayPool
from services.tiling.batches import iter_tile_batches
from services.tiling.reader import RasterSource
from services.tiling.scaling import InputScaling
from services.tiling.windows import Grid, Window

RasterMaker = Callable[..., tuple[Path, np.ndarray]]


def test_an_array_given_back_is_taken_again_by_shape_and_dtype() -> None:
    pool = ArrayPool(limit_bytes=1 << 20)
    first = pool.take((2, 8, 8), "uint8")
    pool.give(first)
    assert pool.take((2, 8, 8), "float32") is not first  # another dtype: a new array
    assert pool.take((2, 8, 4), "uint8") is not first  # another shape
    assert pool.take((2, 8, 8), "uint8") is first
    assert pool.take((2, 8, 8), "uint8") is not first  # taken already: not handed out twice


def test_given_twice_is_kept_once_and_views_are_not_kept() -> None:
    pool = ArrayPool(limit_bytes=1 << 20)
    array = np.empty((4, 4), np.uint8)
    pool.give(array)
    pool.give(array)
    assert pool.idle_bytes == array.nbytes
    pool.give(array[:2])  # a view: its base may still be in use
    pool.give(np.empty((4, 4), np.uint8).T)  # not C-contiguous
    assert pool.idle_bytes == array.nbytes


def test_the_pool_keeps_at_most_its_limit_dropping_the_oldest() -> None:
    pool = ArrayPool(limit_bytes=3000)
    old, mid, new = (np.empty(1000, np.uint8) for _ in range(3))
    for array in (old, mid, new):
        pool.give(array)
    pool.give(np.empty(1500, np.uint8))  # over the limit: the oldest two go
    assert pool.idle_bytes <= 3000
    assert pool.take((1000,), "uint8") is new
    assert pool.take((1000,), "uint8") is not mid
    pool.give(np.empty(4000, np.uint8))  # larger than the limit: never kept
    assert pool.idle_bytes <= 3000
    pool.clear()
    assert pool.idle_bytes == 0


def test_a_second_region_reads_into_the_first_ones_strips(
    make_raster: RasterMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = ArrayPool()
    monkeypatch.setattr(batches, "ARRAYS", pool)
    monkeypatch.setattr(arrays, "ARRAYS", pool)
    size = 1024
    path, data = make_raster(width=size, height=size, count=3, tiled=True, block=256, compress="deflate")
    filled: list[list[int]] = [[], []]
    kept: list[np.ndarray] = []  # the first run's strips stay alive, so no id of theirs is recycled
    original = RasterSource.read
    phase = {"run": 0}

    def read(source: RasterSource, window: Window, **kwargs: Any) -> np.ndarray:
        got = original(source, window, **kwargs)
        filled[phase["run"]].append(id(got))
        if phase["run"] == 0:
            kept.append(got)
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
    assert set(filled[1]) <= set(filled[0])  # every strip of the second run went into a first-run array
