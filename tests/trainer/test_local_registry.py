"""`--register` without an AWS account or a database: the model goes to this machine's own registry (an
embedded PostgreSQL under $TESSERA_HOME), `tessera models` lists it, `tessera run --model NAME` loads it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

TINY = ["batch_size=2", "crop=32", "width=8", "tile=64", "eval_scenes=1", "steps_per_epoch=2"]


def _tessera(*args: str, home: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_DB_")}
    env["TESSERA_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def home() -> Iterator[Path]:
    """$TESSERA_HOME, outside pytest's private temporary directories: run as root, the embedded PostgreSQL
    runs as its own user, which must reach its data directory."""
    path = Path(tempfile.mkdtemp(prefix="tessera-home-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_register_list_and_run_from_the_local_registry(tmp_path: Path, home: Path) -> None:
    params = [arg for pair in TINY for arg in ("--param", pair)]
    for _ in range(2):
        trained = _tessera(
            "train", "detector", "--dataset", "synthetic", "--out", str(tmp_path / "out"), "--steps", "2",
            "--register", "first-hour", *params, home=home, cwd=tmp_path,
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr
        assert "registry: the local one" in trained.stderr
    listed = _tessera("models", home=home, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "the local registry" in listed.stdout and "first-hour:2" in listed.stdout
    versions = _tessera("models", "first-hour", home=home, cwd=tmp_path)
    assert "first-hour:1" in versions.stdout and "first-hour:2" in versions.stdout
    made = _tessera("scene", "make", "s.tif", "--size", "256", "256", home=home, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    ran = _tessera("run", "s.tif", "--model", "first-hour", "--out", "d.geojson", home=home, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "d.geojson").is_file()
    unknown = _tessera("run", "s.tif", "--model", "nobody", "--out", "e.geojson", home=home, cwd=tmp_path)
    assert unknown.returncode == 2 and "no model named 'nobody'" in unknown.stderr
