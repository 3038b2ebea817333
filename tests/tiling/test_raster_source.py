"""RasterSource: lazy opening of paths and s3:// (moto's server), boundless reads, clear errors."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
import rasterio
from moto.server import ThreadedMotoServer

from services.errors import UserError
from services.tiling.batches import iter_tile_batches
from services.tiling.reader import RasterSource, gdal_path, gdal_s3_options
from services.tiling.scaling import InputScaling
from services.tiling.windows import Grid, Window

RasterMaker = Callable[..., tuple[Path, np.ndarray]]


def test_metadata_without_reading_pixels(make_raster: RasterMaker) -> None:
    path, _ = make_raster(width=1037, height=771, count=4, dtype="uint16", nodata=0, crs="EPSG:3857")
    with RasterSource.open(str(path)) as source:
        assert (source.width, source.height, source.count, source.dtype) == (1037, 771, 4, "uint16")
        assert source.nodata == 0
        assert source.crs is not None and source.crs.to_epsg() == 3857
        assert source.transform.a == pytest.approx(0.6)
        assert source.block_shape == (256, 256)


def test_reads_outside_the_image_are_filled(make_raster: RasterMaker) -> None:
    path, data = make_raster(width=300, height=200, count=3, nodata=7)
    with RasterSource.open(str(path)) as source:
        inside = source.read(Window(10, 20, 50, 40))
        np.testing.assert_array_equal(inside, data[:, 20:60, 10:60])
        edge = source.read(Window(280, 190, 40, 30), bands=[2])
    assert edge.shape == (1, 30, 40) and edge.dtype == np.uint8
    np.testing.assert_array_equal(edge[:, :10, :20], data[1:2, 190:, 280:])
    assert (edge[:, 10:, :] == 7).all() and (edge[:, :, 20:] == 7).all()


def test_reads_fill_a_given_array(make_raster: RasterMaker) -> None:
    path, data = make_raster(width=300, height=200, count=3, nodata=7, compress="deflate")
    with RasterSource.open(str(path)) as source:
        out = np.zeros((2, 40, 50), np.uint8)
        got = source.read(Window(10, 20, 50, 40), bands=[3, 1], out=out)
        assert got is out
        np.testing.assert_array_equal(out, data[[2, 0], 20:60, 10:60])
        edge = np.zeros((3, 30, 40), np.uint8)
        assert source.read(Window(280, 190, 40, 30), out=edge) is edge  # partly outside: filled, then read
        np.testing.assert_array_equal(edge[:, :10, :20], data[:, 190:, 280:])
        assert (edge[:, 10:, :] == 7).all() and (edge[:, :, 20:] == 7).all()
        for wrong in (np.zeros((3, 40, 50), np.uint8), np.zeros((2, 40, 50), np.uint16)):
            with pytest.raises(ValueError, match="out must be"):
                source.read(Window(10, 20, 50, 40), bands=[3, 1], out=wrong)


def test_concurrent_reads_use_separate_handles(make_raster: RasterMaker) -> None:
    path, data = make_raster(width=1024, height=1024, count=3, compress="deflate")
    windows = [Window(x, y, 256, 256) for y in range(0, 769, 128) for x in range(0, 769, 128)]
    errors: list[str] = []
    with RasterSource.open(str(path)) as source:

        def worker(part: list[Window]) -> None:
            for w in part:
                got = source.read(w)
                if not np.array_equal(got, data[:, w.row_off : w.row_end, w.col_off : w.col_end]):
                    errors.append(str(w))

        threads = [threading.Thread(target=worker, args=(windows[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"does not exist"):
        RasterSource.open(str(tmp_path / "nope.tif"))


def test_a_directory_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"is a directory"):
        RasterSource.open(str(tmp_path))


def test_a_non_raster_file_is_a_user_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.tif"
    text.write_text("these are not pixels\n" * 50)
    with pytest.raises(UserError, match=r"cannot read .*notes\.tif as a raster image"):
        RasterSource.open(str(text))


def test_a_truncated_tiff_is_a_user_error(make_raster: RasterMaker, tmp_path: Path) -> None:
    path, _ = make_raster(width=512, height=512, compress="deflate")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=r"broken\.tif"), RasterSource.open(str(broken)) as source:
        source.read(Window(0, 0, 512, 512))


def test_url_forms() -> None:
    assert gdal_path("s3://bucket/a/b.tif") == "/vsis3/bucket/a/b.tif"
    assert gdal_path("https://example.org/x.tif") == "/vsicurl/https://example.org/x.tif"
    assert gdal_path("/data/x.tif") == "/data/x.tif"
    with pytest.raises(UserError, match="s3://BUCKET/KEY"):
        gdal_path("s3://bucket-only")
    options = gdal_s3_options("http://127.0.0.1:5000")
    assert options["AWS_S3_ENDPOINT"] == "127.0.0.1:5000" and options["AWS_HTTPS"] == "NO"
    assert options["AWS_VIRTUAL_HOSTING"] == "FALSE"


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)


def test_s3_images_read_the_same_pixels_as_local_files(
    make_raster: RasterMaker, moto_endpoint: str, aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = make_raster(width=777, height=555, count=3, compress="deflate", crs="EPSG:4326")
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket="imagery")
    s3.upload_file(str(path), "imagery", "scenes/odd.tif")
    tiles = Grid(256, 256, 48, 48).tiles_of(Window(0, 0, 777, 555), 777, 555)

    def pixels(url: str, **kwargs: str) -> list[np.ndarray]:
        with RasterSource.open(url, **kwargs) as source:
            assert (source.width, source.height, source.count) == (777, 555, 3)
            return [
                p for b in iter_tile_batches(source, tiles, 4, InputScaling(), threads=3) for p in b.pixels
            ]

    local = pixels(str(path))
    remote = pixels("s3://imagery/scenes/odd.tif", s3_endpoint=moto_endpoint)
    assert len(local) == len(remote) == len(tiles)
    for a, b in zip(local, remote, strict=True):
        np.testing.assert_array_equal(a, b)
    with rasterio.open(path) as dataset:
        first = dataset.read(window=((0, 256), (0, 256)))
    np.testing.assert_array_equal(local[0], first / np.float32(255))

    # The endpoint can also come from the environment, as workers get it.
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    with RasterSource.open("s3://imagery/scenes/odd.tif") as source:
        np.testing.assert_array_equal(source.read(Window(700, 500, 77, 55)), data[:, 500:, 700:])


def test_a_missing_s3_object_is_a_user_error(moto_endpoint: str, aws_env: None) -> None:
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="empty-bucket")
    with pytest.raises(UserError, match=r"s3://empty-bucket/none\.tif"):
        RasterSource.open("s3://empty-bucket/none.tif", s3_endpoint=moto_endpoint)
