"""Tiling: the tile grid and regions, lazy block-aligned raster reads, input scaling, regions of interest.

No AWS here: ``s3://`` images are read by GDAL itself (``/vsis3`` range reads).
"""

from services.tiling.batches import TileBatch, iter_tile_batches
from services.tiling.reader import RasterSource
from services.tiling.roi import parse_roi, roi_pixel_polygon, roi_windows, tiles_in_roi
from services.tiling.scaling import InputScaling
from services.tiling.windows import Grid, Window

__all__ = [
    "Grid",
    "InputScaling",
    "RasterSource",
    "TileBatch",
    "Window",
    "iter_tile_batches",
    "parse_roi",
    "roi_pixel_polygon",
    "roi_windows",
    "tiles_in_roi",
]
