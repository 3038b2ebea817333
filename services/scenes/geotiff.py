"""Write a synthetic scene as a big georeferenced, internally tiled GeoTIFF, block by block.

Memory stays at a few blocks whatever the image size: the layout (a few numbers per object) is computed
first, then each block is painted from it and written. A sparse scene (content areas) writes only the blocks
that touch an area; the others are left out of the file (GDAL ``SPARSE_OK``) and read back as nodata (0), so
a 100,000 x 100,000 px image with a few content areas takes seconds and a few megabytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import rasterio
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.transform import Affine
from rasterio.windows import Window as RioWindow

from services.errors import UserError
from services.scenes.synthetic import (
    DEFAULT_CLASSES,
    DEFAULT_DENSITY,
    SceneLayout,
    layout_scene,
    render_window,
)

#: Compressions the writer offers; JPEG is lossy (pixels near nodata may not stay exactly 0).
COMPRESSIONS = ("deflate", "jpeg", "lzw", "none")


def write_scene_geotiff(
    path: str | Path,
    width: int,
    height: int,
    *,
    seed: int,
    crs: str = "EPSG:32633",
    transform: Affine | None = None,
    classes: Sequence[str] = DEFAULT_CLASSES,
    density: float = DEFAULT_DENSITY,
    areas: Sequence[tuple[int, int, int, int]] | None = None,
    block_size: int = 512,
    compress: str = "deflate",
    progress: Callable[[int, int], None] | None = None,
) -> SceneLayout:
    """Write a 3-band uint8 scene GeoTIFF in ``block_size`` tiles; return its layout (the known objects).

    ``crs`` is anything rasterio understands ("EPSG:4326", WKT, PROJ); without ``transform`` the image is
    placed at 0.5 m pixels (projected CRS) or 4.5e-6 degree pixels (geographic CRS) near 12 E, 45 N.
    ``areas`` ((x, y, width, height), e.g. from ``content_areas``) makes a sparse scene: only blocks that
    touch an area are written. Nodata is 0; painted pixels are never 0. ``progress(done, total)`` is called
    after each block row. Boxes of the returned layout are in pixels of this image.
    """
    if compress not in COMPRESSIONS:
        raise UserError(f"compress must be one of {list(COMPRESSIONS)}, got {compress!r}")
    if block_size <= 0 or block_size % 16:
        raise UserError(f"block_size must be a positive multiple of 16 (a TIFF rule), got {block_size}")
    try:
        crs_obj = CRS.from_user_input(crs)
    except (CRSError, ValueError) as exc:
        raise UserError(f"cannot understand the CRS {crs!r}: {exc}") from None
    if transform is None:
        transform = _default_transform(crs_obj)
    layout = layout_scene(width, height, seed=seed, classes=classes, density=density, areas=areas)

    profile: dict[str, object] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": "uint8",
        "crs": crs_obj,
        "transform": transform,
        "nodata": 0,
        "tiled": True,
        "blockxsize": block_size,
        "blockysize": block_size,
        "interleave": "pixel",
        "BIGTIFF": "IF_SAFER",
        # Blocks never written stay out of the file and read back as nodata.
        "SPARSE_OK": "TRUE",
        "NUM_THREADS": "ALL_CPUS",
    }
    if compress == "jpeg":
        profile.update(compress="jpeg", photometric="ycbcr", jpeg_quality=90)
    elif compress != "none":
        profile.update(compress=compress, predictor=2)

    rows = range(0, height, block_size)
    with rasterio.open(path, "w", **profile) as dst:
        for done, row in enumerate(rows, start=1):
            for col in range(0, width, block_size):
                w, h = min(block_size, width - col), min(block_size, height - row)
                if layout.areas is not None and not _touches(layout.areas, col, row, w, h):
                    continue
                dst.write(render_window(layout, col, row, w, h), window=RioWindow(col, row, w, h))
            if progress is not None:
                progress(done, len(rows))
    return layout


def _touches(areas: Sequence[tuple[int, int, int, int]], x: int, y: int, w: int, h: int) -> bool:
    return any(ax < x + w and x < ax + aw and ay < y + h and y < ay + ah for ax, ay, aw, ah in areas)


def _default_transform(crs: CRS) -> Affine:
    if crs.is_geographic:
        return Affine(4.5e-6, 0.0, 12.0, 0.0, -4.5e-6, 45.0)
    return Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 5_000_000.0)
