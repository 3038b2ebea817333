"""Export to ONNX: the detector contract (names, shapes, dtypes, metadata) and ONNX Runtime matching torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from services.errors import UserError
from services.trainer.__main__ import main
from services.trainer.detector_net import CenterNetDetector
from services.trainer.export import export_detector, export_mismatch
from services.trainer.train_detector import TrainSettings, retrain


@pytest.fixture(scope="module")
def small_model() -> CenterNetDetector:
    torch.manual_seed(1)
    model = CenterNetDetector(2, width=8)
    # Non-trivial batch-norm statistics, so folding them into the convolutions is exercised.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.heads(torch.rand(2, 3, 128, 128))
    return model.eval()


def test_exported_graph_follows_the_contract(tmp_path: Path, small_model: CenterNetDetector) -> None:
    path = export_detector(small_model, tmp_path / "m.onnx", ["car", "house"], tile=(160, 128))
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["tessera.class_names"]) == ["car", "house"]
    assert meta["tessera.input_scale"] == "1/255"
    assert meta["tessera.tile_size"] == "160x128"
    assert meta["tessera.max_detections"] == "100"
    assert meta["tessera.name"] == "m"

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (image_input,) = session.get_inputs()
    assert image_input.name == "images" and image_input.type == "tensor(float)"
    assert isinstance(image_input.shape[0], str) and image_input.shape[1:] == [3, 128, 160]
    outputs = {o.name: o for o in session.get_outputs()}
    assert list(outputs) == ["boxes", "scores", "labels"]
    assert outputs["boxes"].shape[1:] == [100, 4] and outputs["scores"].shape[1:] == [100]
    assert outputs["labels"].type == "tensor(int64)"
    for batch in (1, 3):
        boxes, scores, labels = session.run(
            None, {"images": np.random.rand(batch, 3, 128, 160).astype(np.float32)}
        )
        assert (
            boxes.shape == (batch, 100, 4) and scores.shape == (batch, 100) and labels.shape == (batch, 100)
        )
        assert labels.dtype == np.int64 and set(np.unique(labels)) <= {0, 1}


def test_onnx_runtime_matches_torch(tmp_path: Path, small_model: CenterNetDetector) -> None:
    path = export_detector(small_model, tmp_path / "m.onnx", ["car", "house"], tile=(128, 128))
    images = np.random.default_rng(0).random((3, 3, 128, 128), dtype=np.float32)
    assert export_mismatch(small_model, path, images) < 1e-4
    # The check itself can fail: a model with other weights disagrees.
    torch.manual_seed(2)
    other = CenterNetDetector(2, width=8).eval()
    assert export_mismatch(other, path, images) > 1e-3


def test_class_names_must_fit_the_model(tmp_path: Path, small_model: CenterNetDetector) -> None:
    with pytest.raises(ValueError, match="class names"):
        export_detector(small_model, tmp_path / "m.onnx", ["car"])


def test_retrain_writes_model_curve_and_metrics(tmp_path: Path) -> None:
    settings = TrainSettings(steps=3, batch_size=2, crop=128, width=8, eval_scenes=2, tile=256, threads=1)
    report = retrain(tmp_path / "demo.onnx", settings)
    assert report.model_path.exists() and report.model_path.stat().st_size < 2_000_000
    with Image.open(report.curve_path) as curve:
        assert curve.size == (900, 500)
    metrics = json.loads(report.metrics_path.read_text())
    assert metrics["held_out"]["scenes"] == 2
    assert metrics["onnx_vs_torch_max_abs_diff"] < 1e-3
    at = metrics["score_threshold_0.3"]
    assert set(at) == {"precision", "recall", "true_positives", "false_positives", "false_negatives"}
    assert at["true_positives"] + at["false_negatives"] > 0
    assert metrics["settings"]["steps"] == 3


def test_command_line_refuses_nonsense(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--steps"):
        main(["detector", "--out", str(tmp_path / "m.onnx"), "--steps", "0"])
    with pytest.raises(SystemExit):
        main(["detector"])  # --out is required
