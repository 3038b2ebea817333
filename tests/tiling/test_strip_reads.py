"""iter_tile_batches: the pixels rasterio reads, each block requested once, nodata skipped, memory bounded."""

from __future__ import annotations

import threading
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import rasterio

from services.errors import UserError
from services.tiling.arrays import ARRAYS
from services.tiling.batches import TileBatch, iter_tile_batches
from services.tiling.reader import RasterSource
from services.tiling.scaling import InputScaling
from services.tiling.windows import Grid, Window

RasterMaker = Callable[..., tuple[Path, np.ndarray]]


def direct_tile(path: Path, tile: Window, bands: list[int]) -> np.ndarray:
    with rasterio.open(path) as dataset:
        return dataset.read(
            bands,
            window=rasterio.windows.Window(tile.col_off, tile.row_off, tile.width, tile.height),
            boundless=True,
            fill_value=dataset.nodata or 0,
        )


def collect(batches: Iterable[TileBatch]) -> tuple[list[Window], list[np.ndarray], int]:
    tiles: list[Window] = []
    pixels: list[np.ndarray] = []
    skipped = 0
    for batch in batches:
        assert batch.pixels.dtype == np.float32
        assert batch.pixels.shape[0] == len(batch.tiles)
        tiles.extend(batch.tiles)
        pixels.extend(batch.pixels)
        skipped += batch.skipped
    return tiles, pixels, skipped


class ReadLog:
    """Records every window a RasterSource is asked to read (what GDAL decodes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.windows: list[Window] = []
        self.threads: set[str] = set()
        lock = threading.Lock()
        original = RasterSource.read

        def read(source: RasterSource, window: Window, **kwargs: Any) -> np.ndarray:
            with lock:
                self.windows.append(window)
                self.threads.add(threading.current_thread().name)
            return original(source, window, **kwargs)

        monkeypatch.setattr(RasterSource, "read", read)

    def block_counts(self, width: int, height: int, block: tuple[int, int]) -> np.ndarray:
        rows, cols = -(-height // block[0]), -(-width // block[1])
        counts = np.zeros((rows, cols), dtype=np.int32)
        for w in self.windows:
            counts[
                w.row_off // block[0] : (w.row_end - 1) // block[0] + 1,
                w.col_off // block[1] : (w.col_end - 1) // block[1] + 1,
            ] += 1
        return counts


class Case(NamedTuple):
    width: int
    height: int
    bands: int
    dtype: str
    tiled: bool
    tile: tuple[int, int]
    overlap: int
    crs: str | None


CASES = [
    Case(1037, 771, 3, "uint8", True, (256, 256), 32, "EPSG:32633"),
    Case(1037, 771, 1, "uint16", False, (300, 200), 40, "EPSG:4326"),
    Case(777, 1301, 4, "uint8", True, (256, 320), 64, "EPSG:3857"),
    Case(640, 480, 3, "uint16", False, (512, 512), 100, None),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_batches_hold_exactly_the_pixels_rasterio_reads(make_raster: RasterMaker, case: Case) -> None:
    width, height, count, dtype, tiled, tile, overlap, crs = case  # count: the image's bands
    path, _ = make_raster(
        width=width, height=height, count=count, dtype=dtype, tiled=tiled, crs=crs, rows_per_strip=7
    )
    # A 1-band image feeds a 3-channel model only when asked to (scaling never guesses).
    # uint16 with no declared bit depth needs its range stated (scaling never guesses).
    stated = (0.0, 65535.0) if dtype == "uint16" else None
    scaling = InputScaling(channels=3, replicate=count == 1, value_range=stated)
    feed = scaling.band_indexes(count)
    with RasterSource.open(str(path)) as source:
        for region in Grid(*tile, overlap, overlap, 600, 600).regions(width, height):
            tiles = Grid(*tile, overlap, overlap).tiles_of(region, width, height)
            got_tiles, got_pixels, skipped = collect(iter_tile_batches(source, tiles, 3, scaling))
            assert skipped == 0
            assert sorted(got_tiles, key=lambda t: (t.row_off, t.col_off)) == got_tiles
            assert set(got_tiles) == set(tiles) and len(got_tiles) == len(tiles)
            for window, pixels in zip(got_tiles, got_pixels, strict=True):
                expected = scaling.apply(direct_tile(path, window, list(feed)))
                np.testing.assert_array_equal(pixels[:, : window.height, : window.width], expected)


@pytest.mark.parametrize(
    "layout",
    [
        (True, "pixel", (256, 256), 1),
        (False, "pixel", (16, 1037), 1),
        (True, "band", (256, 256), 1),
        (True, "pixel", (256, 256), 3),  # sparse tiles, as a region of interest leaves them
        (False, "pixel", (16, 1037), 2),
    ],
    ids=str,
)
def test_every_block_is_requested_once_per_region(
    make_raster: RasterMaker, monkeypatch: pytest.MonkeyPatch, layout: tuple[bool, str, tuple[int, int], int]
) -> None:
    tiled, interleave, block, keep_every = layout
    width, height, tile, overlap = 1037, 771, (200, 200), 50
    path, _ = make_raster(
        width=width, height=height, count=3, tiled=tiled, interleave=interleave, rows_per_strip=16
    )
    with RasterSource.open(str(path)) as source:
        assert source.block_shape == block
        for region in Grid(*tile, overlap, overlap, 500, 400).regions(width, height):
            tiles = Grid(*tile, overlap, overlap).tiles_of(region, width, height)[::keep_every]
            log = ReadLog(monkeypatch)
            got, pixels, _ = collect(iter_tile_batches(source, tiles, 4, InputScaling(), threads=3))
            monkeypatch.undo()
            assert set(got) == set(tiles)
            for window, tile_pixels in zip(got, pixels, strict=True):
                np.testing.assert_array_equal(
                    tile_pixels, direct_tile(path, window, [1, 2, 3]) / np.float32(255)
                )
            counts = log.block_counts(width, height, block)
            needed = np.zeros_like(counts)
            for t in tiles:
                needed[
                    t.row_off // block[0] : (t.row_end - 1) // block[0] + 1,
                    t.col_off // block[1] : (t.col_end - 1) // block[1] + 1,
                ] = 1
            assert counts.max() == 1, "a block was requested twice in one region"
            assert (counts[needed == 1] == 1).all(), "a block the tiles need was never read"
            assert log.threads and all(name.startswith("tile-read") for name in log.threads)


def test_reads_follow_the_strips_plan_not_the_tiles(
    make_raster: RasterMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = make_raster(width=1024, height=1024, count=3, tiled=True, block=256)
    tiles = Grid(256, 256, 64, 64).tiles_of(Window(0, 0, 1024, 1024), 1024, 1024)
    log = ReadLog(monkeypatch)
    with RasterSource.open(str(path)) as source:
        collect(iter_tile_batches(source, tiles, 8, InputScaling()))
    # 25 overlapping tiles but 4 strips of whole block rows, each read once across the whole width.
    assert len(tiles) == 25
    assert sorted((w.row_off, w.row_end, w.col_off, w.col_end) for w in log.windows) == [
        (r, r + 256, 0, 1024) for r in range(0, 1024, 256)
    ]


def test_strips_are_read_into_the_arrays_of_dropped_ones(
    make_raster: RasterMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 2048
    path, data = make_raster(width=size, height=size, count=3, tiled=True, block=256, compress="deflate")
    arrays: list[np.ndarray] = []  # the memory each read filled (the buffer under the array it got)
    original = RasterSource.read

    def read(source: RasterSource, window: Window, **kwargs: Any) -> np.ndarray:
        got = original(source, window, **kwargs)
        root = got
        while isinstance(root.base, np.ndarray):
            root = root.base
        arrays.append(root)
        return got

    monkeypatch.setattr(RasterSource, "read", read)
    tiles = Grid(256, 256, 64, 64).tiles_of(Window(0, 0, size, size), size, size)
    threads, prefetch = 2, 2
    with RasterSource.open(str(path)) as source:
        got, pixels, _ = collect(
            iter_tile_batches(source, tiles, 4, InputScaling(), threads=threads, prefetch=prefetch)
        )
    # Eight strips, read into no more arrays than can be alive at once: the strips a tile needs, the one
    # after them and the reads ahead; the rest reuse the arrays of strips no later tile needs.
    assert len(arrays) == size // 256
    distinct = len({id(a) for a in arrays})  # the buffers are all held here: no id is recycled
    assert distinct <= 2 + 1 + threads + prefetch < len(arrays)
    for window, tile_pixels in zip(got, pixels, strict=True):
        expected = data[:, window.row_off : window.row_end, window.col_off : window.col_end] / np.float32(255)
        np.testing.assert_array_equal(tile_pixels, expected)


def test_all_nodata_tiles_are_skipped_and_counted(make_raster: RasterMaker) -> None:
    width, height = 900, 700
    data = np.random.default_rng(3).integers(1, 255, (3, height, width), dtype=np.uint8)
    data[:, :, :450] = 0  # the left half is nodata
    data[:, 10:20, 10:20] = 0
    path, _ = make_raster(width=width, height=height, data=data, nodata=0)
    tiles = Grid(200, 200, 20, 20).tiles_of(Window(0, 0, width, height), width, height)
    with RasterSource.open(str(path)) as source:
        got, pixels, skipped = collect(iter_tile_batches(source, tiles, 4, InputScaling()))
    empty = [t for t in tiles if t.col_end <= 450]
    assert skipped == len(empty) > 0
    assert set(got) == set(tiles) - set(empty)
    for window, tile_pixels in zip(got, pixels, strict=True):
        raw = data[:, window.row_off : window.row_end, window.col_off : window.col_end]
        assert (tile_pixels[raw == 0] == 0).all()  # partial nodata becomes 0


def test_a_raster_of_nodata_reports_its_skips_in_one_empty_batch(make_raster: RasterMaker) -> None:
    data = np.full((1, 300, 300), 7, dtype=np.uint16)
    path, _ = make_raster(width=300, height=300, count=1, dtype="uint16", data=data, nodata=7)
    tiles = Grid(128, 128, 0, 0).tiles_of(Window(0, 0, 300, 300), 300, 300)
    with RasterSource.open(str(path)) as source:
        scaling = InputScaling(replicate=True, value_range=(0, 65535))  # one band, three channels: asked for
        batches = list(iter_tile_batches(source, tiles, 4, scaling, tile_shape=(128, 128)))
    assert len(batches) == 1 and batches[0].tiles == [] and batches[0].skipped == len(tiles) == 9
    assert batches[0].pixels.shape == (0, 3, 128, 128)


def test_a_small_image_is_padded_to_the_model_tile(make_raster: RasterMaker) -> None:
    path, data = make_raster(width=100, height=60, count=1, tiled=False)
    tiles = Grid(128, 96, 16, 16).tiles_of(Window(0, 0, 100, 60), 100, 60)
    with RasterSource.open(str(path)) as source:
        (batch,) = list(
            iter_tile_batches(source, tiles, 2, InputScaling(replicate=True), tile_shape=(96, 128))
        )
    assert batch.tiles == [Window(0, 0, 100, 60)]
    assert batch.pixels.shape == (1, 3, 96, 128)
    for channel in range(3):
        np.testing.assert_array_equal(batch.pixels[0, channel, :60, :100], data[0] / np.float32(255))
    assert not batch.pixels[0, :, 60:, :].any() and not batch.pixels[0, :, :, 100:].any()


def test_band_choice_reaches_the_model_channels(make_raster: RasterMaker) -> None:
    path, data = make_raster(width=300, height=200, count=4, dtype="uint16")
    tiles = [Window(0, 0, 128, 128), Window(150, 50, 128, 128)]
    with RasterSource.open(str(path)) as source:
        got, pixels, _ = collect(
            iter_tile_batches(source, tiles, 8, InputScaling(value_range=(0, 65535)), bands=[4, 2, 2])
        )
    for window, tile_pixels in zip(got, pixels, strict=True):
        raw = data[[3, 1, 1], window.row_off : window.row_end, window.col_off : window.col_end]
        np.testing.assert_allclose(tile_pixels, raw / 65535.0, rtol=1e-6)


def test_region_memory_is_a_few_strips_not_the_image(make_raster: RasterMaker) -> None:
    size, tile, overlap, batch, threads, prefetch = 4096, 256, 32, 2, 2, 2
    path, _ = make_raster(
        width=size, height=size, count=3, block=256, data=np.full((3, size, size), 9, np.uint8)
    )

    def peak(path: Path) -> int:
        with RasterSource.open(str(path)) as source:
            tiles = Grid(tile, tile, overlap, overlap).tiles_of(Window(0, 0, size, size), size, size)
            ARRAYS.clear()  # what the stream uses is allocated while traced, not inherited idle
            tracemalloc.start()
            try:
                for item in iter_tile_batches(
                    source, tiles, batch, InputScaling(), threads=threads, prefetch=prefetch
                ):
                    assert item.pixels.shape[1:] == (
                        3,
                        tile,
                        tile,
                    )  # consumed and dropped, as the detector does
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

    strip = 256 * size * 3  # one band of block rows across the region, uint8
    batch_bytes = batch * 3 * tile * tile * 4
    # The documented bound: bands held for the current tiles + reads ahead, and the queued batches.
    bound = (-(-tile // 256) + 1 + threads + prefetch) * strip + (prefetch + 3) * batch_bytes
    measured = peak(path)
    assert measured <= bound * 1.15, f"peak {measured / 1e6:.1f} MB over the {bound / 1e6:.1f} MB bound"
    assert measured < 3 * size * size * 4 / 6, "reading a region must not approach its float32 size"


def test_memory_does_not_grow_with_the_image(make_raster: RasterMaker) -> None:
    width, rows_per_strip = 2048, 256
    strip = rows_per_strip * width  # one band of block rows, uint8

    def peak(height: int) -> int:
        data = np.full((1, height, width), 5, np.uint8)
        path, _ = make_raster(f"tall{height}.tif", width=width, height=height, count=1, data=data)
        with RasterSource.open(str(path)) as source:
            tiles = Grid(256, 256, 32, 32).tiles_of(Window(0, 0, width, height), width, height)
            ARRAYS.clear()  # both runs allocate what they use while traced, none inherits idle buffers
            tracemalloc.start()
            try:
                for _ in iter_tile_batches(source, tiles, 2, InputScaling(replicate=True)):
                    pass
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

    # Past the first few strips the pipeline is in its steady state: 4x the rows, about the same memory. The
    # peak moves in steps of one batch (1.5 MB here) with how many happen to be in flight at once (up to 3 MB
    # between two runs of one image, seen here), so each is the least of two runs. Strips kept to the end
    # would add 12,288 more rows of them (25 MB); every other strip kept, half that.
    short, tall = min(peak(4096) for _ in range(2)), min(peak(16384) for _ in range(2))
    leaked = (16384 - 4096) // rows_per_strip * strip
    assert tall - short < leaked / 4, f"4x the rows took {(tall - short) / 1e6:.1f} MB more"


def test_read_errors_reach_the_consumer(make_raster: RasterMaker, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = make_raster(width=600, height=600)

    def broken(source: RasterSource, window: Window, **kwargs: Any) -> np.ndarray:
        raise UserError(f"reading {source.url} failed at {window}: truncated")

    monkeypatch.setattr(RasterSource, "read", broken)
    tiles = Grid(256, 256, 0, 0).tiles_of(Window(0, 0, 600, 600), 600, 600)
    with RasterSource.open(str(path)) as source, pytest.raises(UserError, match="truncated"):
        collect(iter_tile_batches(source, tiles, 2, InputScaling()))


def test_a_consumer_that_stops_early_leaves_no_reader_running(make_raster: RasterMaker) -> None:
    path, _ = make_raster(width=2048, height=2048)
    tiles = Grid(256, 256, 0, 0).tiles_of(Window(0, 0, 2048, 2048), 2048, 2048)
    before = {t.name for t in threading.enumerate()}
    with RasterSource.open(str(path)) as source:
        batches = iter_tile_batches(source, tiles, 2, InputScaling(), prefetch=1)
        next(batches)
        batches.close()
    left = {t.name for t in threading.enumerate()} - before
    assert not {name for name in left if name.startswith(("tile-read", "tile-assembler"))}
