"""GeoJSON output: boxes land where they are on the Earth, RFC 7946 shape, streamed in chunks."""

from __future__ import annotations

import io
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine, from_origin

from services.errors import UserError
from services.geo.features import FeatureWriter, NonFiniteError, box_rings

# WGS 84 and UTM constants, for projecting the known points independently of GDAL/PROJ.
A, F, K0 = 6_378_137.0, 1 / 298.257223563, 0.9996
E2 = F * (2 - F)


def utm_north(lon: float, lat: float, zone: int) -> tuple[float, float]:
    """Easting, northing of a point in a northern UTM zone (Snyder, USGS PP 1395, eqs. 8-9 to 8-10)."""
    phi, lam = math.radians(lat), math.radians(lon)
    lam0 = math.radians(zone * 6 - 183)
    ep2 = E2 / (1 - E2)
    n = A / math.sqrt(1 - E2 * math.sin(phi) ** 2)
    t = math.tan(phi) ** 2
    c = ep2 * math.cos(phi) ** 2
    a = (lam - lam0) * math.cos(phi)
    e4, e6 = E2 * E2, E2**3
    m = A * (
        (1 - E2 / 4 - 3 * e4 / 64 - 5 * e6 / 256) * phi
        - (3 * E2 / 8 + 3 * e4 / 32 + 45 * e6 / 1024) * math.sin(2 * phi)
        + (15 * e4 / 256 + 45 * e6 / 1024) * math.sin(4 * phi)
        - (35 * e6 / 3072) * math.sin(6 * phi)
    )
    x = K0 * n * (a + (1 - t + c) * a**3 / 6 + (5 - 18 * t + t * t + 72 * c - 58 * ep2) * a**5 / 120)
    y = K0 * (
        m
        + n
        * math.tan(phi)
        * (
            a * a / 2
            + (5 - t + 9 * c + 4 * c * c) * a**4 / 24
            + (61 - 58 * t + t * t + 600 * c - 330 * ep2) * a**6 / 720
        )
    )
    return x + 500_000.0, y


def web_mercator(lon: float, lat: float) -> tuple[float, float]:
    return A * math.radians(lon), A * math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))


def transform_putting(pixel: tuple[float, float], at: tuple[float, float], size: float) -> Affine:
    """A north-up transform placing the map point ``at`` at pixel coordinates ``pixel``."""
    return from_origin(at[0] - pixel[0] * size, at[1] + pixel[1] * size, size, size)


def write_features(boxes: Any, scores: Any, labels: Any, **kwargs: Any) -> dict[str, Any]:
    stream = io.BytesIO()
    settings: dict[str, Any] = {"class_names": ["car", "ship"], "model": "m1", "job": "j1"} | kwargs
    with FeatureWriter(stream, **settings) as writer:
        writer.write(
            np.asarray(boxes, np.float32), np.asarray(scores, np.float32), np.asarray(labels, np.int32)
        )
    document: dict[str, Any] = strict_json(stream.getvalue())
    return document


def strict_json(text: bytes) -> Any:
    """JSON as RFC 8259 has it: ``NaN``, ``Infinity`` and ``-Infinity`` are refused."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def signed_area(ring: list[list[float]]) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring))


def assert_rfc7946(document: dict[str, Any]) -> None:
    assert document["type"] == "FeatureCollection"
    assert "crs" not in document  # RFC 7946 removed it: coordinates are always WGS 84 lon/lat
    for feature in document["features"]:
        assert feature["type"] == "Feature"
        geometry = feature["geometry"]
        if geometry is None:
            continue
        assert geometry["type"] == "Polygon"
        (ring,) = geometry["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1], "rings are closed"
        assert signed_area(ring) > 0, "exterior rings are counter-clockwise"
        for lon, lat in ring:
            assert -180 <= lon <= 180 and -90 <= lat <= 90
            assert round(lon, 7) == lon and round(lat, 7) == lat


@pytest.mark.parametrize(
    ("crs", "project", "size"),
    [
        ("EPSG:4326", lambda lon, lat: (lon, lat), 1e-5),
        ("EPSG:32633", lambda lon, lat: utm_north(lon, lat, 33), 0.5),
        ("EPSG:3857", web_mercator, 0.3),
    ],
)
def test_a_box_centre_lands_on_its_known_lon_lat(crs: str, project: Any, size: float, tmp_path: Path) -> None:
    lon, lat = 15.4321, 45.6789
    centre = (517.5, 303.5)  # the middle of pixel (517, 303)
    path = tmp_path / "known.tif"
    profile = {"driver": "GTiff", "width": 1037, "height": 771, "count": 1, "dtype": "uint8", "crs": crs}
    with rasterio.open(
        path, "w", transform=transform_putting(centre, project(lon, lat), size), **profile
    ) as dst:
        dst.write(np.zeros((1, 771, 1037), np.uint8))
    with rasterio.open(path) as src:
        transform, image_crs = src.transform, src.crs
    boxes = [[515.5, 301.5, 519.5, 305.5], [0, 0, 1037, 771]]
    document = write_features(boxes, [0.9, 0.5], [0, 1], transform=transform, crs=image_crs)
    assert_rfc7946(document)
    ring = np.array(document["features"][0]["geometry"]["coordinates"][0])
    assert ring[:4].mean(axis=0) == pytest.approx([lon, lat], abs=2e-7)  # ~2 cm
    whole = np.array(document["features"][1]["geometry"]["coordinates"][0])
    assert whole[:, 0].min() < lon < whole[:, 0].max() and whole[:, 1].min() < lat < whole[:, 1].max()


def test_rings_are_counter_clockwise_whatever_the_transform() -> None:
    boxes = np.array([[10, 20, 30, 60], [0, 0, 1, 1]], dtype=np.float64)
    for transform in (
        from_origin(12.0, 47.0, 0.001, 0.001),  # north up
        Affine(0.001, 0, 12.0, 0, 0.001, 46.0),  # south up
        Affine(-0.001, 0, 13.0, 0, -0.001, 47.0),  # mirrored
        Affine.translation(12.0, 47.0) @ Affine.rotation(30) @ Affine.scale(0.001, -0.001),
    ):
        rings = box_rings(boxes, transform, "EPSG:4326")
        assert rings.shape == (2, 5, 2)
        assert (rings[:, 0] == rings[:, -1]).all()
        for ring in rings:
            assert signed_area(ring.tolist()) > 0


def test_properties_and_classes() -> None:
    transform = from_origin(12.0, 47.0, 0.001, 0.001)
    document = write_features(
        [[1.234, 2.0, 11.5, 12.25], [3, 4, 5, 6], [0, 0, 2, 2]],
        [0.87654321, 0.5, 0.25],
        [1, 0, 9],
        transform=transform,
        crs="EPSG:4326",
        properties={"mission": "alpha", "revision": 3},
    )
    first, second, third = (f["properties"] for f in document["features"])
    assert first == {
        "class": "ship",
        "score": 0.8765,
        "pixel_bbox": [1.23, 2.0, 11.5, 12.25],
        "model": "m1",
        "job": "j1",
        "mission": "alpha",
        "revision": 3,
    }
    assert second["class"] == "car" and third["class"] == "class_9"
    (ring,) = document["features"][0]["geometry"]["coordinates"]
    assert min(p[0] for p in ring) == pytest.approx(12.0 + 1.234 * 0.001, abs=1e-7)
    assert max(p[1] for p in ring) == pytest.approx(47.0 - 2.0 * 0.001, abs=1e-7)


def test_an_image_without_crs_gets_null_geometry_and_keeps_pixel_boxes() -> None:
    document = write_features([[5, 6, 7, 8]], [0.7], [0], transform=from_origin(100, 200, 2, 2), crs=None)
    assert_rfc7946(document)
    (feature,) = document["features"]
    assert feature["geometry"] is None
    assert feature["properties"]["pixel_bbox"] == [5.0, 6.0, 7.0, 8.0]


def test_no_detections_is_an_empty_collection() -> None:
    document = write_features(np.zeros((0, 4)), [], [], transform=from_origin(0, 10, 1, 1), crs="EPSG:4326")
    assert document == {"type": "FeatureCollection", "features": []}


def test_extra_properties_cannot_take_reserved_names_or_be_unserialisable() -> None:
    with pytest.raises(UserError, match="score"):
        FeatureWriter(
            io.BytesIO(),
            transform=None,
            crs=None,
            class_names=[],
            model="m",
            job="j",
            properties={"score": 1},
        )
    with pytest.raises(UserError, match="plain JSON"):
        FeatureWriter(
            io.BytesIO(),
            transform=None,
            crs=None,
            class_names=[],
            model="m",
            job="j",
            properties={"x": object()},
        )


class CountingStream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def write(self, data: Any) -> int:
        self.sizes.append(len(data))
        return super().write(data)


def test_many_detections_are_streamed_in_chunks() -> None:
    rng = np.random.default_rng(5)
    count, chunk = 12_000, 4_000
    x1 = rng.uniform(0, 30_000, count)
    y1 = rng.uniform(0, 30_000, count)
    boxes = np.stack([x1, y1, x1 + 12, y1 + 8], axis=1).astype(np.float32)
    scores = rng.uniform(0.25, 1, count).astype(np.float32)
    labels = rng.integers(0, 2, count).astype(np.int32)
    stream = CountingStream()
    writer = FeatureWriter(
        stream,
        transform=from_origin(500_000, 5_000_000, 0.5, 0.5),
        crs="EPSG:32633",
        class_names=["car", "ship"],
        model="m",
        job="j",
        chunk_size=chunk,
    )
    writer.write(boxes[:5_000], scores[:5_000], labels[:5_000])
    written_before_close = stream.tell()
    writer.write(boxes[5_000:], scores[5_000:], labels[5_000:])
    writer.close()
    writer.close()  # idempotent
    assert written_before_close > 0, "features are written as they come, not at close"
    # One write for the header, one per chunk, one for the end: never the whole collection at once.
    assert len(stream.sizes) == 1 + 2 + 2 + 1
    assert max(stream.sizes) < sum(stream.sizes) / 2.5
    stream.seek(0)
    document = json.load(stream)
    assert_rfc7946(document)
    assert len(document["features"]) == writer.count == count
    got = np.array([f["properties"]["pixel_bbox"] for f in document["features"]])
    np.testing.assert_allclose(got, boxes, atol=0.005)
    with pytest.raises(ValueError, match="closed"):
        writer.write(boxes[:1], scores[:1], labels[:1])


@pytest.mark.parametrize(
    ("box", "score"),
    [([1, 2, 3, 4], float("nan")), ([1, float("nan"), 3, 4], 0.5), ([1, 2, float("inf"), 4], 0.5)],
    ids=["nan-score", "nan-coordinate", "infinite-coordinate"],
)
def test_a_non_finite_number_is_refused_not_written(box: list[float], score: float) -> None:
    stream = io.BytesIO()
    writer = FeatureWriter(
        stream, transform=from_origin(0, 10, 1, 1), crs="EPSG:4326", class_names=["car"], model="m", job="j"
    )
    writer.write(np.array([[0, 0, 1, 1]], np.float32), np.array([0.9], np.float32), np.array([0], np.int32))
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        writer.write(np.array([box], np.float32), np.array([score], np.float32), np.array([0], np.int32))
    writer.close()
    # The refused chunk wrote nothing: what was written before is still one valid collection.
    assert len(strict_json(stream.getvalue())["features"]) == 1
    assert b"nan" not in stream.getvalue().lower() and b"inf" not in stream.getvalue().lower()
