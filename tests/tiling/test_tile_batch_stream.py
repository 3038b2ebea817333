"""TileBatchStream: reads that start before the stream is iterated, a signal when they are all handed out,
and no thread left behind by a stream closed unread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.errors import UserError
from services.tiling.batches import TileBatchStream, iter_tile_batches
from services.tiling.reader import RasterSource
from services.tiling.scaling import InputScaling
from services.tiling.windows import Grid, Window

RasterMaker = Callable[..., tuple[Path, np.ndarray]]


def pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("tile-read", "tile-assembler"))]


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture
def raster(make_raster: RasterMaker) -> tuple[Path, np.ndarray]:
    return make_raster(width=1024, height=1024, count=3, tiled=True, block=256, compress="deflate")


def test_reads_begin_at_start_before_any_batch_is_taken(
    raster: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = raster
    reads: list[Window] = []
    original = RasterSource.read

    def read(source: RasterSource, window: Window, **kwargs: Any) -> np.ndarray:
        reads.append(window)
        return original(source, window, **kwargs)

    monkeypatch.setattr(RasterSource, "read", read)
    tiles = Grid(256, 256, 64, 64).tiles_of(Window(0, 0, 1024, 1024), 1024, 1024)
    with RasterSource.open(str(path)) as source:
        stream = TileBatchStream(source, tiles, 4, InputScaling())
        assert not stream.started and reads == []
        stream.start()
        stream.start()  # once only
        assert stream.started
        assert wait_for(lambda: len(reads) > 0), "start() read nothing"
        with stream:
            got = [
                (tile, pixels.copy())
                for batch in stream
                for tile, pixels in zip(batch.tiles, batch.pixels, strict=True)
            ]
        expected = [
            (tile, pixels.copy())
            for batch in iter_tile_batches(source, tiles, 4, InputScaling())
            for tile, pixels in zip(batch.tiles, batch.pixels, strict=True)
        ]
    assert [t for t, _ in got] == [t for t, _ in expected] and len(got) == len(tiles)
    for (tile, pixels), (_, want) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(pixels, want)
        np.testing.assert_array_equal(
            pixels, data[:, tile.row_off : tile.row_end, tile.col_off : tile.col_end] / np.float32(255)
        )


def test_reads_done_is_said_once_on_the_assembler_before_the_last_batch(
    raster: tuple[Path, np.ndarray],
) -> None:
    path, _ = raster
    said: list[str] = []
    tiles = Grid(256, 256, 64, 64).tiles_of(Window(0, 0, 1024, 1024), 1024, 1024)
    with RasterSource.open(str(path)) as source:
        stream = TileBatchStream(
            source,
            tiles,
            4,
            InputScaling(),
            on_reads_done=lambda: said.append(threading.current_thread().name),
        )
        seen_before_last = []
        with stream:
            batches = list(stream)
            seen_before_last.append(len(said))
    assert len(batches) == -(-len(tiles) // 4)
    assert said == ["tile-assembler"]
    assert seen_before_last == [1]


def test_a_stream_closed_unread_leaves_no_thread(raster: tuple[Path, np.ndarray]) -> None:
    path, _ = raster
    before = pipeline_threads()
    tiles = Grid(256, 256, 64, 64).tiles_of(Window(0, 0, 1024, 1024), 1024, 1024)
    with RasterSource.open(str(path)) as source:
        stream = TileBatchStream(source, tiles, 2, InputScaling(), prefetch=1)
        stream.start()
        assert wait_for(lambda: len(pipeline_threads()) > len(before))
        stream.close()
        assert pipeline_threads() == before
        with pytest.raises(RuntimeError, match="closed while"):
            list(stream)  # reading a stream closed half-way ends, it does not hang
        closed_early = TileBatchStream(source, tiles, 2, InputScaling())
        closed_early.close()
        closed_early.start()  # a closed stream does not start again
        with pytest.raises(RuntimeError, match="closed before"):
            list(closed_early)
    assert pipeline_threads() == before


def test_what_cannot_be_cut_is_refused_before_any_read(raster: tuple[Path, np.ndarray]) -> None:
    path, _ = raster
    with RasterSource.open(str(path)) as source:
        with pytest.raises(UserError, match="batch size"):
            TileBatchStream(source, [Window(0, 0, 64, 64)], 0, InputScaling())
        with pytest.raises(UserError, match="larger than the batch tile shape"):
            TileBatchStream(source, [Window(0, 0, 128, 128)], 2, InputScaling(), tile_shape=(64, 64))
        assert list(TileBatchStream(source, [], 2, InputScaling())) == []
