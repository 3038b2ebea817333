"""``tessera fits watch``: a folder watched like the cron job watched it, but each frame judged once, only
when complete, and remembered across restarts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.fits_classifier.model import FrameClassifier
from services.fits_classifier.watch import Watcher
from services.frames import generate_frame, write_fits

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def frame_bytes(tmp_path: Path) -> bytes:
    return write_fits(tmp_path / "source.fits", generate_frame("good", 8, (64, 64))).read_bytes()


def _report(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_frame_being_written_is_judged_once_when_complete(
    tmp_path: Path, wobble_model: Path, frame_bytes: bytes
) -> None:
    night, report = tmp_path / "night", tmp_path / "report.jsonl"
    night.mkdir()
    watcher = Watcher(night, FrameClassifier(wobble_model), report, settle_s=2.0, patience_s=30.0)
    target = night / "frame.fits"
    half = len(frame_bytes) // 2
    target.write_bytes(frame_bytes[:half])  # the camera has written half of it
    assert watcher.scan(now=0.0) == []
    assert watcher.scan(now=5.0) == []  # settled but cut short: it may still grow
    with target.open("ab") as file:
        file.write(frame_bytes[half:])
    assert watcher.scan(now=6.0) == []  # changed: it must settle again
    [verdict] = watcher.scan(now=8.5)
    assert verdict.status == "CLASSIFIED" and verdict.verdict == "mirror_wobble"
    assert watcher.scan(now=20.0) == []  # judged once
    watcher.close()
    assert [Path(str(e["source"])).name for e in _report(report)] == ["frame.fits"]


def test_a_frame_that_stays_cut_short_is_recorded_unreadable_after_the_patience(
    tmp_path: Path, wobble_model: Path, frame_bytes: bytes
) -> None:
    night = tmp_path / "night"
    night.mkdir()
    (night / "cut.fits").write_bytes(frame_bytes[:5000])
    (night / "text.fits").write_text("not a frame")
    (night / ".partial.fits").write_bytes(frame_bytes[:100])  # hidden: ignored
    watcher = Watcher(
        night, FrameClassifier(wobble_model), tmp_path / "r.jsonl", settle_s=1.0, patience_s=10.0
    )
    assert watcher.scan(now=0.0) == []
    [text] = watcher.scan(now=1.5)  # not FITS at all: recorded at once
    assert text.source.endswith("text.fits") and text.status == "UNREADABLE"
    assert watcher.scan(now=9.0) == []
    [cut] = watcher.scan(now=12.0)
    assert cut.source.endswith("cut.fits") and "truncated" in (cut.reason or "")
    watcher.close()


def test_a_restarted_watcher_judges_only_what_is_new_or_changed(
    tmp_path: Path, wobble_model: Path, frame_bytes: bytes
) -> None:
    night, report = tmp_path / "night", tmp_path / "r.jsonl"
    night.mkdir()
    (night / "a.fits").write_bytes(frame_bytes)
    first = Watcher(night, FrameClassifier(wobble_model), report, settle_s=0.0)
    assert len(first.scan(now=1.0)) == 1
    first.close()
    (night / "b.fits").write_bytes(frame_bytes)
    second = Watcher(night, FrameClassifier(wobble_model), report, settle_s=0.0)
    assert [Path(v.source).name for v in second.scan(now=1.0)] == ["b.fits"]
    time.sleep(0.01)
    (night / "a.fits").write_bytes(frame_bytes[:-2880] + frame_bytes[-2880:])  # rewritten in place
    assert [Path(v.source).name for v in second.scan(now=2.0)] == ["a.fits"]
    second.close()
    assert [Path(str(e["source"])).name for e in _report(report)] == ["a.fits", "b.fits", "a.fits"]


def test_the_watch_command_runs_until_stopped(tmp_path: Path, wobble_model: Path, frame_bytes: bytes) -> None:
    night, report = tmp_path / "night", tmp_path / "r.jsonl"
    night.mkdir()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "fits",
            "watch",
            str(night),
            "--model",
            str(wobble_model),
            "--report",
            str(report),
            "--settle",
            "0.3",
            "--poll",
            "0.1",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        (night / "arrived.fits").write_bytes(frame_bytes)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (report.exists() and report.read_text()):
            time.sleep(0.1)
    finally:
        process.terminate()
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "mirror_wobble" in out and "arrived.fits" in out
    assert [Path(str(e["source"])).name for e in _report(report)] == ["arrived.fits"]
