"""The training benchmark still runs (tiny networks and data, two steps per task)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_training_benchmark_quick() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "training.py"), "--quick", "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT training_images_per_s[")]
    assert len(results) == 4
    assert all(float(line.split("=")[1].split()[0]) > 0 for line in results)
