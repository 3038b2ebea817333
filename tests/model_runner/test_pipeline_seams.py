"""The in-process pipeline (``tessera run``): objects across tile and region seams come out once, whole,
where they are on the Earth; ROI, bands and dtypes; the command's summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio.warp
from rasterio.transform import Affine
from square_world import feature_boxes, place_squares, square_boxes, write_raster

from services.errors import UserError
from services.inference.detections import Detections
from services.model_runner.commands import main as commands_main
from services.model_runner.pipeline import Grid, merge_seams, run_image
from services.model_runner.request import MergeSettings, parse_request
from services.tiling.scaling import ScalingRule

WIDTH, HEIGHT = 403, 297
#: tile 64, overlap 16: stride 48; regions of 96 px (two strides) put region seams at 96, 192, 288.
SEAM_SQUARES = [
    (90, 20, 12),  # across the region seam x = 96
    (58, 150, 12),  # across the right edge of tile 0 (x = 64), inside region 0
    (91, 91, 12),  # across the region corner (96, 96)
    (186, 240, 14),  # across the region seam x = 192 near the bottom
    (300, 188, 10),  # across the region seam y = 192
    (391, 280, 12),  # against the image's right and bottom edges (shifted-back last tiles)
    (98, 250, 10),  # wholly inside the overlap past the region seam x = 96: seen whole by both regions
]


def _request(image: Path, model: Path, out: Path, **extra: object) -> dict:
    return {
        "image": str(image),
        "model": str(model),
        "overlap": [16, 16],
        "region_size": [96, 96],
        "outputs": {"path": str(out)},
        **extra,
    }


@pytest.fixture
def scene(tmp_path: Path) -> tuple[Path, np.ndarray]:
    squares = place_squares(WIDTH, HEIGHT, seed=3, count=40, must=SEAM_SQUARES)
    return write_raster(tmp_path / "scene.tif", squares, WIDTH, HEIGHT), squares


@pytest.mark.parametrize("edge_margin", [1.0, None], ids=["edge-boxes-dropped", "containment-only"])
def test_every_square_comes_out_once_with_its_full_extent(
    scene: tuple[Path, np.ndarray], square_model: Path, tmp_path: Path, edge_margin: float | None
) -> None:
    image, squares = scene
    out = tmp_path / "out.geojson"
    summary = run_image(parse_request(_request(image, square_model, out, merge={"edge_margin": edge_margin})))
    collection = json.loads(out.read_text())
    # Exactly the known boxes: nothing twice, no partial box left at a tile or region seam.
    assert feature_boxes(collection) == square_boxes(squares)
    assert summary.detections == len(squares)
    assert summary.regions == 4 * 3  # 403 x 297 in 96 px regions (a strip with no tile origin joins one)
    assert summary.provider == "CPUExecutionProvider"
    assert {f["properties"]["class"] for f in collection["features"]} == {"square"}
    assert {f["properties"]["job"] for f in collection["features"]} == {summary.job_id}


def test_coordinates_land_on_the_known_objects(
    scene: tuple[Path, np.ndarray], square_model: Path, tmp_path: Path
) -> None:
    image, squares = scene
    out = tmp_path / "out.geojson"
    run_image(parse_request(_request(image, square_model, out)))
    with rasterio.open(image) as dataset:
        transform, crs = dataset.transform, dataset.crs
    features = {tuple(f["properties"]["pixel_bbox"]): f for f in json.loads(out.read_text())["features"]}
    for x1, y1, x2, y2 in squares.tolist():
        ring = np.array(features[(x1, y1, x2, y2)]["geometry"]["coordinates"][0])
        # The corners of the known square, through the raster's transform and CRS to lon/lat.
        cols, rows = np.array([x1, x2, x2, x1]), np.array([y1, y1, y2, y2])
        xs = transform.a * cols + transform.b * rows + transform.c
        ys = transform.d * cols + transform.e * rows + transform.f
        lons, lats = rasterio.warp.transform(crs, "EPSG:4326", xs, ys)
        expected = np.array(sorted(zip(lons, lats, strict=True)))
        np.testing.assert_allclose(np.array(sorted(map(tuple, ring[:4]))), expected, atol=2e-7)
        assert ring[0].tolist() == ring[-1].tolist()


def test_seams_need_the_seam_merge(
    scene: tuple[Path, np.ndarray], square_model: Path, tmp_path: Path
) -> None:
    """The control: region by region, without the seam merge, the seam squares do come out twice."""
    from services.model_runner import model_setup, pipeline

    image, squares = scene
    request = parse_request(_request(image, square_model, tmp_path / "x.geojson"))
    detector = model_setup.open_detector(request)
    with pipeline.RasterSource.open(str(image)) as source:
        grid = model_setup.settle_grid(request, detector)
        plan = pipeline.plan_job(grid, source, None)
        parts = [
            pipeline.detect_region(
                source,
                detector,
                pipeline.region_tiles(grid, region, source.width, source.height, None),
                batch_size=4,
                merge=request.merge,
            ).detections
            for region in plan.regions
        ]
    assert len(Detections.concat(parts)) > len(squares)
    assert len(merge_seams(parts, plan.regions, grid, request.merge)) == len(squares)


def test_merge_seams_leaves_boxes_away_from_seams_alone() -> None:
    grid = Grid(64, 64, 16, 16, 96, 96)
    from services.tiling.windows import Window

    regions = [Window(0, 0, 96, 96), Window(96, 0, 96, 96)]
    # Two identical boxes far from any seam (impossible in practice) are left as they are; a full box and
    # the partial box of the same object across the seam become one.
    boxes = np.array([[5, 5, 15, 15], [5, 5, 15, 15], [90, 40, 102, 52], [96, 40, 102, 52]], np.float32)
    d = Detections(boxes, np.ones(4, np.float32), np.zeros(4, np.int32))
    merged = merge_seams(
        [d.select([0, 1, 2]), d.select([3])], regions, Grid(64, 64, 16, 16, 96, 96), MergeSettings()
    )
    assert sorted(map(tuple, merged.boxes.tolist())) == [(5, 5, 15, 15), (5, 5, 15, 15), (90, 40, 102, 52)]
    assert grid.tile_w == 64


@pytest.mark.parametrize(
    "case",
    [(4, "uint16", False, "EPSG:3857"), (1, "uint8", True, "EPSG:4326")],
    ids=["4-band-uint16-striped-3857", "1-band-uint8-tiled-4326"],
)
def test_band_counts_dtypes_and_crss(
    tmp_path: Path, square_model: Path, case: tuple[int, str, bool, str]
) -> None:
    bands, dtype, tiled, crs = case
    squares = place_squares(211, 150, seed=5, count=12, must=[(90, 20, 12)])
    transform = Affine(4.5e-6, 0, 12.0, 0, -4.5e-6, 45.0) if crs == "EPSG:4326" else None
    image = write_raster(
        tmp_path / "s.tif",
        squares,
        211,
        150,
        bands=bands,
        dtype=dtype,
        tiled=tiled,
        crs=crs,
        transform=transform,
    )
    out = tmp_path / "o.geojson"
    # A 1-band image feeds the 3-channel model only when the request asks for it, and uint16 with no
    # declared bit depth needs its range (scaling never guesses).
    rule = ScalingRule(bands="replicate") if bands == 1 else ScalingRule.parse("0,65535")
    run_image(parse_request(_request(image, square_model, out)), scaling_rule=rule)
    assert feature_boxes(json.loads(out.read_text())) == square_boxes(squares)


def test_region_of_interest_drops_tiles_outside_it(
    scene: tuple[Path, np.ndarray], square_model: Path, tmp_path: Path
) -> None:
    image, squares = scene
    with rasterio.open(image) as dataset:
        transform = dataset.transform
    # The left 100 columns, in map coordinates.
    x0, y0 = transform.c, transform.f
    x1, y1 = transform.c + 100 * transform.a, transform.f + HEIGHT * transform.e
    roi = f"POLYGON (({x0} {y0}, {x1} {y0}, {x1} {y1}, {x0} {y1}, {x0} {y0}))"
    out = tmp_path / "roi.geojson"
    summary = run_image(
        parse_request(_request(image, square_model, out, roi={"geometry": roi, "crs": "map"}))
    )
    found = feature_boxes(json.loads(out.read_text()))
    # Tiles reaching column 100 start before it: squares wholly left of x = 112 are all found, none past 160.
    assert {b for b in square_boxes(squares) if b[2] <= 112} <= set(found)
    assert all(b[0] < 160 for b in found)
    assert summary.tiles < 9 * 6


def test_a_region_of_interest_off_the_image_is_a_user_error(
    scene: tuple[Path, np.ndarray], square_model: Path, tmp_path: Path
) -> None:
    image, _ = scene
    roi = "POLYGON ((0 0, 1 0, 1 1, 0 1, 0 0))"  # lon/lat far from the image
    with pytest.raises(UserError, match="does not overlap"):
        run_image(parse_request(_request(image, square_model, tmp_path / "o.geojson", roi={"geometry": roi})))


def test_tessera_run_prints_a_summary(
    scene: tuple[Path, np.ndarray], square_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, squares = scene
    out = tmp_path / "cli.geojson"
    code = commands_main(
        [
            "run",
            str(image),
            "--model",
            str(square_model),
            "--out",
            str(out),
            "--overlap",
            "16",
            "--region",
            "96",
            "--batch",
            "3",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert f"detections {len(squares)}" in printed
    assert "tiles      54 (0 all-nodata skipped)" in printed
    assert "provider   CPUExecutionProvider" in printed
    assert "tiles/s" in printed
    assert feature_boxes(json.loads(out.read_text())) == square_boxes(squares)


def test_tessera_run_reports_user_errors_in_one_line(
    tmp_path: Path, square_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = commands_main(
        [
            "run",
            str(tmp_path / "missing.tif"),
            "--model",
            str(square_model),
            "--out",
            str(tmp_path / "o.geojson"),
        ]
    )
    assert code == 2
    assert "tessera run: image" in capsys.readouterr().err


def test_a_model_served_at_an_endpoint(
    scene: tuple[Path, np.ndarray], square_model: Path, tmp_path: Path
) -> None:
    """The same squares through the OSML-style ``POST /invocations`` contract instead of a local model."""
    import threading

    from services.inference.detector import OnnxDetector
    from services.inference.endpoint import endpoint_server

    image, squares = scene
    server = endpoint_server(OnnxDetector(str(square_model), batch_size=1), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        request = {
            k: v for k, v in _request(image, square_model, tmp_path / "e.geojson").items() if k != "model"
        }
        request["endpoint"] = {"url": url, "tile_size": [64, 64], "class_names": ["square"]}
        summary = run_image(parse_request(request))
    finally:
        server.shutdown()
        thread.join()
    collection = json.loads((tmp_path / "e.geojson").read_text())
    assert feature_boxes(collection) == square_boxes(squares)
    assert summary.provider == "endpoint"
    assert {f["properties"]["model"] for f in collection["features"]} == {url}
