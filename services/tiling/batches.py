"""The tile-batch pipeline that feeds the model: strips read ahead, tiles cut and scaled into batches.

:func:`iter_tile_batches` (or :class:`TileBatchStream`, whose reads can start before it is iterated) turns
a list of tiles of a :class:`~services.tiling.reader.RasterSource` into float32 batches:

- **Strips, not tiles.** The rows the tiles need are split into *bands* of whole internal block rows
  (at least ``STRIP_ROWS`` rows). Each band is read once, as one window per run of needed columns (runs
  that would share a block are merged), so every internal block is requested exactly once however much
  the tiles overlap (:func:`plan_strip_reads`).
- **Prefetch.** Band reads run on a pool of ``threads`` threads (GDAL releases the GIL while it fetches and
  decodes), at most ``threads + prefetch`` ahead of the cutter (:class:`StripCache`). One assembler thread
  cuts, checks nodata, scales and batches (:class:`BatchAssembler`), and keeps up to ``prefetch`` finished
  batches queued ahead of the consumer.
- **One pass per pixel.** A tile inside the image is scaled from the strips straight into its slot of the
  batch: each part of the tile a strip holds is read once and written once, as float32 (no intermediate
  copy of the tile, no zeroed batch). Tiles reaching outside the image are assembled first (their outside
  filled with nodata), then scaled.
- **Memory.** Bands are dropped as soon as no remaining tile needs them, and their arrays read into again
  (a fresh multi-megabyte array per read costs its page faults, and a freed one lingers in the allocator);
  strips and batch arrays outlive the stream in :data:`~services.tiling.arrays.ARRAYS` for the next one.
  The bound is about
  ``(ceil(tile_h / band_h) + 1 + threads + prefetch)`` bands of ``band_h x span`` pixels (``span``: the
  columns the tiles cover, i.e. a region's width plus the overlap) plus ``prefetch + 3`` batches (those
  queued, one waiting to be queued, the one being filled, and the consumer's; a consumer that holds more,
  such as batches side by side on several sessions, adds those) — set by the region, never by the image.
- **Nodata.** A tile whose every pixel (in every read band) equals the nodata value (or is NaN for a NaN
  nodata) is skipped and counted in ``TileBatch.skipped``; other nodata pixels become 0 (see scaling).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.errors import UserError
from services.tiling.allocator import cap_malloc_arenas
from services.tiling.arrays import ARRAYS, ArrayPool
from services.tiling.reader import RasterSource
from services.tiling.scaling import InputScaling
from services.tiling.windows import Window

#: Bands are at least this many rows (whole block rows), so striped files with a few rows per strip are
#: still read in large windows.
STRIP_ROWS = 256
#: Blocks taller than this (e.g. a file stored as one strip) are read in bands of this many rows instead:
#: re-decoding such a block is the price of keeping memory bounded.
MAX_STRIP_ROWS = 4096


@dataclass(frozen=True)
class TileBatch:
    """Tiles ready for the model: ``pixels`` float32 ``[B, C, tile_h, tile_w]``, row i holding ``tiles[i]``.

    ``B <= batch_size``: the last batch may be short. A tile smaller than the batch's tile shape (an image
    smaller than a tile) sits at the top-left, padded with 0. ``skipped`` counts the all-nodata tiles dropped
    since the previous batch; a batch with no tiles (B = 0) is yielded only when every tile was skipped.
    A consumer that is done with ``pixels`` (the model has returned) may :meth:`release` them for reuse.
    """

    tiles: list[Window]
    pixels: np.ndarray
    skipped: int
    pool: ArrayPool | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Hand ``pixels`` back to be filled by a later batch: call it once nothing reads them any more
        (never read them after). Optional: a batch not released is simply garbage-collected."""
        if self.pool is not None:
            self.pool.give(self.pixels)  # the pool takes back the whole buffer under this view


def _band_rows(block_rows: int) -> int:
    if block_rows > MAX_STRIP_ROWS:
        return MAX_STRIP_ROWS
    return block_rows * max(1, -(-STRIP_ROWS // block_rows))


def _merge_runs(spans: list[tuple[int, int]], block_cols: int) -> list[tuple[int, int]]:
    """Column runs covering ``spans``; runs that would touch a common block are merged."""
    runs: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if runs and start // block_cols <= (runs[-1][1] - 1) // block_cols:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((start, end))
    return runs


def plan_strip_reads(
    tiles: Sequence[Window], image_width: int, image_height: int, block_shape: tuple[int, int]
) -> tuple[int, list[tuple[int, Window]]]:
    """The strip reads covering ``tiles``: ``(band_rows, [(band, window), ...])`` in band order.

    Band ``k`` holds image rows ``[k * band_rows, (k + 1) * band_rows)``, whole block rows. Each read is
    one run of columns within one band, trimmed to the rows and columns the tiles need; runs that would
    share a block are merged, so no two reads touch the same block.
    """
    block_rows, block_cols = block_shape
    band_rows = _band_rows(block_rows)
    per_band: dict[int, list[tuple[int, int, int, int]]] = {}
    for tile in tiles:
        row0, row1 = max(tile.row_off, 0), min(tile.row_end, image_height)
        col0, col1 = max(tile.col_off, 0), min(tile.col_end, image_width)
        if row1 <= row0 or col1 <= col0:
            continue
        for band in range(row0 // band_rows, (row1 - 1) // band_rows + 1):
            top, bottom = band * band_rows, (band + 1) * band_rows
            per_band.setdefault(band, []).append((max(row0, top), min(row1, bottom), col0, col1))
    reads = []
    for band in sorted(per_band):
        parts = per_band[band]
        row0 = min(p[0] for p in parts)
        row1 = max(p[1] for p in parts)
        for col0, col1 in _merge_runs([(p[2], p[3]) for p in parts], block_cols):
            reads.append((band, Window(col0, row0, col1 - col0, row1 - row0)))
    return band_rows, reads


def native_nodata(nodata: float | None, dtype: np.dtype | str) -> Any:
    """``nodata`` as a scalar of ``dtype`` when it is exactly representable there, else ``nodata`` itself.

    Comparing an integer array with a Python float promotes the whole array to float64; a scalar of the
    array's own dtype compares in place. The comparison's result is the same either way when the value is
    exact; a value that is not (e.g. 0.5 or -1 for uint8) stays a float, so it matches no pixel, as before.
    """
    if nodata is None or np.isnan(nodata):
        return nodata
    kind = np.dtype(dtype)
    if kind.kind in "uif":
        if kind.kind in "ui":
            info = np.iinfo(kind)
            if not (info.min <= nodata <= info.max and float(nodata).is_integer()):
                return nodata
        value = kind.type(nodata)
        if float(value) == nodata:
            return value
    return nodata


def _all_nodata(raw: np.ndarray, nodata: Any) -> bool:
    if nodata is None:
        return False
    if np.isnan(nodata):
        return bool(np.isnan(raw).all())
    # Most tiles hold data: one pixel settles them without a pass over the whole tile.
    if raw.size and raw.flat[0] != nodata:
        return False
    return bool((raw == nodata).all())


class StripCache:
    """The bands of decoded rows the tiles need: read ahead on a thread pool, in band order, dropped when
    no later tile needs them (their arrays then take later reads of the same shape). Used by one thread
    (the assembler); :meth:`close` stops the pool."""

    def __init__(
        self,
        source: RasterSource,
        plan: list[tuple[int, Window]],
        band_rows: int,
        read_bands: list[int],
        *,
        threads: int,
        ahead: int,
    ) -> None:
        self._source = source
        self._reads = iter(plan)
        self._band_rows = band_rows
        #: The 1-based image bands each strip holds, in order.
        self.read_bands = read_bands
        self._ahead = ahead
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="tile-read")
        self._pending: deque[tuple[int, Window, Future[np.ndarray], np.ndarray]] = deque()
        self._held: dict[int, list[tuple[Window, np.ndarray]]] = {}
        #: Whether every read of the plan has been handed to the readers.
        self.all_submitted = False
        self._top_up()

    def _top_up(self) -> None:
        while len(self._pending) < self._ahead:
            read = next(self._reads, None)
            if read is None:
                self.all_submitted = True
                return
            band, window = read
            # Dropped strips (this region's, or an earlier one's) are read into again: see arrays.py.
            out = ARRAYS.take((len(self.read_bands), window.height, window.width), self._source.dtype)
            future = self._pool.submit(self._source.read, window, bands=self.read_bands, out=out)
            self._pending.append((band, window, future, out))

    def hold_through(self, row_end: int) -> None:
        """Wait for every read of the bands up to the one holding row ``row_end - 1``."""
        last_band = (min(row_end, self._source.height) - 1) // self._band_rows
        while self._pending and self._pending[0][0] <= last_band:
            band, window, future, _ = self._pending.popleft()
            self._held.setdefault(band, []).append((window, future.result()))
            self._top_up()

    def drop_above(self, row: int) -> None:
        """Forget the bands wholly above image row ``row`` (no later tile starts above it)."""
        keep_from = max(row, 0) // self._band_rows
        for band in [b for b in self._held if b < keep_from]:
            for _, data in self._held.pop(band):
                ARRAYS.give(data)

    def parts(self, tile: Window) -> Iterator[tuple[Window, np.ndarray]]:
        """The pieces of ``tile`` the held strips cover: ``(piece, pixels [C, h, w])``, as views."""
        for band in range(max(tile.row_off, 0) // self._band_rows, (tile.row_end - 1) // self._band_rows + 1):
            for window, data in self._held.get(band, ()):
                part = tile.intersection(window)
                if part is None:
                    continue
                yield (
                    part,
                    data[
                        :,
                        part.row_off - window.row_off : part.row_end - window.row_off,
                        part.col_off - window.col_off : part.col_end - window.col_off,
                    ],
                )

    def close(self) -> None:
        """Stop the reads not started, wait for those running, and give every strip array back."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for strips in self._held.values():
            for _, data in strips:
                ARRAYS.give(data)
        self._held.clear()
        for _, _, _, out in self._pending:  # read into, or never started: nothing reads them now
            ARRAYS.give(out)
        self._pending.clear()


class BatchAssembler:
    """Cuts tiles from a :class:`StripCache` into float32 batches: nodata tiles skipped, the rest scaled
    into their slot (``scaling`` settled for the image; ``channel_of``: the strip channel per model channel).

    With ``native_pad`` (a pixel value the model's folded scaling makes 0) the batches hold the image's own
    pixels instead, copied, for a model that scales them itself (services/inference/native_input.py).
    """

    def __init__(
        self,
        source: RasterSource,
        scaling: InputScaling,
        channel_of: list[int],
        *,
        batch_size: int,
        tile_shape: tuple[int, int],
        native_pad: int | None = None,
    ) -> None:
        self._source = source
        self._native_pad = native_pad
        self._scaling = scaling
        # Every read band in order: the strips are the model's channels already, no selection needed.
        self._select: slice | list[int] = (
            slice(None) if channel_of == list(range(len(channel_of))) else list(channel_of)
        )
        self._channels = len(channel_of)
        self._nodata = native_nodata(source.nodata, source.dtype)
        self._fill = source.nodata if source.nodata is not None else 0
        self._batch_size = batch_size
        self._shape = tile_shape
        self._bounds = Window(0, 0, source.width, source.height)
        self.tiles: list[Window] = []
        self.skipped = 0
        # Not zeroed: every slot taken is written whole (a tile smaller than the slot pads itself).
        dtype = np.dtype(np.float32 if native_pad is None else source.dtype)
        self._batch_shape = (batch_size, self._channels, *tile_shape)
        self._dtype = dtype
        # Batch arrays come from the process's pool and go back to it when the consumer releases them, so
        # that a long run (and the next region) does not fault in a fresh array per batch.
        self._pixels = ARRAYS.take(self._batch_shape, dtype)

    @property
    def full(self) -> bool:
        """Whether the batch holds ``batch_size`` tiles."""
        return len(self.tiles) == self._batch_size

    def add(self, tile: Window, strips: StripCache) -> None:
        """Cut ``tile`` into the next slot, or count it skipped when it is all nodata."""
        if self._bounds.intersection(tile) != tile:
            self._add_assembled(tile, strips)
            return
        parts = list(strips.parts(tile))
        if self._nodata is not None and all(_all_nodata(data, self._nodata) for _, data in parts):
            self.skipped += 1
            return
        slot = self._slot(tile)
        for part, data in parts:
            view = slot[
                :,
                part.row_off - tile.row_off : part.row_end - tile.row_off,
                part.col_off - tile.col_off : part.col_end - tile.col_off,
            ]
            self._put(data[self._select], view)
        self.tiles.append(tile)

    def _put(self, raw: np.ndarray, out: np.ndarray) -> None:
        if self._native_pad is None:
            self._scaling.apply(raw, nodata=self._nodata, out=out)
        else:
            out[...] = raw

    def _add_assembled(self, tile: Window, strips: StripCache) -> None:
        """A tile reaching outside the image: its pixels gathered first, the outside filled with nodata."""
        shape = (len(strips.read_bands), tile.height, tile.width)
        raw = np.full(shape, self._fill, dtype=self._source.dtype)
        for part, data in strips.parts(tile):
            raw[
                :,
                part.row_off - tile.row_off : part.row_end - tile.row_off,
                part.col_off - tile.col_off : part.col_end - tile.col_off,
            ] = data
        if _all_nodata(raw, self._nodata):
            self.skipped += 1
            return
        self._put(raw[self._select], self._slot(tile))
        self.tiles.append(tile)

    def _slot(self, tile: Window) -> np.ndarray:
        """The next slot's ``[C, tile.height, tile.width]`` view, its padding (if any) zeroed."""
        slot = self._pixels[len(self.tiles)]
        if (tile.height, tile.width) != self._shape:
            pad = 0 if self._native_pad is None else self._native_pad
            slot[:, tile.height :, :] = pad
            slot[:, : tile.height, tile.width :] = pad
        return slot[:, : tile.height, : tile.width]

    def take(self) -> TileBatch:
        """The batch so far (possibly short, or empty with only skipped tiles); a new one is started."""
        batch = TileBatch(self.tiles, self._pixels[: len(self.tiles)], self.skipped, ARRAYS)
        self.tiles, self.skipped = [], 0
        self._pixels = ARRAYS.take(self._batch_shape, self._dtype)
        return batch


_DONE = object()


class TileBatchStream:
    """The batches of ``tiles`` of ``source``, read, scaled and batched ahead of the consumer (see the
    module doc) on threads that :meth:`start` begins — before the stream is iterated, if the caller wants
    the reads under way while it finishes other work (the previous region's last batches in the model).

    Everything that can be refused (batch size, the scaling against the image, tile shapes) is checked
    here, before any read. Iterating starts the reads if :meth:`start` did not; :meth:`close` (or leaving
    the ``with`` block) stops them, whether or not the stream was iterated. ``on_reads_done`` is called
    once, on the assembler thread, as soon as the last strip read is handed to the readers: the moment
    to start the next stream, so that its reads fill the cores while this one's last tiles are cut and
    run. Arguments as for :func:`iter_tile_batches`.
    """

    def __init__(
        self,
        source: RasterSource,
        tiles: Sequence[Window],
        batch_size: int,
        scaling: InputScaling,
        *,
        bands: Sequence[int] | None = None,
        prefetch: int = 2,
        threads: int = 2,
        tile_shape: tuple[int, int] | None = None,
        native_pad: int | None = None,
        on_reads_done: Callable[[], None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        self._tiles = sorted(tiles, key=lambda t: (t.row_off, t.col_off))
        self._source = source
        self._batch_size = batch_size
        self._prefetch = prefetch
        self._threads = threads
        self._native_pad = native_pad
        self.on_reads_done = on_reads_done
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._results: queue.Queue[object] = queue.Queue(maxsize=max(1, prefetch))
        if not self._tiles:
            return
        # Refuse an image the scaling's rules do not cover before any read (see services/tiling/scaling.py).
        self._scaling = scaling.for_image(source.dtype, source.count, nbits=source.nbits, bands=bands)
        feed = self._scaling.band_indexes(source.count, bands)
        self._read_bands = sorted(set(feed))
        self._channel_of = [self._read_bands.index(b) for b in feed]
        shape_h = tile_shape[0] if tile_shape else max(t.height for t in self._tiles)
        shape_w = tile_shape[1] if tile_shape else max(t.width for t in self._tiles)
        if any(t.height > shape_h or t.width > shape_w for t in self._tiles):
            raise UserError(f"a tile is larger than the batch tile shape {shape_h} x {shape_w}")
        self._shape = (shape_h, shape_w)
        self._band_rows, self._plan = plan_strip_reads(
            self._tiles, source.width, source.height, source.block_shape
        )

    @property
    def started(self) -> bool:
        """Whether the reads have begun (:meth:`start`, or the first iteration)."""
        return self._worker is not None

    def start(self) -> None:
        """Begin reading and batching (once; later calls do nothing)."""
        if self._worker is not None or not self._tiles or self._stop.is_set():
            return
        cap_malloc_arenas()  # before the reading and cutting threads start (services/tiling/allocator.py)
        self._worker = threading.Thread(target=self._assemble, name="tile-assembler", daemon=True)
        self._worker.start()

    def __iter__(self) -> Iterator[TileBatch]:
        if not self._tiles:
            return
        self.start()
        worker = self._worker
        if worker is None:  # closed before it started: nothing will come
            raise RuntimeError("the tile batch stream was closed before it was read")
        while True:
            try:
                item = self._results.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set() and not worker.is_alive() and self._results.empty():
                    raise RuntimeError("the tile batch stream was closed while it was read") from None
                continue
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, TileBatch)
            yield item

    def close(self) -> None:
        """Stop the reads and the batching, and wait for their threads."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join()

    def __enter__(self) -> TileBatchStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _deliver(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _reads_done(self) -> None:
        callback, self.on_reads_done = self.on_reads_done, None
        if callback is not None:
            callback()

    def _assemble(self) -> None:
        ahead = max(1, self._threads) + max(0, self._prefetch)
        strips = StripCache(
            self._source, self._plan, self._band_rows, self._read_bands, threads=self._threads, ahead=ahead
        )
        ordered = self._tiles
        try:
            batch = BatchAssembler(
                self._source,
                self._scaling,
                self._channel_of,
                batch_size=self._batch_size,
                tile_shape=self._shape,
                native_pad=self._native_pad,
            )
            for index, tile in enumerate(ordered):
                strips.hold_through(tile.row_end)
                if strips.all_submitted:
                    self._reads_done()
                if batch.full and not self._deliver(batch.take()):
                    return
                batch.add(tile, strips)
                # Later tiles start at or below the next tile's top row: bands above it are done.
                if index + 1 < len(ordered):
                    strips.drop_above(ordered[index + 1].row_off)
            self._reads_done()
            if batch.tiles or batch.skipped:
                self._deliver(batch.take())
            self._deliver(_DONE)
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._deliver(error)
        finally:
            strips.close()


def iter_tile_batches(
    source: RasterSource,
    tiles: Sequence[Window],
    batch_size: int,
    scaling: InputScaling,
    *,
    bands: Sequence[int] | None = None,
    prefetch: int = 2,
    threads: int = 2,
    tile_shape: tuple[int, int] | None = None,
    native_pad: int | None = None,
) -> Generator[TileBatch, None, None]:
    """Read, scale and batch ``tiles`` of ``source`` ahead of the consumer (see the module doc).

    Tiles are processed (and batched) in row-major order. ``bands`` (1-based, one per model channel)
    override the scaling's band choice. ``tile_shape`` ``(h, w)`` is the batch's tile shape (default: the
    largest tile); give the model's input size so that tiles of a small image are padded to it.
    All-nodata tiles are skipped and counted. Errors from the reads (UserError) surface here.
    ``native_pad``: batches of the image's own pixels (padded with this value), for a model that folds
    the scaling in (see :class:`BatchAssembler`). :class:`TileBatchStream` is the same as an object
    whose reads can start before it is iterated.
    """
    with TileBatchStream(
        source,
        tiles,
        batch_size,
        scaling,
        bands=bands,
        prefetch=prefetch,
        threads=threads,
        tile_shape=tile_shape,
        native_pad=native_pad,
    ) as stream:
        yield from stream
