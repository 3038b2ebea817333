"""The demo detector shipped in services/models: the contract, and it finds the objects of fresh scenes."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from services.scenes.scoring import Score, score_detections
from services.scenes.synthetic import DEFAULT_CLASSES, generate_scene

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "services" / "models" / "tessera-demo-detector.onnx"
#: Far from the trainer's seeds and from the scenes its metrics JSON was measured on.
FRESH_SEED = 1_900_000_000


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])


def test_file_is_small_and_documented() -> None:
    assert MODEL.stat().st_size < 2_000_000
    readme = (MODEL.parent / "README.md").read_text(encoding="utf-8")
    # One model, one loop, one command: it is made by `tessera train detector` and the generic loop.
    assert MODEL.name in readme and "tessera train detector --dataset synthetic --size full" in readme
    metrics = json.loads(MODEL.with_suffix(".metrics.json").read_text(encoding="utf-8"))
    assert metrics["params"]["score_threshold"] == 0.3 and metrics["eval_scenes"] == 32
    assert metrics["precision"] >= 0.9 and metrics["recall"] >= 0.9
    assert {"precision_at_0.25", "recall_at_0.25", "precision_at_0.5", "recall_at_0.5"} <= set(metrics)


def test_contract_names_shapes_and_metadata(session: ort.InferenceSession) -> None:
    (images,) = session.get_inputs()
    assert images.name == "images" and images.type == "tensor(float)"
    assert isinstance(images.shape[0], str) and images.shape[1:] == [3, 512, 512]
    outputs = session.get_outputs()
    assert [o.name for o in outputs] == ["boxes", "scores", "labels"]
    assert [o.shape[1:] for o in outputs] == [[100, 4], [100], [100]]
    assert [o.type for o in outputs] == ["tensor(float)", "tensor(float)", "tensor(int64)"]
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["tessera.class_names"]) == list(DEFAULT_CLASSES)
    assert meta["tessera.input_scale"] == "1/255"
    assert meta["tessera.tile_size"] == "512x512"
    assert meta["tessera.name"] == "tessera-demo-detector"


def test_finds_the_objects_of_fresh_scenes(session: ort.InferenceSession) -> None:
    scenes = [generate_scene(512, 512, seed=FRESH_SEED + i) for i in range(6)]
    images = np.stack([pixels for pixels, _, _ in scenes]).astype(np.float32) / 255
    boxes, scores, labels = session.run(None, {"images": images})
    total = Score(0, 0, 0)
    for i, (_, true_boxes, true_labels) in enumerate(scenes):
        keep = scores[i] >= 0.3
        total += score_detections(boxes[i][keep], scores[i][keep], labels[i][keep], true_boxes, true_labels)
    assert total.true_positives + total.false_negatives > 80
    assert total.precision >= 0.8 and total.recall >= 0.8, total
    # Batch independence: one image alone gives the same detections as inside the batch.
    alone = session.run(None, {"images": images[2:3]})
    np.testing.assert_allclose(alone[1][0], scores[2], atol=1e-5)


def test_a_blank_tile_finds_nothing(session: ort.InferenceSession) -> None:
    _, scores, _ = session.run(None, {"images": np.zeros((1, 3, 512, 512), np.float32)})
    assert scores.max() < 0.3


def test_only_the_trainer_imports_torch() -> None:
    offenders = []
    for path in (ROOT / "services").rglob("*.py"):
        if path.is_relative_to(ROOT / "services" / "trainer"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] == "torch" for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
