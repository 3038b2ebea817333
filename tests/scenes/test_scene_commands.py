"""`tessera scene make` writes a georeferenced scene and its truth file; `tessera run` on it is scored by
`tessera scene score` — the first-hour loop a new user follows from the README, with no Python."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio

from services.cli import main

ROOT = Path(__file__).resolve().parents[2]
DETECTOR = ROOT / "services" / "models" / "tessera-demo-detector.onnx"


def _tessera(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_make_run_score(tmp_path: Path) -> None:
    made = _tessera("scene", "make", "scene.tif", "--size", "1024", "768", "--seed", "3", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    with rasterio.open(tmp_path / "scene.tif") as scene:
        assert (scene.width, scene.height, scene.count) == (1024, 768, 3) and scene.crs is not None
    truth = json.loads((tmp_path / "scene.truth.json").read_text())
    assert truth["schema"] == "tessera.scene-truth/v1" and truth["image"] == "scene.tif"
    assert f"{len(truth['objects'])} known objects" in made.stdout.replace(",", "")
    ran = _tessera("run", "scene.tif", "--model", str(DETECTOR), "--out", "det.geojson", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    scored = _tessera("scene", "score", "det.geojson", "--truth", "scene.truth.json", "--json", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    counts = json.loads(scored.stdout)
    assert counts["true_positives"] + counts["false_negatives"] == len(truth["objects"])
    assert counts["precision"] > 0.9 and counts["recall"] > 0.9, counts


def test_scoring_a_truth_file_against_itself_counts_every_object(tmp_path: Path) -> None:
    assert main(["scene", "make", str(tmp_path / "s.tif"), "--size", "256", "256"]) == 0
    truth = json.loads((tmp_path / "s.truth.json").read_text())
    features = [
        {"type": "Feature", "geometry": None, "properties": {"class": o["class"], "score": 0.9, **o}}
        for o in truth["objects"]
    ]
    (tmp_path / "d.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    from services.scenes.truth import score_file

    score = score_file(tmp_path / "d.geojson", tmp_path / "s.truth.json")
    assert (score.true_positives, score.false_positives, score.false_negatives) == (len(features), 0, 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scene", "make", "scene.png"], "give the scene a .tif name"),
        (["scene", "make", "s.tif", "--size", "10", "10"], "at least 64 x 64"),
        (["scene", "score", "nowhere.geojson", "--truth", "t.json"], "truth file t.json does not exist"),
        (["scene", "score", "bad.json", "--truth", "bad.json"], "is not a scene truth file"),
        (["scene", "score", "x.geojson", "--truth", "x.geojson", "--iou", "0"], "--iou must be in (0, 1]"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "bad.json").write_text('{"type": "FeatureCollection", "features": []}')
    done = _tessera(*args, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
