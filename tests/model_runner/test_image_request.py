"""The image request schema: a good request round-trips; every bad field is named with its JSON path."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from services.errors import UserError
from services.jobs.documents import job_id_of
from services.model_runner.request import SCHEMA, Endpoint, local_model_path, parse_request

GOOD: dict[str, Any] = {
    "schema": SCHEMA,
    "job_id": "harbour-2026.07_01",
    "image": "s3://imagery/harbour.tif",
    "model": "s3://models/ships.onnx",
    "tile_size": [512, 256],
    "overlap": [64, 32],
    "region_size": 8192,
    "roi": {
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]},
        "crs": "lonlat",
    },
    "merge": {"algorithm": "nms", "iou": 0.4, "ios": 0.9, "score_threshold": 0.3},
    "outputs": {"s3": "s3://results/harbour/", "path": "/tmp/harbour.geojson"},
    "properties": {"campaign": "july", "pass": 3},
    "batch_size": 16,
}


def test_a_full_request_is_read_and_round_trips() -> None:
    request = parse_request(json.dumps(GOOD))
    assert request.job_id == "harbour-2026.07_01"
    assert request.tile_size == (512, 256)
    assert request.overlap == (64, 32)
    assert request.region_size == (8192, 8192)
    assert request.merge.algorithm == "nms" and request.merge.iou == 0.4
    assert request.outputs.s3 == "s3://results/harbour/"
    assert request.roi is not None and json.loads(request.roi.geometry)["type"] == "Polygon"
    assert request.properties == {"campaign": "july", "pass": 3}
    assert parse_request(request.to_json()) == request


def test_defaults_and_a_generated_job_id() -> None:
    minimal = {"image": "/data/a.tif", "model": "models/a.onnx", "outputs": {"path": "a.geojson"}}
    first, second = parse_request(minimal), parse_request(minimal)
    assert re.fullmatch(r"[0-9a-f]{32}", first.job_id) and first.job_id != second.job_id
    assert first.tile_size is None and first.overlap is None
    assert first.region_size == (8192, 8192)
    assert (first.merge.algorithm, first.merge.iou, first.merge.ios, first.merge.score_threshold) == (
        "nms+ios",
        0.5,
        0.8,
        0.25,
    )
    assert first.batch_size is None  # the runner picks it for where the model runs
    assert "batch_size" not in first.to_json()
    assert first.to_json()["schema"] == SCHEMA


def test_edge_margin_can_be_turned_off() -> None:
    request = parse_request({**GOOD, "merge": {"edge_margin": None}})
    assert request.merge.edge_margin is None
    assert parse_request(request.to_json()).merge.edge_margin is None
    assert parse_request(GOOD).merge.edge_margin == 1.0


def test_an_endpoint_instead_of_a_model() -> None:
    request = parse_request(
        {
            "image": "a.tif",
            "endpoint": {"url": "http://models:8080", "tile_size": [512, 512], "class_names": ["ship"]},
            "outputs": {"s3": "s3://results"},
        }
    )
    assert request.endpoint == Endpoint("http://models:8080", (512, 512), ("ship",))
    assert request.model_name == "http://models:8080"
    assert parse_request(request.to_json()) == request


def _problems(data: Any) -> str:
    with pytest.raises(UserError) as caught:
        parse_request(data)
    return str(caught.value)


@pytest.mark.parametrize(
    ("field", "value", "path", "says"),
    [
        ("schema", "tessera.image-request/v9", "$.schema", "unsupported schema"),
        ("job_id", "../etc/passwd", "$.job_id", "letters, digits"),
        ("job_id", 42, "$.job_id", "the number 42"),
        ("image", "", "$.image", "path or an s3:// URL"),
        ("image", "ftp://host/a.tif", "$.image", "local path, file:// or s3://"),
        ("image", "s3:///key.tif", "$.image", "names no bucket"),
        ("model", "ships model", "$.model", "registry name"),
        ("model", "http://host/m.onnx", "$.model", "endpoint instead"),
        ("model", 7, "$.model", "path, file:// or s3://"),
        ("tile_size", [512], "$.tile_size", "[width, height]"),
        ("tile_size", [0, 512], "$.tile_size", "1..16384"),
        ("tile_size", [512.5, 512], "$.tile_size", "whole numbers"),
        ("overlap", [-1, 0], "$.overlap", "0..16384"),
        ("overlap", [512, 0], "$.overlap", "smaller than the tile"),
        ("region_size", "big", "$.region_size", "[width, height]"),
        ("roi", "POLYGON ((0 0, 1 0, 1 1, 0 0))", "$.roi", "geometry, crs"),
        ("roi", {"geometry": "POLYGON ((0 0, 1 0, 1 1, 0 0))", "crs": "utm"}, "$.roi.crs", "lonlat, map"),
        ("roi", {"geometry": 5}, "$.roi.geometry", "GeoJSON or WKT"),
        ("roi", {"geometry": "POINT (0 0)", "srid": 4326}, "$.roi.srid", "unknown field"),
        ("merge", {"algorithm": "wbf"}, "$.merge.algorithm", "nms+ios, nms"),
        ("merge", {"iou": 1.5}, "$.merge.iou", "0..1"),
        ("merge", {"ios": "high"}, "$.merge.ios", "0..1"),
        ("merge", {"score_threshold": True}, "$.merge.score_threshold", "a boolean"),
        ("merge", {"sigma": 0.5}, "$.merge.sigma", "unknown field"),
        ("merge", {"edge_margin": -1}, "$.merge.edge_margin", "0..64 or null"),
        ("merge", {"edge_margin": "1"}, "$.merge.edge_margin", "0..64 or null"),
        ("outputs", None, "$.outputs", "required"),
        ("outputs", {}, "$.outputs", "s3"),
        ("outputs", {"s3": "results/prefix"}, "$.outputs.s3", "s3://BUCKET"),
        ("outputs", {"path": ""}, "$.outputs.path", "file path"),
        ("outputs", {"ftp": "x"}, "$.outputs.ftp", "unknown field"),
        ("properties", ["a"], "$.properties", "extra feature properties"),
        ("properties", {"score": 1}, "$.properties.score", "written by the model runner"),
        ("batch_size", 0, "$.batch_size", "1..256"),
        ("batch_size", 1000, "$.batch_size", "1..256"),
        ("colour", "red", "$.colour", "unknown field"),
    ],
)
def test_each_bad_field_is_named_with_its_path(field: str, value: Any, path: str, says: str) -> None:
    data = {**GOOD, field: value}
    if value is None:
        del data[field]
    message = _problems(data)
    line = next((line for line in message.splitlines() if line.strip().startswith(path + ":")), None)
    assert line is not None, message
    assert says in line


def test_model_or_endpoint_but_not_both_nor_neither() -> None:
    assert "$.model: required (or give an endpoint)" in _problems(
        {**{k: v for k, v in GOOD.items() if k != "model"}}
    )
    both = {**GOOD, "endpoint": {"url": "http://m", "tile_size": 512}}
    assert "$.model: give either model or endpoint" in _problems(both)
    bad_endpoint = {
        **{k: v for k, v in GOOD.items() if k != "model"},
        "endpoint": {"url": "m:80", "tile_size": 0},
    }
    message = _problems(bad_endpoint)
    assert "$.endpoint.url:" in message and "$.endpoint.tile_size:" in message


def test_every_problem_is_listed_at_once() -> None:
    message = _problems({"image": 3, "model": "ships model", "batch_size": -1, "extra": 1, "outputs": {}})
    assert message.startswith("the image request has 5 problems:")
    for path in ("$.image", "$.model", "$.batch_size", "$.extra", "$.outputs"):
        assert f"  {path}:" in message


def test_not_json_and_not_an_object() -> None:
    assert _problems("{not json").startswith("the image request is not JSON")
    assert _problems("[1, 2]") == "$: the image request must be a JSON object, got a list"


def test_the_job_id_of_a_bad_request_is_still_found() -> None:
    assert job_id_of(json.dumps({"job_id": "j-1", "image": 3})) == "j-1"
    assert job_id_of("{broken") is None
    assert job_id_of(json.dumps({"job_id": "../x"})) is None


def test_a_local_model_is_a_path_or_a_file_uri_of_a_file(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx")
    assert local_model_path(str(model)) == model
    assert local_model_path(f"file://{model}") == model
    for missing in (str(tmp_path / "gone.onnx"), f"file://{tmp_path}"):
        with pytest.raises(UserError) as refused:
            local_model_path(missing)
        assert str(refused.value) == (
            f"model {missing} does not exist; give the path, file:// or s3:// URI of an ONNX file"
        )
