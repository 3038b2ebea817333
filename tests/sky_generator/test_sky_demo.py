"""``tessera sky demo`` end to end, small: the embedded default (moto + PostgreSQL), two sky worker processes
rendering with the real Stellarium, the trainer's sky-position task on the frames, the held-out error of
the model and of the centre-of-region baseline in km and nautical miles, the picture and result.json."""

from __future__ import annotations

import json
import math
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from services.sky_generator.demo import DemoResult, DemoSettings, demo, region_centre
from services.sky_generator.demo_judging import estimate_size

#: A tiny run: 48 frames in four shards over two workers, a few epochs on 64-pixel images.
TINY = DemoSettings(
    frames=48,
    workers=2,
    seed=5,
    image_size=64,
    epochs=3,
    train_params={"channels": 1, "width": 4, "hidden": 16, "batch_size": 8, "lr": 1e-3},
    timeout_s=300,
)


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, Path]:
    out = tmp_path_factory.mktemp("sky-demo")
    return demo(replace(TINY, out_dir=out)), out


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """The textbook haversine formula (IUGG mean radius), as an independent reference."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371.0088 * math.asin(math.sqrt(h))


def test_the_job_renders_every_frame_with_both_workers(ran: tuple[DemoResult, Path]) -> None:
    result, out = ran
    assert result.status == "SUCCESS", result.reason
    assert (result.frames, result.frames_done) == (48, 48)
    assert sorted(result.frames_by_worker) == ["sky-worker-1", "sky-worker-2"]
    assert sum(result.frames_by_worker.values()) == 48
    rows = [json.loads(line) for line in (out / "dataset" / "manifest.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(48))
    assert sum(row["split"] == "held_out" for row in rows) == 10  # a fifth, marked for the trainer
    assert all((out / "dataset" / row["file"]).is_file() for row in rows)
    assert result.proven + result.unverifiable == 48  # no frame failed its geometry proof
    assert (out / "job.yaml").is_file() and (out / "training" / "model.onnx").is_file()


def test_result_json_has_model_and_baseline_errors_in_km_and_nm(ran: tuple[DemoResult, Path]) -> None:
    _, out = ran
    saved = json.loads((out / "result.json").read_text())
    for name in ("model", "baseline"):
        errors = saved[name]
        for stat in ("mean", "median"):
            km, nm = errors[f"{stat}_km"], errors[f"{stat}_nm"]
            assert math.isfinite(km) and math.isfinite(nm) and km > 0
            assert nm == pytest.approx(km / 1.852, rel=1e-12)
    assert saved["held_out_frames"] == 10 and saved["training_frames"] == 38
    assert saved["verdict"] and isinstance(saved["better"], bool)
    if not saved["better"]:
        assert [p["training_frames"] for p in saved["learning_curve"]] == [10, 19, 38]
        assert "estimate" in saved and saved["estimate"]["method"]
    # The exported model the demo scored (ONNX Runtime, fed as its metadata says) is the one the trainer
    # evaluated (torch) on the same held-out frames.
    assert saved["model"]["mean_km"] == pytest.approx(saved["trainer_metrics"]["mean_error_km"], rel=2e-3)


def test_the_baseline_is_the_centre_of_the_region(ran: tuple[DemoResult, Path]) -> None:
    result, out = ran
    rows = [json.loads(line) for line in (out / "dataset" / "manifest.jsonl").read_text().splitlines()]
    held = [i for i, row in enumerate(rows) if row["split"] == "held_out"]
    assert region_centre(TINY.latitude, TINY.longitude) == (43.0, -69.0) == result.centre
    km = sorted(haversine_km((rows[i]["lat"], rows[i]["lon"]), (43.0, -69.0)) for i in held)
    assert result.baseline is not None
    assert result.baseline.mean_km == pytest.approx(sum(km) / len(km), rel=1e-9)
    assert result.baseline.median_km == pytest.approx((km[4] + km[5]) / 2, rel=1e-9)
    # Every held-out frame lies in the 2 x 2 degree box: no farther from its centre than its corner.
    assert max(km) < haversine_km((42.0, -70.0), (43.0, -69.0))


def test_the_picture_and_no_process_left(ran: tuple[DemoResult, Path]) -> None:
    result, out = ran
    with Image.open(out / "positions.png") as picture:
        picture.load()
        assert picture.width > 0 and picture.height > 0 and picture.getbbox() is not None
    assert len(result.worker_pids) == 2
    for pid in result.worker_pids:
        assert not _alive(pid), f"worker {pid} is still running"
    left = subprocess.run(["pgrep", "-f", result.job_id], capture_output=True, text=True, check=False)
    assert left.stdout.strip() == "", f"processes of job {result.job_id} left: {left.stdout}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "zombie" in status.read_text())


def test_the_size_estimate_reads_a_power_law() -> None:
    curve: list[dict[str, Any]] = [
        {"training_frames": n, "mean_km": 100.0 * (n / 100) ** -0.5} for n in (100.0, 200.0, 400.0)
    ]
    estimate = estimate_size(curve, baseline_km=25.0, val_fraction=0.2)
    assert estimate["exponent"] == pytest.approx(0.5)
    assert estimate["frames_to_match"] == 2000  # 1600 training frames, a fifth more held out
    assert estimate["frames_to_halve"] == 8000
    flat = estimate_size([{**p, "mean_km": 60.0} for p in curve], baseline_km=50.0, val_fraction=0.2)
    assert flat["frames_to_match"] is None and flat["frames_to_halve"] is None


def test_the_cli_has_the_demo_verb() -> None:
    from services.cli import parser

    args = parser().parse_args(["sky", "demo", "--frames", "40", "--latitude", "10", "11"])
    assert (args.frames, args.latitude, args.out_dir, args.workers) == (40, [10.0, 11.0], "out/sky-demo", 2)
