"""A request states how its image's pixels become model input (``"scaling"``), through every front door:
the request document (validated, stored, read back), `tessera run --scale`, and the queued worker.

The known-objects figures for each image type are in tests/tiling/test_scaling_known_objects.py; here the
point is that the rule travels from the user to the pixels."""

from __future__ import annotations

from pathlib import Path

import boto3
import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from runner_harness import (
    Crew,
    job_done,
    job_status,
    read_geojson,
    request_for,
    submit,
    upload_scene,
    wait_until,
)
from square_world import feature_boxes, square_boxes

from services.cloud.embedded import Resources
from services.errors import UserError
from services.model_runner import commands
from services.model_runner.demo import DEFAULT_MODEL
from services.model_runner.request import parse_request
from services.scenes import generate_scene
from services.tiling.scaling import ScalingRule


def test_the_scaling_rule_is_validated_stored_and_read_back() -> None:
    base = {"image": "s.tif", "model": "m.onnx", "outputs": {"path": "out.geojson"}}
    request = parse_request({**base, "scaling": {"mode": "range", "min": -1000, "max": 1040}})
    assert request.scaling == ScalingRule(mode="range", low=-1000.0, high=1040.0)
    stored = request.to_json()
    assert stored["scaling"] == {"mode": "range", "min": -1000.0, "max": 1040.0}
    assert parse_request(stored).scaling == request.scaling
    grey = parse_request({**base, "scaling": {"bands": "replicate"}})
    assert grey.scaling == ScalingRule(bands="replicate")


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        ("0,255", "must be an object"),
        ({"mode": "range", "min": 10, "max": 5}, '"min" < "max"'),
        ({"mode": "stretch"}, "scaling mode must be one of"),
        ({"mode": "none", "gamma": 2}, "unknown"),
        ({"bands": "rgb"}, "replicate"),
    ],
)
def test_a_bad_scaling_rule_names_the_field(scaling: object, message: str) -> None:
    base = {"image": "s.tif", "model": "m.onnx", "outputs": {"path": "out.geojson"}}
    with pytest.raises(UserError, match=r"\$\.scaling") as raised:
        parse_request({**base, "scaling": scaling})
    assert message in str(raised.value)


@pytest.fixture(scope="module")
def float_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1024 px scene of known objects written as float64 0..255 (no rule covers it by default)."""
    pixels, _, _ = generate_scene(1024, 1024, seed=29)
    path = tmp_path_factory.mktemp("float-scene") / "scene-float64.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=1024,
        height=1024,
        count=3,
        dtype="float64",
        crs="EPSG:32633",
        transform=Affine(0.5, 0, 500_000.0, 0, -0.5, 5_000_000.0),
        tiled=True,
        blockxsize=256,
        blockysize=256,
    ) as dst:
        dst.write(pixels.astype(np.float64))
    return path


def test_tessera_run_takes_the_rule_from_scale(
    float_scene: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "found.geojson"
    argv = ["run", str(float_scene), "--model", str(DEFAULT_MODEL), "--out", str(out), "--providers", "cpu"]
    assert commands.main(argv) == 2  # float64 and no rule: refused, one line, what to state
    refused = capsys.readouterr().err
    assert "float64" in refused and "--scale LOW,HIGH" in refused and "Traceback" not in refused
    assert not out.exists()
    assert commands.main([*argv, "--scale", "0,255"]) == 0
    assert out.exists() and '"features"' in out.read_text(encoding="utf-8")


@pytest.mark.usefixtures("runner_env")
def test_a_queued_request_states_its_rule_and_the_worker_applies_it(
    resources: Resources, database_url: str, square_model: Path, tmp_path: Path
) -> None:
    scene = upload_scene(resources, tmp_path, square_model)
    # The same scene as float64 (0..255): refused without a rule, found whole with one.
    bucket, key = scene.image_url[len("s3://") :].split("/", 1)
    local = tmp_path / "uint8.tif"
    boto3.client("s3").download_file(bucket, key, str(local))
    with rasterio.open(local) as src:
        profile, pixels = src.profile, src.read()
    profile.update(dtype="float64")
    floats = tmp_path / "float64.tif"
    with rasterio.open(floats, "w", **profile) as dst:
        dst.write(pixels.astype(np.float64))
    boto3.client("s3").upload_file(str(floats), bucket, "scenes/float64.tif")
    image = f"s3://{bucket}/scenes/float64.tif"
    submit(resources, {**request_for(scene, "job-float-guess"), "image": image})
    rule = {"mode": "range", "min": 0, "max": 255}
    submit(resources, {**request_for(scene, "job-float-rule"), "image": image, "scaling": rule})
    with Crew(count=1):
        wait_until(job_done(database_url, "job-float-guess"), 60, "the job without a rule to end")
        wait_until(job_done(database_url, "job-float-rule"), 60, "the job with a rule to end")
    refused = job_status(database_url, "job-float-guess")
    assert refused is not None and refused.status == "FAILED" and "float64" in (refused.reason or "")
    done = job_status(database_url, "job-float-rule")
    assert done is not None and done.status == "SUCCESS", done
    assert feature_boxes(read_geojson(done.output_uris[0])) == square_boxes(scene.squares)
