"""The big-scene GeoTIFF writer: tiled, georeferenced, known objects where it says, memory-bounded, sparse."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window

from services.errors import UserError
from services.scenes.geotiff import write_scene_geotiff
from services.scenes.synthetic import content_areas, layout_scene, render_window


def test_tiled_georeferenced_file_holds_the_objects(tmp_path: Path) -> None:
    path = tmp_path / "scene.tif"
    layout = write_scene_geotiff(path, 1300, 1100, seed=5, density=100)
    with rasterio.open(path) as src:
        assert (src.width, src.height, src.count) == (1300, 1100, 3)
        assert src.dtypes == ("uint8",) * 3
        assert src.profile["tiled"] and src.block_shapes == [(512, 512)] * 3
        assert src.crs.to_epsg() == 32633
        assert src.transform == Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 5_000_000.0)
        assert src.nodata == 0
        assert src.compression is not None and src.compression.name.lower() == "deflate"
        pixels = src.read()
    np.testing.assert_array_equal(pixels, render_window(layout, 0, 0, 1300, 1100))

    # Independently of the renderer's window arithmetic: the file differs from the object-free background
    # exactly at the known boxes (plus building shadows) and nowhere else.
    background = render_window(layout_scene(1300, 1100, seed=5, density=0), 0, 0, 1300, 1100)
    changed = np.abs(pixels.astype(np.int16) - background.astype(np.int16)).max(axis=0) > 12
    assert len(layout) > 100
    fractions = [changed[y1:y2, x1:x2].mean() for x1, y1, x2, y2 in layout.boxes.astype(int)]
    assert min(fractions) >= 0.5 and np.mean(fractions) >= 0.85
    footprint = np.zeros((1100, 1300), bool)
    for x1, y1, x2, y2 in layout.boxes.astype(int):
        footprint[y1 : y2 + 3, x1 : x2 + 3] = True
    np.testing.assert_array_equal(pixels[:, ~footprint], background[:, ~footprint])


@pytest.mark.parametrize(
    ("crs", "transform", "epsg"),
    [
        ("EPSG:4326", Affine(1e-5, 0.0, -73.99, 0.0, -1e-5, 40.75), 4326),
        ("EPSG:3857", Affine(0.3, 0.0, 1_335_000.0, 0.0, -0.3, 5_620_000.0), 3857),
        ("EPSG:32617", None, 32617),
    ],
)
def test_any_crs_and_transform(tmp_path: Path, crs: str, transform: Affine | None, epsg: int) -> None:
    path = tmp_path / "scene.tif"
    write_scene_geotiff(path, 600, 520, seed=1, crs=crs, transform=transform, block_size=256, compress="lzw")
    with rasterio.open(path) as src:
        assert src.crs.to_epsg() == epsg
        assert src.transform == (transform or Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 5_000_000.0))
        assert src.block_shapes == [(256, 256)] * 3
        assert src.read(1, window=Window(0, 0, 64, 64)).min() > 0


def test_geographic_crs_gets_a_degree_transform_by_default(tmp_path: Path) -> None:
    write_scene_geotiff(tmp_path / "s.tif", 520, 520, seed=1, crs="EPSG:4326")
    with rasterio.open(tmp_path / "s.tif") as src:
        left, bottom, right, top = src.bounds
        assert -180 < left < right < 180 and -90 < bottom < top < 90
        assert right - left < 0.01


def test_writing_holds_a_few_blocks_not_the_image(tmp_path: Path) -> None:
    width, height = 3072, 2560
    tracemalloc.start()
    try:
        layout = write_scene_geotiff(tmp_path / "big.tif", width, height, seed=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(layout) > 400
    assert peak < width * height * 3 / 4, f"peak {peak / 1e6:.1f} MB"


def test_sparse_scene_writes_only_its_content_blocks(tmp_path: Path) -> None:
    width, height = 30_000, 20_000
    areas = content_areas(width, height, count=2, size=1024, seed=4)
    path = tmp_path / "sparse.tif"
    layout = write_scene_geotiff(path, width, height, seed=6, areas=areas, density=100)
    assert len(layout) > 100
    # 1.8 GB of pixels, two 1024 px areas (6 MB raw) written: the file holds only those blocks.
    assert path.stat().st_size < 8_000_000
    with rasterio.open(path) as src:
        assert src.nodata == 0
        for ax, ay, aw, ah in areas:
            block = src.read(window=Window(ax, ay, aw, ah))
            np.testing.assert_array_equal(block, render_window(layout, ax, ay, aw, ah))
            assert (block > 0).all()
        empty = [
            (x, y)
            for x in range(0, width - 512, 4096)
            for y in range(0, height - 512, 4096)
            if all(x + 512 <= ax or ax + aw <= x or y + 512 <= ay or ay + ah <= y for ax, ay, aw, ah in areas)
        ]
        assert empty
        for x, y in empty[:5]:
            assert not src.read(window=Window(x, y, 512, 512)).any()


def test_jpeg_compression(tmp_path: Path) -> None:
    path = tmp_path / "scene.tif"
    layout = write_scene_geotiff(path, 700, 600, seed=2, compress="jpeg")
    with rasterio.open(path) as src:
        assert src.compression is not None and src.compression.name.lower() == "jpeg"
        pixels = src.read().astype(np.int16)
    painted = render_window(layout, 0, 0, 700, 600).astype(np.int16)
    assert np.abs(pixels - painted).mean() < 6


def test_bad_settings_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="compress"):
        write_scene_geotiff(tmp_path / "a.tif", 100, 100, seed=0, compress="zip")
    with pytest.raises(UserError, match="CRS"):
        write_scene_geotiff(tmp_path / "a.tif", 100, 100, seed=0, crs="EPSG:not-a-code")
    with pytest.raises(UserError, match="block_size"):
        write_scene_geotiff(tmp_path / "a.tif", 100, 100, seed=0, block_size=100)
