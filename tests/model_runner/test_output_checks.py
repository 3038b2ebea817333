"""Outputs that cannot be written are refused before any detection work: ``tessera run`` with a model that
never returns still ends at once with one line saying what to fix."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from model_stall import endless_loop
from square_world import place_squares, write_raster

from services.cli import main
from services.cloud.embedded import Resources
from services.errors import UserError
from services.model_runner.outputs import check_outputs
from services.model_runner.request import Outputs


@pytest.fixture
def never_ending(square_model: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A scene and a model that would hang if it ever ran: the check must come first."""
    model = tmp_path / "hung.onnx"
    onnx.save(endless_loop(onnx.load(square_model), "images"), model)
    image = write_raster(tmp_path / "scene.tif", place_squares(128, 128, seed=1, count=2), 128, 128)
    return image, model


def _run(image: Path, model: Path, out: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(["run", str(image), "--model", str(model), "--out", out])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def test_s3_output_without_credentials_is_refused_up_front(
    never_ending: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    status, err = _run(*never_ending, "s3://results/runs", capsys)
    assert status == 2
    assert err.startswith("tessera run: no AWS credentials to write the output s3://results/runs/")
    assert "AWS_PROFILE" in err


def test_s3_output_to_a_missing_bucket_is_refused_up_front(
    aws: str, never_ending: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = _run(*never_ending, "s3://no-such-bucket-here/runs", capsys)
    assert status == 2
    assert "bucket no-such-bucket-here does not exist" in err


def test_s3_output_that_cannot_be_reached_is_refused_up_front(
    never_ending: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    status, err = _run(*never_ending, "s3://results/runs", capsys)
    assert status == 2
    assert "S3 cannot be reached" in err


def test_a_writable_bucket_passes(aws: str, resources: Resources) -> None:
    check_outputs(Outputs(s3=f"s3://{resources.buckets['results']}/runs"), "job-1")


def test_local_outputs_are_checked_up_front(
    never_ending: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = _run(*never_ending, str(tmp_path), capsys)
    assert status == 2 and "is a directory; give the path of the .geojson file" in err
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    status, err = _run(*never_ending, str(blocker / "out.geojson"), capsys)
    assert status == 2 and "is not a directory" in err
    # A directory that does not exist yet is fine: it is made when the output is written.
    check_outputs(Outputs(path=str(tmp_path / "new" / "deeper" / "out.geojson")), "job-1")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_parent_the_user_cannot_write_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(UserError, match="is not writable by this user"):
            check_outputs(Outputs(path=str(locked / "out.geojson")), "job-1")
    finally:
        locked.chmod(0o700)
