"""Smoke runs of the benchmarks on tiny data (``--quick``), so that they cannot rot unnoticed.

Each benchmark is run as its command would be, in a subprocess, and must exit 0 and print its RESULT
line(s). Figures are not checked: nothing here is timed (the benchmarks' figures are in bench/README.md).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_quick(script: str, data_dir: Path, *extra: str) -> str:
    """Run ``bench/<script> --quick`` with its data in ``data_dir``; its output (it must exit 0)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--quick", "--data-dir", str(data_dir), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def result(output: str, name: str, goal: str) -> float:
    """The value of the ``RESULT name=value goal... PASS|FAIL`` line (which must be there)."""
    match = re.search(rf"^RESULT {name}=(\d+(?:\.\d+)?) {re.escape(goal)} (PASS|FAIL)$", output, re.M)
    assert match, f"no RESULT {name} line in:\n{output}"
    return float(match.group(1))


def test_pipeline_benchmark_quick(tmp_path: Path) -> None:
    out = run_quick("pipeline.py", tmp_path)
    assert result(out, "pipeline_efficiency", "goal>=0.9") > 0
    # A 1536 px image: 4 x 4 tiles, all run end to end; the model finds objects in them.
    assert re.search(r"^fastest/region: end to end\s+16\s", out, re.M), out
    kept = re.search(r"^detections\s+([\d,]+) kept", out, re.M)
    assert kept and int(kept.group(1).replace(",", "")) > 0, out


def test_memory_benchmark_quick(tmp_path: Path) -> None:
    out = run_quick("memory.py", tmp_path)
    assert result(out, "memory_peak_rss_gb", "goal<=1.5") > 0
    # The sparse scene's content is found: recall is printed from the GeoJSON the worker wrote.
    recall = re.search(r"recall (\d\.\d+)", out)
    assert recall and float(recall.group(1)) > 0.5, out


def test_s3_bytes_benchmark_quick(tmp_path: Path) -> None:
    out = run_quick("s3_bytes.py", tmp_path)
    assert result(out, "s3_bytes_ratio", "goal<=1.15") >= 1.0  # never fewer bytes than the blocks hold
    assert "ROI triangle" in out


def test_sahi_benchmark_quick(tmp_path: Path) -> None:
    # SAHI's virtualenv is created on first use in the shared benchmark cache (pip, about 20 s), then reused.
    out = run_quick("sahi_compare.py", tmp_path)
    assert result(out, "sahi_speedup", "goal>=4") > 0
    assert result(out, "sahi_rss_ratio", "goal<=0.25") > 0
    counts = re.search(r"^tiles / slices\s+(\d+)\s+(\d+)$", out, re.M)
    assert counts and counts.group(1) == counts.group(2) == "9", out  # same slicing: 3 x 3 at 1024 px
    assert re.search(r"^time to first tile\s+\d+\.\d+s\s+\d+\.\d+s", out, re.M), out


def test_sahi_benchmark_near_free_quick(tmp_path: Path) -> None:
    # The near-free case, small: both sides run the built model (class names from its metadata).
    out = run_quick("sahi_compare.py", tmp_path, "--model", "near-free", "--block", "256", "--overlap", "128")
    assert result(out, "sahi_speedup", "goal>=4") > 0
    assert result(out, "sahi_rss_ratio", "goal<=0.25") > 0
    assert re.search(r"^model\s+near-free-v\d+-t512\S* \(near-free\)", out, re.M), out
    assert "256 px blocks" in out and "overlap 128 px" in out
    counts = re.search(r"^tiles / slices\s+(\d+)\s+(\d+)$", out, re.M)
    assert counts and counts.group(1) == counts.group(2) == "9", out
    found = re.search(r"^detections\s+(\d+)\s+(\d+)$", out, re.M)
    assert found and int(found.group(1)) > 0 and int(found.group(2)) > 0, out


def test_floor_benchmark_quick(tmp_path: Path) -> None:
    # The near-free model against its floor: decode alone, raw model alone, end to end, and side by side.
    out = run_quick("floor.py", tmp_path)
    assert result(out, "floor_efficiency", "goal>=0.85") > 0
    for figure in ("decode alone", "raw model", "end to end", "floor", "side by side", "first tile"):
        assert re.search(rf"^{figure}\s+\d+\.\d+ s", out, re.M), (figure, out)
    found = re.search(r"^detections\s+([\d,]+) \(digest [0-9a-f]{12}\)", out, re.M)
    assert found, out
    assert ", batch 2, " in out  # no --batch: what tessera run picks on a CPU for 512 x 512 x 3 tiles
