"""``tessera train TASK`` trains here and prints where everything went; its options build the job."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from services.errors import UserError
from services.trainer.commands import add_worker_options, main, parse_params


def test_train_detector_locally(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TESSERA_DB_URL", raising=False)
    out = tmp_path / "run"
    params = ["batch_size=2", "crop=32", "width=8", "tile=64", "eval_scenes=1", "steps_per_epoch=2"]
    argv = [
        "train",
        "detector",
        "--dataset",
        "synthetic",
        "--out",
        str(out),
        "--steps",
        "3",
        "--job-id",
        "cli-1",
    ]
    assert main([*argv, *[f"--param={p}" for p in params]]) == 0
    printed = capsys.readouterr().out
    assert f"model      {(out / 'model.onnx').resolve()}" in printed
    job = json.loads((out / "job.json").read_text())
    assert (job["job_id"], job["steps"], job["params"]["crop"]) == ("cli-1", 3, 32)
    # No database configured: --register uses this machine's own registry ($TESSERA_HOME's).
    home = Path(tempfile.mkdtemp(prefix="tessera-home-"))
    monkeypatch.setenv("TESSERA_HOME", str(home))
    try:
        assert main([*argv, "--job-id", "cli-2", "--register", "x"]) == 0
        assert "registry: the local one" in capsys.readouterr().err
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_params_and_worker_options() -> None:
    assert parse_params(["lr=0.5", 'classes=["a"]', "name=ships"]) == {
        "lr": 0.5,
        "classes": ["a"],
        "name": "ships",
    }
    with pytest.raises(UserError, match="NAME=VALUE"):
        parse_params(["oops"])
    own = argparse.ArgumentParser()
    add_worker_options(own)
    args = own.parse_args(["--once", "--state-file", "/tmp/busy", "--wait", "2"])
    assert (args.once, args.state_file, args.wait) == (True, "/tmp/busy", 2)
    assert own.parse_args([]).wait == 5  # the trainer's own default, not another worker's


def test_each_worker_command_has_its_own_options_and_defaults() -> None:
    from services.cli import parser

    cli = parser()
    assert cli.parse_args(["worker", "trainer"]).wait == 5
    assert cli.parse_args(["worker", "model-runner"]).wait == 1
    assert cli.parse_args(["worker", "sight-catalog", "--refresh-s", "2"]).refresh_s == 2.0
    assert cli.parse_args(["worker", "fits-classifier", "--providers", "cpu"]).providers == "cpu"
    with pytest.raises(SystemExit):  # the trainer has no --providers, the model runner no --state-file
        cli.parse_args(["worker", "trainer", "--providers", "cpu"])
