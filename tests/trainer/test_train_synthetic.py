"""Every training task starts from data the project makes (`--dataset synthetic`) and, at the default
`--size tiny`, trains in seconds on a CPU: what a new user tries first. `--size full` keeps the task's own
defaults; explicit `--param` values win over both."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.trainer.commands import TASK_NAMES, TINY_PARAMS, job_from_args
from services.trainer.tasks import make_task
from services.trainer.tasks.dcgan import synthetic_faces


def _train(task: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TESSERA_DB_", "TESSERA_EMF"))}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "train",
            task,
            "--dataset",
            "synthetic",
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("task", TASK_NAMES)
def test_the_tiny_size_is_valid_for_every_task(task: str) -> None:
    assert set(TINY_PARAMS) == set(TASK_NAMES)
    make_task(task).params(TINY_PARAMS[task])  # a bad name or value raises UserError


@pytest.mark.parametrize("task", ["detector", "dcgan", "classifier", "sky-position"])
def test_a_synthetic_dataset_trains_and_exports(task: str, tmp_path: Path) -> None:
    done = _train(task, tmp_path / "out", "--steps", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and (tmp_path / "out" / "model.onnx").is_file()
    for name, value in TINY_PARAMS[task].items():
        assert metrics["params"][name] == value
    # Metric lines, if any were due in two steps, go beside the model, not onto the console a person reads.
    assert '"_aws"' not in done.stdout


def _args(out: Path) -> argparse.Namespace:
    return argparse.Namespace(
        task="detector", dataset="synthetic", out=str(out), param=None, job_id=None, steps=1, epochs=None,
        checkpoint_every=None, register=None, device=None, size="tiny",
    )  # fmt: skip


def test_sizes_and_explicit_params(tmp_path: Path) -> None:
    def job(*argv: str) -> dict[str, object]:
        return job_from_args(argparse.Namespace(**{**vars(_args(tmp_path)), "param": list(argv)}))

    assert job()["params"] == TINY_PARAMS["detector"]
    assert job("width=16")["params"] == {**TINY_PARAMS["detector"], "width": 16}
    assert job_from_args(argparse.Namespace(**{**vars(_args(tmp_path)), "size": "full"}))["params"] == {}


def test_synthetic_faces_are_reproducible_and_varied() -> None:
    first, again, other = synthetic_faces(6, 64, 3), synthetic_faces(6, 64, 3), synthetic_faces(6, 64, 4)
    assert first.shape == (6, 3, 64, 64) and first.dtype.name == "uint8"
    assert (first == again).all() and not (first == other).all()
    assert len({face.tobytes() for face in first}) == 6


def test_a_queued_sky_job_cannot_name_synthetic(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "train", "submit", "sky-position", "--dataset", "synthetic",
         "--out", "s3://models/x", "--steps", "1", "--queue-url", "http://127.0.0.1:9/q"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "tessera sky submit" in done.stderr


def test_the_metrics_record_the_classes_the_data_decided(tmp_path: Path) -> None:
    done = _train("classifier", tmp_path / "out", "--steps", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["params"]["classes"] == ["good", "mirror_wobble", "shutter_fault"]
