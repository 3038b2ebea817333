"""The sight catalog API benchmark still runs: the real server on loopback, pinned, under a tiny load.

Run as its command would be (``bench/sight_api.py --seconds 1 --concurrency 1,2`` with few small photos, in a
subprocess); it must exit 0 (every request answered 200), print its table with one row per level and the
RESULT line with finite positive figures, and leave no server behind. No time is asserted: the figures are
in bench/README.md.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"\d+(?:\.\d+)?"
FIELDS = (
    "recognitions_per_s",
    "clients",
    "p50_ms",
    "p99_ms",
    "p50_ms_1_client",
    "server_cpu_ms",
    "model_alone_per_s",
    "api_over_model",
)


def test_sight_api_benchmark_tiny(tmp_path: Path) -> None:
    out_json = tmp_path / "figures.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "sight_api.py"),
            *("--seconds", "1", "--concurrency", "1,2", "--photos", "3", "--photo-size", "320x240"),
            *("--json", str(out_json)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"sight_api.py failed:\n{out}\n{done.stderr}"
    assert re.search(r"^clients\s+recog/s\s+p50 ms\s+p90 ms\s+p99 ms", out, re.M), out
    rows = re.findall(rf"^\s+([12])\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s", out, re.M)
    assert [row[0] for row in rows] == ["1", "2"], out
    assert all(float(value) > 0 for row in rows for value in row[1:]), out
    result = re.search("^RESULT " + " ".join(f"{name}=({NUMBER})" for name in FIELDS) + "$", out, re.M)
    assert result, out
    values = [float(value) for value in result.groups()]
    assert all(math.isfinite(value) and value > 0 for value in values), result.group(0)
    figures = json.loads(out_json.read_text())
    assert [level["concurrency"] for level in figures["levels"]] == [1, 2]
    assert all(level["ok"] > 0 and not level["errors"] for level in figures["levels"])
    # The server (its command line names the sights' serve verb and this run's port) is gone.
    port = re.search(r"^server\s+tessera sights serve \(uvicorn\) --port (\d+),", out, re.M)
    assert port, out
    found = subprocess.run(["pgrep", "-af", "sights serve"], capture_output=True, text=True, check=False)
    assert f"--port {port.group(1)} " not in found.stdout, found.stdout
