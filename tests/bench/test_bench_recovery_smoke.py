"""The recovery benchmark still runs: two kills on a tiny scene with a 6 s visibility timeout.

Run as its command would be (``bench/recovery.py --quick``, in a subprocess); it must exit 0 (every job
completed) and print its RESULT lines. No time is asserted: the figures are in bench/README.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_recovery_benchmark_quick(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "recovery.py"), "--quick", "--data-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"recovery.py failed:\n{out}\n{done.stderr}"
    assert re.search(r"^RESULT recovery_max_s=\d+\.\d goal<=11 (PASS|FAIL)$", out, re.M), out
    assert re.search(r"^RESULT completed=2/2$", out, re.M), out
    # Each trial killed a worker mid-region and the job still found every object the baseline found.
    rows = re.findall(
        r"^\s+\d\s+[\d.]+ s\s+worker-\d+\s+\d+\s+[\d.]+ s\s+worker-\d+\s+[\d.]+ s\s+SUCCESS\s+0\s+0$",
        out,
        re.M,
    )
    assert len(rows) == 2, out
