"""The sky rendering benchmark still runs: real Stellarium renders of a few small frames, measured.

Run as its command would be (``bench/sky_render.py --quick``, in a subprocess); it must exit 0 (every frame
passed its geometry check) and print both RESULT lines with numbers, and leave no Stellarium behind. No
time is asserted: the figures are in bench/README.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"\d+(?:\.\d+)?"


def test_sky_render_benchmark_quick(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "sky_render.py"), "--quick", "--data-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"sky_render.py failed:\n{out}\n{done.stderr}"
    assert re.search(rf"^RESULT cheapest=[a-z0-9]+\.[a-z0-9]+ usd_per_1000_frames={NUMBER}$", out, re.M), out
    assert re.search(
        rf"^RESULT frames_per_s_per_process={NUMBER} cpu_s_per_frame={NUMBER} startup_s={NUMBER}$", out, re.M
    ), out
    # The frames were written where asked, and every Stellarium (its argv names that directory) is gone.
    assert list(tmp_path.rglob("*.png")), "no frame was written under --data-dir"
    found = subprocess.run(["pgrep", "-af", str(tmp_path)], capture_output=True, text=True, check=False)
    assert not [line for line in found.stdout.splitlines() if "pgrep" not in line], found.stdout
