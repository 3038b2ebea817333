"""Regions of interest in lon/lat and map coordinates keep exactly the tiles they cover."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio.warp
from rasterio.transform import from_origin

from services.errors import UserError
from services.tiling.reader import RasterSource
from services.tiling.roi import parse_roi, roi_pixel_polygon, roi_windows, tiles_in_roi
from services.tiling.windows import Grid, Window

RasterMaker = Callable[..., tuple[Path, np.ndarray]]

# The UTM test raster: upper-left (500000, 5000000) in EPSG:32633, 0.5 m pixels, 1037 x 771.
UTM_TRANSFORM = from_origin(500_000.0, 5_000_000.0, 0.5, 0.5)
ALL_TILES = Grid(200, 160, 30, 20).tiles_of(Window(0, 0, 1037, 771), 1037, 771)


def expected_tiles(col0: float, row0: float, col1: float, row1: float) -> set[Window]:
    """Tiles sharing area with a pixel rectangle, found without shapely."""
    return {
        t
        for t in ALL_TILES
        if t.col_off < col1 and t.col_end > col0 and t.row_off < row1 and t.row_end > row0
    }


def map_rectangle(col0: float, row0: float, col1: float, row1: float) -> tuple[float, float, float, float]:
    return (500_000 + col0 * 0.5, 5_000_000 - row1 * 0.5, 500_000 + col1 * 0.5, 5_000_000 - row0 * 0.5)


def test_map_coordinates_wkt_keeps_the_tiles_it_covers() -> None:
    west, south, east, north = map_rectangle(333, 222, 611, 405)
    wkt = f"POLYGON (({west} {south}, {east} {south}, {east} {north}, {west} {north}, {west} {south}))"
    kept = roi_windows(wkt, ALL_TILES, crs_of_text="map", crs="EPSG:32633", transform=UTM_TRANSFORM)
    assert set(kept) == expected_tiles(333, 222, 611, 405)
    assert 0 < len(kept) < len(ALL_TILES)
    assert kept == [t for t in ALL_TILES if t in set(kept)]  # the given order is kept


def test_lonlat_geojson_is_projected_onto_the_image(make_raster: RasterMaker) -> None:
    path, _ = make_raster(width=1037, height=771, crs="EPSG:32633")
    west, south, east, north = map_rectangle(105, 410, 890, 700)
    lons, lats = rasterio.warp.transform(
        "EPSG:32633", "EPSG:4326", [west, east, east, west, west], [south, south, north, north, south]
    )
    feature = {
        "type": "Feature",
        "properties": {"name": "field"},
        "geometry": {"type": "Polygon", "coordinates": [list(map(list, zip(lons, lats, strict=True)))]},
    }
    with RasterSource.open(str(path)) as source:
        kept = roi_windows(
            json.dumps(feature), ALL_TILES, crs_of_text="lonlat", crs=source.crs, transform=source.transform
        )
        polygon = roi_pixel_polygon(
            parse_roi(json.dumps(feature)), crs_of_text="lonlat", crs=source.crs, transform=source.transform
        )
    assert set(kept) == expected_tiles(105, 410, 890, 700)
    # Straight lon/lat edges bend by millimetres in UTM: a hundredth of a pixel here.
    assert polygon.bounds == pytest.approx((105, 410, 890, 700), abs=0.02)


def test_a_concave_roi_drops_tiles_in_its_notch() -> None:
    # An L shape over a geographic image (lon/lat are the map coordinates here).
    transform = from_origin(12.0, 47.0, 0.001, 0.001)
    collection = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}
            for ring in (
                [[12.0, 47.0], [12.2, 47.0], [12.2, 46.95], [12.0, 46.95], [12.0, 47.0]],
                [[12.0, 47.0], [12.05, 47.0], [12.05, 46.3], [12.0, 46.3], [12.0, 47.0]],
            )
        ],
    }
    tiles = Grid(100, 100, 0, 0).tiles_of(Window(0, 0, 1000, 1000), 1000, 1000)
    kept = set(
        roi_windows(json.dumps(collection), tiles, crs_of_text="lonlat", crs="EPSG:4326", transform=transform)
    )
    # Arms: rows 0-50 x columns 0-200, and columns 0-50 x rows 0-700.
    arm = {t for t in tiles if t.row_off < 50 and t.col_off < 200} | {
        t for t in tiles if t.col_off < 50 and t.row_off < 700
    }
    assert kept == arm
    assert Window(500, 500, 100, 100) not in kept


def test_tiles_that_only_touch_the_roi_are_dropped() -> None:
    roi = parse_roi("POLYGON ((200 0, 400 0, 400 160, 200 160, 200 0))", crs_of_text="map")
    tiles = [
        Window(0, 0, 200, 160),
        Window(400, 0, 100, 100),
        Window(399, 0, 100, 100),
        Window(0, 160, 500, 10),
    ]
    assert tiles_in_roi(tiles, roi) == [Window(399, 0, 100, 100)]


def test_regions_outside_the_roi_can_be_dropped_too() -> None:
    west, south, east, north = map_rectangle(10, 10, 100, 90)
    wkt = f"POLYGON (({west} {south}, {east} {south}, {east} {north}, {west} {north}, {west} {south}))"
    regions = Grid(200, 160, 30, 20, 400, 300).regions(1037, 771)
    kept = roi_windows(wkt, regions, crs_of_text="map", crs="EPSG:32633", transform=UTM_TRANSFORM)
    assert kept == [regions[0]]


@pytest.mark.parametrize(
    ("text", "crs_of_text", "message"),
    [
        ("", "lonlat", "empty"),
        ("{not json", "lonlat", "not valid JSON"),
        ("POLYGON ((0 0, 1 0", "map", "neither GeoJSON nor valid WKT"),
        ('{"type": "Point", "coordinates": [12.1, 46.9]}', "lonlat", "with an area"),
        ('{"type": "FeatureCollection", "features": []}', "lonlat", "no features"),
        ('{"type": "Polygon", "coordinates": "nope"}', "lonlat", "not a valid GeoJSON geometry"),
        ('{"type": "Blob", "coordinates": [[0, 0]]}', "lonlat", "give a Polygon, MultiPolygon, Feature"),
        (
            "POLYGON ((500000 5000000, 500100 5000000, 500100 4999900, 500000 5000000))",
            "lonlat",
            "not in longitude",
        ),
        ("POLYGON ((0 0, 1 0, 1 1, 0 0))", "pixels", "must be 'lonlat' or 'map'"),
    ],
)
def test_bad_rois_are_user_errors(text: str, crs_of_text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_roi(text, crs_of_text=crs_of_text)  # type: ignore[arg-type]


def test_a_lonlat_roi_needs_an_image_crs() -> None:
    roi = parse_roi("POLYGON ((12 46, 13 46, 13 47, 12 46))")
    with pytest.raises(UserError, match="no CRS"):
        roi_pixel_polygon(roi, crs_of_text="lonlat", crs=None, transform=UTM_TRANSFORM)


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param("gdal", id="GDAL refuses the projection"),
        pytest.param("infinite", id="the projection gives infinite coordinates"),
    ],
)
def test_an_roi_the_image_crs_cannot_take_is_a_user_error(
    failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rasterio._err import CPLE_AppDefinedError

    def transform_geom(*_: object) -> dict[str, object]:
        if failure == "gdal":
            raise CPLE_AppDefinedError(1, 1, "Point outside of projection domain")
        inf = float("inf")
        return {"type": "Polygon", "coordinates": [[(0, 0), (inf, 0), (inf, inf), (0, 0)]]}

    monkeypatch.setattr(rasterio.warp, "transform_geom", transform_geom)
    roi = parse_roi("POLYGON ((12 46, 13 46, 13 47, 12 46))")
    with pytest.raises(UserError, match="region of interest"):
        roi_pixel_polygon(roi, crs_of_text="lonlat", crs="EPSG:32633", transform=UTM_TRANSFORM)
