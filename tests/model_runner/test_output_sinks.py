"""Outputs that say SUCCESS only when they are whole and valid: a model's NaN, inverted and off-tile boxes
never reach the GeoJSON (and are counted), a full disk leaves nothing behind and fails the job with the
reason, and S3 and a local path together get the same bytes."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from runner_harness import Crew, job_done, job_status, request_for, submit, upload_scene, wait_until
from square_world import write_raster

from services.cloud.embedded import Resources
from services.errors import UserError
from services.geo.features import FeatureWriter
from services.inference.detections import BoxChecks, Detections
from services.model_runner.metrics import UNITS
from services.model_runner.pipeline import detect_batches, detect_region, run_image
from services.model_runner.request import MergeSettings, parse_request
from services.tiling.reader import RasterSource
from services.tiling.windows import Window

TILE = 64
NAN, INF = float("nan"), float("inf")
#: What the "bad" model returns for every tile: (x1, y1, x2, y2, score).
BAD_ROWS = [
    (10, 10, 20, 20, 0.9),  # valid: kept as it is
    (NAN, 10, 20, 20, 0.9),  # NaN coordinate: dropped
    (30, 30, 40, 40, NAN),  # NaN score: dropped
    (1, 1, 2, INF, 0.8),  # infinite coordinate: dropped
    (30, 30, 20, 40, 0.9),  # inverted (x2 < x1): dropped
    (70, 10, 80, 20, 0.9),  # wholly right of the 64 px tile: dropped
    (50, 50, 80, 70, 0.7),  # partly outside: clipped to (50, 50, 64, 64)
    (5, 40, 15, 50, 1.5),  # score past 1: clamped to 1
    (40, 5, 45, 9, 0.1),  # below the score threshold: padding, not counted
]
EXPECTED_CHECKS = BoxChecks(non_finite=3, inverted=1, outside=1, clipped=1, score_clamped=1)
EXPECTED_BOXES = [(5.0, 40.0, 15.0, 50.0), (10.0, 10.0, 20.0, 20.0), (50.0, 50.0, 64.0, 64.0)]


def build_bad_model(path: Path) -> Path:
    """A contract detector (64 px tiles) whose output is :data:`BAD_ROWS` on every tile."""
    rows = np.array(BAD_ROWS, np.float32)
    k = len(rows)
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, TILE, TILE])
    nodes = [
        # Zero times the tile's mean, so the outputs have the batch's size; NaN + 0 stays NaN.
        helper.make_node("ReduceMean", ["images"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean4", "shape_n11"], ["mean3"]),
        helper.make_node("Mul", ["mean3", "zeros3"], ["zero3"]),
        helper.make_node("Add", ["zero3", "bad_boxes"], ["boxes"]),
        helper.make_node("Reshape", ["mean4", "shape_n1"], ["mean2"]),
        helper.make_node("Mul", ["mean2", "zeros2"], ["zero2"]),
        helper.make_node("Add", ["zero2", "bad_scores"], ["scores"]),
        helper.make_node("Shape", ["scores"], ["nk"]),
        helper.make_node("Expand", ["labels_row", "nk"], ["labels"]),
    ]

    def const(name: str, value: np.ndarray) -> Any:
        return numpy_helper.from_array(np.asarray(value), name)

    inits = [
        const("shape_n11", np.array([-1, 1, 1], np.int64)),
        const("shape_n1", np.array([-1, 1], np.int64)),
        const("zeros3", np.zeros((1, k, 4), np.float32)),
        const("zeros2", np.zeros((1, k), np.float32)),
        const("bad_boxes", rows[None, :, :4]),
        const("bad_scores", rows[None, :, 4]),
        const("labels_row", np.zeros((1, k), np.int64)),
    ]
    outs = [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", k, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", k]),
        helper.make_tensor_value_info("labels", TensorProto.INT64, ["N", k]),
    ]
    graph = helper.make_graph(nodes, "bad_detector", [x], outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key, entry.value = "tessera.class_names", json.dumps(["thing"])
    path.write_bytes(model.SerializeToString())
    return path


def strict_json(text: str | bytes) -> Any:
    """JSON as RFC 8259 has it: ``NaN``, ``Infinity`` and ``-Infinity`` are refused."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def one_tile_request(image: Path, model: Path, **outputs: str) -> dict[str, Any]:
    return {"image": str(image), "model": str(model), "outputs": outputs, "merge": {"edge_margin": None}}


@pytest.fixture
def one_tile_image(tmp_path: Path) -> Path:
    return write_raster(tmp_path / "tile.tif", np.zeros((0, 4), np.int64), TILE, TILE)


def test_a_model_returning_nan_inverted_and_off_tile_boxes_gives_only_valid_features(
    tmp_path: Path, one_tile_image: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = build_bad_model(tmp_path / "bad.onnx")
    out = tmp_path / "out.geojson"
    summary = run_image(parse_request(one_tile_request(one_tile_image, model, path=str(out))))
    collection = strict_json(out.read_bytes())
    boxes = sorted(tuple(f["properties"]["pixel_bbox"]) for f in collection["features"])
    assert boxes == EXPECTED_BOXES
    assert {f["properties"]["score"] for f in collection["features"]} == {0.9, 0.7, 1.0}
    assert all(f["geometry"]["type"] == "Polygon" for f in collection["features"])
    assert summary.detections == 3
    assert summary.checks == EXPECTED_CHECKS
    assert "3 non-finite, 1 inverted or empty, 1 outside the tile" in caplog.text
    # Every count is a metric the runner can record.
    assert set(summary.checks.metrics()) <= set(UNITS)
    assert summary.checks.metrics()["DroppedNonFinite"] == 3


def test_both_sinks_get_the_same_bytes(tmp_path: Path, one_tile_image: Path, mocked_aws: Any) -> None:
    mocked_aws.client("s3").create_bucket(Bucket="results")
    model = build_bad_model(tmp_path / "bad.onnx")
    out = tmp_path / "deep" / "out.geojson"
    request = parse_request(
        {**one_tile_request(one_tile_image, model, s3="s3://results/runs", path=str(out)), "job_id": "both"}
    )
    summary = run_image(request)
    assert summary.outputs == ["s3://results/runs/both.geojson", str(out)]
    uploaded = boto3.client("s3").get_object(Bucket="results", Key="runs/both.geojson")
    body = uploaded["Body"].read()
    assert body == out.read_bytes()
    assert uploaded["ContentType"] == "application/geo+json"
    assert len(strict_json(body)["features"]) == 3
    assert sorted(os.listdir(out.parent)) == ["out.geojson"]  # no temporary file left
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as an open() would make it, not mkstemp's 0600


def _disk_fills_mid_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's features reach the file, then the disk is full."""
    write_chunk = FeatureWriter._write_chunk

    def full(self: FeatureWriter, *args: Any) -> None:
        write_chunk(self, *args)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(FeatureWriter, "_write_chunk", full)


def test_a_full_disk_leaves_no_file_and_no_temporary(
    tmp_path: Path, one_tile_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_bad_model(tmp_path / "bad.onnx")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    kept = outputs / "kept.geojson"
    kept.write_text('{"type":"FeatureCollection","features":[]}')
    _disk_fills_mid_write(monkeypatch)
    for target in (outputs / "new.geojson", kept):
        with pytest.raises(UserError, match=f"cannot write the output {target}: No space left on device"):
            run_image(parse_request(one_tile_request(one_tile_image, model, path=str(target))))
    # Nothing new at the path, the earlier file untouched, no temporary beside them.
    assert sorted(os.listdir(outputs)) == ["kept.geojson"]
    assert kept.read_text() == '{"type":"FeatureCollection","features":[]}'


@pytest.mark.usefixtures("runner_env")
def test_a_full_disk_fails_the_job_with_the_reason_and_uploads_nothing(
    resources: Resources,
    database_url: str,
    square_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scene = upload_scene(resources, tmp_path, square_model)
    _disk_fills_mid_write(monkeypatch)
    submit(resources, request_for(scene, "disk-full"))
    with Crew(count=1):
        wait_until(job_done(database_url, "disk-full"), 60, "the job whose output hits a full disk")
    job = job_status(database_url, "disk-full")
    assert job is not None and job.status == "FAILED"
    assert job.reason is not None and "No space left on device" in job.reason
    listed = boto3.client("s3").list_objects_v2(Bucket=resources.buckets["results"], Prefix="runs/")
    assert listed.get("KeyCount", 0) == 0


class _PerTile:
    """An endpoint stand-in: tile i of each batch gets one box at (i, i), and tile 0 also a NaN box."""

    name, provider, channels, tile_width, tile_height, batch_size = "per-tile", "endpoint", 3, 32, 32, 2
    class_names = ["thing"]

    def __init__(self, short: int = 0) -> None:
        self.short = short  # results left out of each batch's list (a broken endpoint)

    def detect(self, pixels: np.ndarray) -> list[Detections]:
        out = []
        for i in range(len(pixels) - self.short):
            rows = [[i, i, i + 2, i + 2]] + ([[NAN, 1, 5, 5]] if i == 0 else [])
            out.append(Detections(np.array(rows, np.float32), np.full(len(rows), 0.5), np.zeros(len(rows))))
        return out


def test_an_endpoints_tiles_keep_their_own_boxes_through_the_checks() -> None:
    seen: list[BoxChecks] = []
    (found,) = detect_batches(_PerTile(), [np.zeros((2, 3, 32, 32), np.float32)], on_checks=seen.append)
    assert seen == [BoxChecks(non_finite=1)]
    np.testing.assert_array_equal(found[0].boxes, [[0, 0, 2, 2]])
    np.testing.assert_array_equal(found[1].boxes, [[1, 1, 3, 3]])


def test_a_detector_returning_too_few_tiles_is_refused(tmp_path: Path) -> None:
    """Boxes are placed per region, after the last batch: a result list shorter than its batch must fail
    at that batch, with the reason, not put boxes on other tiles."""
    image = write_raster(tmp_path / "scene.tif", np.zeros((0, 4)), 64, 64)
    tiles = [Window(col, row, 32, 32) for row in (0, 32) for col in (0, 32)]
    with RasterSource.open(str(image)) as source:
        placed = detect_region(source, _PerTile(), tiles, batch_size=2, merge=MergeSettings())
        assert len(placed.detections) >= 1 and placed.tiles == 4
        with pytest.raises(UserError, match="returned detections for 1 tiles of a batch of 2"):
            detect_region(source, _PerTile(short=1), tiles, batch_size=2, merge=MergeSettings())


def test_an_endpoints_boxes_are_checked_by_the_pipeline() -> None:
    """A detector other than ONNX (a model endpoint) is checked where its output enters the pipeline."""

    class Remote:
        name, provider, channels, tile_width, tile_height, batch_size = "remote", "endpoint", 3, 32, 32, 2
        class_names = ["thing"]

        def detect(self, pixels: np.ndarray) -> list[Detections]:
            boxes = np.array([[1, 1, 5, 5], [NAN, 1, 5, 5], [9, 9, 3, 3], [30, 30, 40, 40]], np.float32)
            return [Detections(boxes, np.full(4, 0.5), np.zeros(4))] * len(pixels)

    seen: list[BoxChecks] = []
    (found,) = detect_batches(Remote(), [np.zeros((2, 3, 32, 32), np.float32)], on_checks=seen.append)
    assert seen == [BoxChecks(non_finite=2, inverted=2, clipped=2)]
    for d in found:
        np.testing.assert_array_equal(d.boxes, [[1, 1, 5, 5], [30, 30, 32, 32]])
