"""Lazy raster reads and the tile-batch pipeline that feeds the model.

:class:`RasterSource` opens a local path, ``s3://`` (GDAL ``/vsis3``, byte-range reads) or ``http(s)://``
(``/vsicurl``) image without reading its pixels; only the blocks a read needs are fetched and decoded.

:func:`iter_tile_batches` turns a list of tiles into float32 batches:

- **Strips, not tiles.** The rows the tiles need are split into *bands* of whole internal block rows
  (at least ``STRIP_ROWS`` rows). Each band is read once, as one window per run of needed columns (runs
  that would share a block are merged), so every internal block is requested exactly once however much
  the tiles overlap. Tiles are then cut from the bands in memory.
- **Prefetch.** Band reads run on a pool of ``threads`` threads (GDAL releases the GIL while it fetches and
  decodes), at most ``threads + prefetch`` ahead of the cutter. One assembler thread cuts, checks nodata,
  scales and batches, and keeps up to ``prefetch`` finished batches queued ahead of the consumer.
- **Memory.** Bands are dropped as soon as no remaining tile needs them. The bound is about
  ``(ceil(tile_h / band_h) + 1 + threads + prefetch)`` bands of ``band_h x span`` pixels (``span``: the
  columns the tiles cover, i.e. a region's width plus the overlap) plus ``prefetch + 2`` batches —
  set by the region, never by the image.
- **Nodata.** A tile whose every pixel (in every read band) equals the nodata value (or is NaN for a NaN
  nodata) is skipped and counted in ``TileBatch.skipped``; other nodata pixels become 0 (see scaling).

Thread safety: a rasterio dataset must not be used by two threads at once, so a source keeps a pool of
dataset handles and each read borrows one (opening another when all are busy).
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

import numpy as np
import rasterio
import rasterio.errors
import rasterio.windows

from services.errors import UserError
from services.tiling.scaling import InputScaling
from services.tiling.windows import Window

#: Bands are at least this many rows (whole block rows), so striped files with a few rows per strip are
#: still read in large windows.
STRIP_ROWS = 256
#: Blocks taller than this (e.g. a file stored as one strip) are read in bands of this many rows instead:
#: re-decoding such a block is the price of keeping memory bounded.
MAX_STRIP_ROWS = 4096


def gdal_path(url: str) -> str:
    """The GDAL path for an image URL: ``s3://b/k`` -> ``/vsis3/b/k``, ``https://..`` -> ``/vsicurl/..``."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc or not parsed.path.strip("/"):
            raise UserError(f"{url!r} is not a complete S3 URL; write it as s3://BUCKET/KEY")
        return f"/vsis3/{parsed.netloc}/{parsed.path.lstrip('/')}"
    if parsed.scheme in ("http", "https"):
        return f"/vsicurl/{url}"
    if parsed.scheme == "file":
        return parsed.path
    return url


#: GDAL's block cache in MB, unless GDAL_CACHEMAX is set. Each block is decoded once, so a big cache (GDAL's
#: default is 5% of RAM) only grows the worker: 1.9 GB against 0.6 GB on the 100k x 100k memory benchmark.
GDAL_CACHE_MB = 64
os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHE_MB))


def gdal_s3_options(s3_endpoint: str | None) -> dict[str, str]:
    """GDAL settings for ``/vsis3`` reads; an endpoint (``http://host:port``) points them at a stand-in."""
    options = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}  # never list the bucket to find sidecar files
    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        # GDAL wants host:port without a scheme, and path-style URLs for anything but AWS itself.
        options["AWS_S3_ENDPOINT"] = parsed.netloc
        options["AWS_HTTPS"] = "NO" if parsed.scheme == "http" else "YES"
        options["AWS_VIRTUAL_HOSTING"] = "FALSE"
    return options


class RasterSource:
    """A raster opened lazily: metadata now, pixels only on :meth:`read`. Use :meth:`open`.

    Attributes: ``url``, ``width``, ``height``, ``count``, ``dtype`` (numpy name), ``nodata``,
    ``transform`` (affine), ``crs`` (``rasterio.crs.CRS`` or None), ``block_shape`` ``(rows, cols)``.
    """

    def __init__(self, url: str, path: str, options: dict[str, str], dataset: Any) -> None:
        self.url = url
        self._path = path
        self._options = options
        self._lock = threading.Lock()
        self._opened: list[Any] = [dataset]
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._free.put(dataset)
        self._closed = False
        self.width: int = dataset.width
        self.height: int = dataset.height
        self.count: int = dataset.count
        dtypes = set(dataset.dtypes)
        self.dtype: str = str(np.result_type(*dtypes)) if len(dtypes) > 1 else dataset.dtypes[0]
        self.nodata: float | None = dataset.nodata
        # The bit depth the file declares (GDAL NBITS, e.g. 12-bit data in uint16): the scaling's range.
        bits = dataset.tags(1, ns="IMAGE_STRUCTURE").get("NBITS") if dataset.count else None
        self.nbits: int | None = int(bits) if bits and bits.isdigit() else None
        self.transform = dataset.transform
        self.crs = dataset.crs
        block_rows, block_cols = dataset.block_shapes[0]
        self.block_shape: tuple[int, int] = (int(block_rows), int(block_cols))

    @classmethod
    def open(cls, url: str, *, s3_endpoint: str | None = None) -> RasterSource:
        """Open ``url`` (a path, ``s3://bucket/key`` or ``http(s)://``) without reading its pixels.

        ``s3_endpoint`` (else ``AWS_ENDPOINT_URL``) redirects S3 reads, e.g. to moto's server; credentials
        and region come from the usual AWS variables, which GDAL reads itself.
        Raises UserError naming the URL when it is missing, unreadable or not a raster.
        """
        path = gdal_path(url)
        options = gdal_s3_options(s3_endpoint) if path.startswith("/vsis3/") else {}
        if not path.startswith("/vsi"):
            local = Path(path)
            if not local.exists():
                raise UserError(f"image {url} does not exist; check the path")
            if local.is_dir():
                raise UserError(f"image {url} is a directory, not a raster file")
        dataset = _open_dataset(url, path, options)
        if dataset.count < 1 or dataset.width < 1 or dataset.height < 1:
            dataset.close()
            raise UserError(
                f"image {url} holds no raster bands (a container of subdatasets?); give one raster's path"
            )
        return cls(url, path, options, dataset)

    def read(self, window: Window, *, bands: Sequence[int] | None = None) -> np.ndarray:
        """Pixels ``[C, h, w]`` in the native dtype; parts outside the image are nodata (0 if none).

        ``bands`` are 1-based band numbers (default: all). Thread-safe: each call borrows its own handle.
        """
        indexes = list(bands) if bands is not None else list(range(1, self.count + 1))
        inside = window.intersection(Window(0, 0, self.width, self.height))
        if inside == window:
            return self._read_inside(window, indexes)
        fill = self.nodata if self.nodata is not None else 0
        out = np.full((len(indexes), window.height, window.width), fill, dtype=self.dtype)
        if inside is not None:
            rows = slice(inside.row_off - window.row_off, inside.row_end - window.row_off)
            cols = slice(inside.col_off - window.col_off, inside.col_end - window.col_off)
            out[:, rows, cols] = self._read_inside(inside, indexes)
        return out

    def _read_inside(self, window: Window, indexes: list[int]) -> np.ndarray:
        dataset = self._borrow()
        try:
            gdal_window = rasterio.windows.Window(window.col_off, window.row_off, window.width, window.height)
            # GDAL config options are per thread in rasterio, so each reading thread sets its own.
            with rasterio.Env(**self._options):
                data: np.ndarray = dataset.read(indexes, window=gdal_window, out_dtype=self.dtype)
            return data
        except rasterio.errors.RasterioError as error:
            detail = str(error)
            if "previous exception" in detail and (error.__cause__ or error.__context__):
                detail = str(error.__cause__ or error.__context__)  # GDAL's own words
            raise UserError(
                f"reading {self.url} failed at {window}: {detail}; the file may be truncated or corrupt"
            ) from error
        finally:
            self._free.put(dataset)

    def _borrow(self) -> Any:
        if self._closed:
            raise ValueError(f"{self.url} is closed")
        try:
            return self._free.get_nowait()
        except queue.Empty:
            dataset = _open_dataset(self.url, self._path, self._options)
            with self._lock:
                self._opened.append(dataset)
            return dataset

    def close(self) -> None:
        """Close every dataset handle this source opened."""
        with self._lock:
            self._closed = True
            for dataset in self._opened:
                dataset.close()
            self._opened.clear()

    def __enter__(self) -> RasterSource:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _open_dataset(url: str, path: str, options: dict[str, str]) -> Any:
    try:
        with rasterio.Env(**options):
            return rasterio.open(path)
    except rasterio.errors.RasterioError as error:
        raise UserError(f"cannot read {url} as a raster image: {error}") from error


@dataclass(frozen=True)
class TileBatch:
    """Tiles ready for the model: ``pixels`` float32 ``[B, C, tile_h, tile_w]``, row i holding ``tiles[i]``.

    ``B <= batch_size``: the last batch may be short. A tile smaller than the batch's tile shape (an image
    smaller than a tile) sits at the top-left, padded with 0. ``skipped`` counts the all-nodata tiles dropped
    since the previous batch; a batch with no tiles (B = 0) is yielded only when every tile was skipped.
    """

    tiles: list[Window]
    pixels: np.ndarray
    skipped: int


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


def _cut(
    tile: Window, strips: dict[int, list[tuple[Window, np.ndarray]]], band_rows: int, out: np.ndarray
) -> None:
    """Copy the parts of ``tile`` held by the strips into ``out`` ([C, h, w], pre-filled)."""
    for band in range(max(tile.row_off, 0) // band_rows, (tile.row_end - 1) // band_rows + 1):
        for window, data in strips.get(band, ()):
            part = tile.intersection(window)
            if part is None:
                continue
            out[
                :,
                part.row_off - tile.row_off : part.row_end - tile.row_off,
                part.col_off - tile.col_off : part.col_end - tile.col_off,
            ] = data[
                :,
                part.row_off - window.row_off : part.row_end - window.row_off,
                part.col_off - window.col_off : part.col_end - window.col_off,
            ]


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


_DONE = object()


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
) -> Generator[TileBatch, None, None]:
    """Read, scale and batch ``tiles`` of ``source`` ahead of the consumer (see the module doc).

    Tiles are processed (and batched) in row-major order. ``bands`` (1-based, one per model channel)
    override the scaling's band choice. ``tile_shape`` ``(h, w)`` is the batch's tile shape (default: the
    largest tile); give the model's input size so that tiles of a small image are padded to it.
    All-nodata tiles are skipped and counted. Errors from the reads (UserError) surface here.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if not tiles:
        return
    # Refuse an image the scaling's rules do not cover before any read (see services/tiling/scaling.py).
    scaling = scaling.for_image(source.dtype, source.count, nbits=source.nbits, bands=bands)
    feed = scaling.band_indexes(source.count, bands)
    read_bands = sorted(set(feed))
    channel_of = np.array([read_bands.index(b) for b in feed])
    ordered = sorted(tiles, key=lambda t: (t.row_off, t.col_off))
    shape_h = tile_shape[0] if tile_shape else max(t.height for t in ordered)
    shape_w = tile_shape[1] if tile_shape else max(t.width for t in ordered)
    if any(t.height > shape_h or t.width > shape_w for t in ordered):
        raise UserError(f"a tile is larger than the batch tile shape {shape_h} x {shape_w}")
    band_rows, plan = plan_strip_reads(ordered, source.width, source.height, source.block_shape)

    results: queue.Queue[object] = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def deliver(item: object) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def assemble() -> None:
        pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="tile-read")
        try:
            pending: deque[tuple[int, Window, Future[np.ndarray]]] = deque()
            reads = iter(plan)
            ahead = max(1, threads) + max(0, prefetch)

            def top_up() -> None:
                while len(pending) < ahead:
                    read = next(reads, None)
                    if read is None:
                        return
                    band, window = read
                    pending.append((band, window, pool.submit(source.read, window, bands=read_bands)))

            strips: dict[int, list[tuple[Window, np.ndarray]]] = {}
            fill = source.nodata if source.nodata is not None else 0
            nodata = native_nodata(source.nodata, source.dtype)
            batch: list[Window] = []
            pixels = np.zeros((batch_size, len(feed), shape_h, shape_w), dtype=np.float32)
            skipped = 0
            top_up()
            for index, tile in enumerate(ordered):
                # Reads arrive in band order: take every one up to the tile's last band.
                last_band = (min(tile.row_end, source.height) - 1) // band_rows
                while pending and pending[0][0] <= last_band:
                    band, window, future = pending.popleft()
                    strips.setdefault(band, []).append((window, future.result()))
                    top_up()
                raw = np.full((len(read_bands), tile.height, tile.width), fill, dtype=source.dtype)
                _cut(tile, strips, band_rows, raw)
                if _all_nodata(raw, nodata):
                    skipped += 1
                else:
                    if len(batch) == batch_size:
                        if not deliver(TileBatch(batch, pixels, skipped)):
                            return
                        batch, skipped = [], 0
                        pixels = np.zeros((batch_size, len(feed), shape_h, shape_w), dtype=np.float32)
                    slot = pixels[len(batch), :, : tile.height, : tile.width]
                    scaling.apply(raw[channel_of], nodata=nodata, out=slot)
                    batch.append(tile)
                # Later tiles start at or below the next tile's top row: bands above it are done.
                if index + 1 < len(ordered):
                    keep_from = max(ordered[index + 1].row_off, 0) // band_rows
                    for band in [b for b in strips if b < keep_from]:
                        del strips[band]
            if batch or skipped:
                deliver(TileBatch(batch, pixels[: len(batch)], skipped))
            deliver(_DONE)
        except BaseException as error:  # handed to the consumer, which re-raises it
            deliver(error)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    worker = threading.Thread(target=assemble, name="tile-assembler", daemon=True)
    worker.start()
    try:
        while True:
            item = results.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, TileBatch)
            yield item
    finally:
        stop.set()
        worker.join()
