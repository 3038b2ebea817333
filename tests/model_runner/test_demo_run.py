"""``tessera demo`` end to end: embedded moto + PostgreSQL, a generated scene, two worker processes started
as ``python -m services.cli worker model-runner``, the shipped demo detector, scores and a preview."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from services.model_runner.demo import DEFAULT_MODEL, DemoSettings, demo, matches


def _cli_serves_workers() -> bool:
    from services.cli import parser

    try:
        parser().parse_args(["worker", "model-runner", "--once"])
    except SystemExit:
        return False
    return True


def test_matches_pairs_each_object_once_by_class_and_iou() -> None:
    true = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], np.float64)
    true_labels = np.array([0, 0, 1])
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 0, 30, 10], [40, 0, 50, 10]], np.float64)
    labels = np.array([0, 0, 0, 0])  # the last one has the wrong class
    found, seen = matches(boxes, labels, true, true_labels)
    assert found.tolist() == [True, False, True, False]
    assert seen.tolist() == [True, True, False]


def test_the_tessera_cli_serves_the_model_runner_commands() -> None:
    assert _cli_serves_workers()
    assert DEFAULT_MODEL.is_file()


def test_the_demo_runs_with_two_workers_and_scores_the_detections(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = demo(DemoSettings(out_dir=out, width=3072, height=3072, region=1024, seed=11, timeout_s=300))
    assert result.status == "SUCCESS", result.reason
    assert (result.regions, result.tiles) == (9, 49)
    # Both worker processes ran regions.
    assert sorted(result.regions_by_worker) == ["worker-1", "worker-2"]
    assert sum(result.regions_by_worker.values()) == 9
    assert result.provider == "CPUExecutionProvider"
    features = json.loads((out / "detections.geojson").read_text())["features"]
    assert len(features) == result.detections == result.score.true_positives + result.score.false_positives
    assert {f["properties"]["class"] for f in features} <= {"vehicle", "building", "tank"}
    # The shipped detector finds most objects and little else (its held-out figures are in its README).
    assert result.score.recall > 0.95 and result.score.precision > 0.95, result.score
    with Image.open(out / "preview.png") as preview:
        assert preview.size == (1600, 1600)
    for name in ("worker-1", "worker-2"):
        lines = (out / f"{name}.metrics.jsonl").read_text().splitlines()
        assert any('"TilesPerSecond"' in line for line in lines)


def test_the_summary_says_counts_not_a_rate_rounded_to_one() -> None:
    from services.model_runner.demo import _share

    assert _share(5367, 5369, "detections") == "5,367 of 5,369 detections (99.96%)"
    assert _share(0, 0, "detections") == "none: 0 detections"
