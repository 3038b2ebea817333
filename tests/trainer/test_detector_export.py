"""Export to ONNX: the detector contract (names, shapes, dtypes, metadata) and ONNX Runtime matching torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from services.trainer.detector_net import CenterNetDetector
from services.trainer.export import export_detector, export_mismatch


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
