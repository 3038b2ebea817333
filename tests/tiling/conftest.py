"""Rasters written by the tests: several CRSs, odd sizes, 1/3/4 bands, uint8/uint16, tiled and striped."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

#: Where each CRS's test rasters sit: an upper-left corner and a pixel size in that CRS's units.
ORIGINS: dict[str, tuple[float, float, float]] = {
    "EPSG:4326": (12.0, 47.0, 0.0001),
    "EPSG:32633": (500_000.0, 5_000_000.0, 0.5),
    "EPSG:3857": (1_335_000.0, 5_940_000.0, 0.6),
}

RasterMaker = Callable[..., tuple[Path, np.ndarray]]


def write_raster(
    path: Path,
    *,
    width: int,
    height: int,
    count: int = 3,
    dtype: str = "uint8",
    crs: str | None = "EPSG:32633",
    tiled: bool = True,
    block: int = 256,
    rows_per_strip: int = 16,
    nodata: float | None = None,
    data: np.ndarray | None = None,
    seed: int = 0,
    compress: str | None = None,
    interleave: str = "pixel",
) -> tuple[Path, np.ndarray]:
    """Write a GeoTIFF and return its path and the pixels written ``[count, height, width]``."""
    if data is None:
        rng = np.random.default_rng(seed)
        info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
        if info is not None:
            data = rng.integers(info.min, info.max, size=(count, height, width), endpoint=True, dtype=dtype)
        else:
            data = rng.random((count, height, width)).astype(dtype)
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": dtype,
        "interleave": interleave,
    }
    if crs is not None:
        west, north, size = ORIGINS[crs]
        profile |= {"crs": crs, "transform": from_origin(west, north, size, size)}
    else:
        # Georeferenced by pixel size only, no CRS: a transform that is not the identity.
        profile["transform"] = from_origin(100.0, 200.0, 2.0, 2.0)
    if tiled:
        profile |= {"tiled": True, "blockxsize": block, "blockysize": block}
    else:
        profile |= {"tiled": False, "blockysize": rows_per_strip}
    if nodata is not None:
        profile["nodata"] = nodata
    if compress:
        profile["compress"] = compress
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(data)
    return path, data


@pytest.fixture
def make_raster(tmp_path: Path) -> RasterMaker:
    """``make_raster(name, width=..., height=..., ...)`` writes a raster under the test's directory."""

    def _make(name: str = "image.tif", **kwargs: Any) -> tuple[Path, np.ndarray]:
        return write_raster(tmp_path / name, **kwargs)

    return _make
