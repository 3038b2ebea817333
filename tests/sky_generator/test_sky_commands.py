"""``tessera sky render`` end to end in one process (real Stellarium), and its refusals: one line each,
before any rendering, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from services.cli import main

JOB = {
    "schema": "tessera.sky-job/v1",
    "job_id": "cli-sky",
    "count": 4,
    "seed": 5,
    "latitude": [30.0, 35.0],
    "longitude": [-5.0, 5.0],
    "time": ["2024-09-01T00:00:00Z", "2024-09-03T00:00:00Z"],
    "camera": {"altitude": 70, "azimuth": 0, "fov": 90, "projection": "stereographic", "size": [320, 240]},
    "frames_per_shard": 2,
    "output": "s3://results/sky",
}


def write_job(folder: Path, **changes: object) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({**JOB, **changes}))
    return path


def test_render_writes_frames_parts_and_a_proven_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "skies"
    assert main(["sky", "render", str(write_job(tmp_path)), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "frames     4 in 2 shards" in printed and "4 frames proven" in printed
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert all((out / r["file"]).is_file() and r["geometry"]["verdict"] == "pass" for r in rows)
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["shard-00000.jsonl", "shard-00001.jsonl"]
    # What the trainer's sky-position task reads.
    from services.trainer.data.sky_manifest import read_manifest

    shots = read_manifest(out)
    assert [(s.lat, s.lon) for s in shots] == [(r["lat"], r["lon"]) for r in rows]
    # One shard again: the same frames, byte for byte (a re-rendered shard gives the same labels).
    before = (out / "parts" / "shard-00001.jsonl").read_text()
    assert main(["sky", "render", str(write_job(tmp_path)), "--out", str(out), "--shards", "1"]) == 0
    assert (out / "parts" / "shard-00001.jsonl").read_text() == before


@pytest.mark.parametrize(
    ("changes", "argv_tail", "says"),
    [
        ({}, [], "the job writes to s3://results/sky: `tessera sky render` renders here, so give --out DIR"),
        ({"count": 0}, ["--out", "OUT"], "$.count"),
        ({"camera": {**JOB["camera"], "fov": 180}}, ["--out", "OUT"], "$.camera.fov"),  # type: ignore[dict-item]
        ({}, ["--out", "OUT", "--shards", "7"], "--shards '7': the job has shards 0..1"),
        ({}, ["--out", "/proc/not-here"], "cannot write to /proc/not-here"),
        (
            {"latitude": [69, 70], "time": ["2024-06-21T00:00:00Z", "2024-06-22T00:00:00Z"]},
            ["--out", "OUT"],
            "found no night",
        ),
    ],
)
def test_render_refuses_in_one_line_and_writes_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, object],
    argv_tail: list[str],
    says: str,
) -> None:
    out = tmp_path / "out"
    argv = [
        "sky",
        "render",
        str(write_job(tmp_path, **changes)),
        *(str(out) if a == "OUT" else a for a in argv_tail),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tessera sky render: ") and says in err and "Traceback" not in err
    assert not any(out.rglob("*.png")) if out.exists() else True


def test_render_without_stellarium_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = write_job(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["sky", "render", str(job), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "stellarium and xvfb-run not found on PATH" in err and ".ci/system-packages" in err
    assert not (tmp_path / "out").exists()


def test_submit_needs_a_queue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TESSERA_QUEUE_SKY_REQUESTS_URL", raising=False)
    assert main(["sky", "submit", str(write_job(tmp_path))]) == 2
    assert "no sky-requests queue: pass --queue-url" in capsys.readouterr().err
