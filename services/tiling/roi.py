"""Regions of interest: GeoJSON or WKT, in lon/lat or map coordinates, turned into pixel space to pick tiles.

Lon/lat text is GeoJSON's axis order (longitude first, EPSG:4326). Map coordinates are the image's own
CRS (or its georeferencing alone when it has no CRS). Before reprojection, lon/lat edges are split into
short segments so that long straight edges follow their true path in the image's projection.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import rasterio.errors
import rasterio.warp
import shapely
import shapely.errors
from shapely import affinity
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from services.errors import UserError
from services.tiling.windows import Window

RoiCoordinates = Literal["lonlat", "map"]
_SEGMENTS_PER_EXTENT = 64


def parse_roi(text: str, *, crs_of_text: RoiCoordinates = "lonlat") -> BaseGeometry:
    """A polygonal region of interest from GeoJSON (geometry, Feature or FeatureCollection) or WKT.

    The geometry stays in the text's coordinates; ``crs_of_text="lonlat"`` also checks that they look like
    longitudes and latitudes. Raises UserError when the text is neither, or holds no area.
    """
    if crs_of_text not in ("lonlat", "map"):
        raise UserError(f"ROI coordinates must be 'lonlat' or 'map', got {crs_of_text!r}")
    stripped = text.strip()
    if not stripped:
        raise UserError("the region of interest is empty; give GeoJSON or WKT")
    if stripped.startswith("{"):
        try:
            document = json.loads(stripped)
        except json.JSONDecodeError as error:
            raise UserError(f"the region of interest is not valid JSON: {error}") from error
        geometry = _geojson_geometry(document)
    else:
        try:
            geometry = shapely.from_wkt(stripped)
        except shapely.errors.GEOSException as error:
            raise UserError(f"the region of interest is neither GeoJSON nor valid WKT: {error}") from error
    if geometry is None or geometry.is_empty or geometry.area <= 0:
        raise UserError("the region of interest must be a polygon or multipolygon with an area")
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
    if crs_of_text == "lonlat":
        west, south, east, north = geometry.bounds
        if west < -180 or east > 180 or south < -90 or north > 90:
            raise UserError(
                "the region of interest is not in longitude/latitude (coordinates outside +-180/+-90); "
                "give it in lon/lat or say it is in map coordinates"
            )
    return geometry


def _geojson_geometry(document: Any) -> BaseGeometry:
    if not isinstance(document, dict) or "type" not in document:
        raise UserError("the region of interest must be a GeoJSON object with a 'type'")
    kind = document["type"]
    try:
        if kind == "FeatureCollection":
            parts = [_geojson_geometry(feature) for feature in document.get("features") or []]
            if not parts:
                raise UserError("the region of interest is a FeatureCollection with no features")
            return shapely.union_all(parts)
        if kind == "Feature":
            if not document.get("geometry"):
                raise UserError("the region of interest is a Feature without a geometry")
            return _geojson_geometry(document["geometry"])
        return shape(document)
    except (KeyError, TypeError, ValueError, AttributeError, shapely.errors.ShapelyError) as error:
        if isinstance(error, UserError):
            raise
        raise UserError(
            f"the region of interest is not a valid GeoJSON geometry ({error}); give a Polygon, "
            "MultiPolygon, Feature or FeatureCollection"
        ) from error


def roi_pixel_polygon(
    geometry: BaseGeometry, *, crs_of_text: RoiCoordinates, crs: Any, transform: Any
) -> BaseGeometry:
    """The region of interest in the image's pixel coordinates (columns, rows).

    ``crs``/``transform`` are the image's (``RasterSource.crs``/``.transform``). A lon/lat ROI on an
    image without a CRS raises UserError.
    """
    if crs_of_text == "lonlat":
        if crs is None:
            raise UserError(
                "the image has no CRS, so a lon/lat region of interest cannot be placed; use map coordinates"
            )
        west, south, east, north = geometry.bounds
        step = max(east - west, north - south) / _SEGMENTS_PER_EXTENT
        dense = shapely.segmentize(geometry, step) if step > 0 else geometry
        try:
            mapped = shape(rasterio.warp.transform_geom("EPSG:4326", crs, mapping(dense)))
        # GDAL's projection errors (CPLE_*) are not RasterioErrors: any failure here means the same.
        except Exception as error:
            raise UserError(
                f"the region of interest cannot be projected to the image's CRS ({crs}): {error}; give an "
                "ROI inside the area the image's projection covers, or in map coordinates"
            ) from error
        if mapped.is_empty or not all(math.isfinite(v) for v in mapped.bounds):
            raise UserError(
                f"the region of interest lies outside the area the image's CRS ({crs}) can represent; "
                "give an ROI over the image"
            )
        geometry = mapped
    inverse = ~transform
    # shapely.affine_transform takes [a, b, d, e, xoff, yoff] of x' = a x + b y + xoff, y' = d x + e y + yoff.
    pixel = affinity.affine_transform(
        geometry, [inverse.a, inverse.b, inverse.d, inverse.e, inverse.c, inverse.f]
    )
    return pixel if pixel.is_valid else shapely.make_valid(pixel)


def tiles_in_roi(tiles: Sequence[Window], roi_pixel_polygon: BaseGeometry) -> list[Window]:
    """The tiles (or regions: any windows) sharing area with the pixel-space ROI, in their given order."""
    if not tiles:
        return []
    bounds = np.array([(t.col_off, t.row_off, t.col_end, t.row_end) for t in tiles], dtype=np.float64)
    boxes = shapely.box(bounds[:, 0], bounds[:, 1], bounds[:, 2], bounds[:, 3])
    shapely.prepare(roi_pixel_polygon)
    # Sharing only an edge or a corner is not sharing pixels.
    keep = shapely.intersects(boxes, roi_pixel_polygon) & ~shapely.touches(boxes, roi_pixel_polygon)
    return [tile for tile, kept in zip(tiles, keep.tolist(), strict=True) if kept]


def roi_windows(
    text: str, tiles: Sequence[Window], *, crs_of_text: RoiCoordinates, crs: Any, transform: Any
) -> list[Window]:
    """Parse ``text``, place it on the image, and keep the ``tiles`` it covers."""
    geometry = parse_roi(text, crs_of_text=crs_of_text)
    return tiles_in_roi(
        tiles, roi_pixel_polygon(geometry, crs_of_text=crs_of_text, crs=crs, transform=transform)
    )
