"""Lazy raster reads: :class:`RasterSource` opens a local path, ``s3://`` (GDAL ``/vsis3``, byte-range
reads) or ``http(s)://`` (``/vsicurl``) image without reading its pixels; only the blocks a read needs are
fetched and decoded. The tile batches that feed the model are cut from these reads by
:mod:`services.tiling.batches`.

Thread safety: a rasterio dataset must not be used by two threads at once, so a source keeps a pool of
dataset handles and each read borrows one (opening another when all are busy).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

import numpy as np
import rasterio
import rasterio.errors
import rasterio.windows

from services.errors import UserError
from services.tiling.windows import Window


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
#: A strip read needs one block (all bands) at a time in it: 32 MB decodes no block twice with 1024 px blocks
#: either, and keeps 30-40 MB less than 64 (bench/README.md, "Pipeline floor").
GDAL_CACHE_MB = 32
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

    def read(
        self, window: Window, *, bands: Sequence[int] | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Pixels ``[C, h, w]`` in the native dtype; parts outside the image are nodata (0 if none).

        ``bands`` are 1-based band numbers (default: all). ``out``: a C-contiguous array of that shape and
        dtype to read into (and return) instead of a new one — a caller reading many windows of one shape
        reuses its arrays, sparing the page faults of a fresh allocation per read.
        Thread-safe: each call borrows its own handle.
        """
        indexes = list(bands) if bands is not None else list(range(1, self.count + 1))
        shape = (len(indexes), window.height, window.width)
        if out is not None and (
            out.shape != shape or out.dtype != np.dtype(self.dtype) or not out.flags.c_contiguous
        ):
            raise ValueError(f"out must be a C-contiguous {self.dtype} array of shape {shape}")
        inside = window.intersection(Window(0, 0, self.width, self.height))
        if inside == window:
            return self._read_inside(window, indexes, out)
        fill = self.nodata if self.nodata is not None else 0
        if out is None:
            out = np.full(shape, fill, dtype=self.dtype)
        else:
            out[...] = fill
        if inside is not None:
            rows = slice(inside.row_off - window.row_off, inside.row_end - window.row_off)
            cols = slice(inside.col_off - window.col_off, inside.col_end - window.col_off)
            out[:, rows, cols] = self._read_inside(inside, indexes)
        return out

    def _read_inside(self, window: Window, indexes: list[int], out: np.ndarray | None = None) -> np.ndarray:
        dataset = self._borrow()
        try:
            gdal_window = rasterio.windows.Window(window.col_off, window.row_off, window.width, window.height)
            # GDAL config options are per thread in rasterio, so each reading thread sets its own (a local
            # file has none: entering an Env costs ~0.2 ms of Python holding the GIL, per read).
            with rasterio.Env(**self._options) if self._options else contextlib.nullcontext():
                if out is None:
                    data: np.ndarray = dataset.read(indexes, window=gdal_window, out_dtype=self.dtype)
                else:
                    data = dataset.read(indexes, window=gdal_window, out=out)
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
