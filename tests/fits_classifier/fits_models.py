"""Small ONNX frame classifiers with known outputs, for the service's tests (the shipped one is trained).

``constant_classifier`` answers the same logits for every frame (``bias``), whatever its pixels, so a
test knows the verdict the threshold rule must give; ``brightness_classifier`` answers from the prepared
frame's mean, so frames can be told apart by a test that controls their brightness.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.frames import PreprocessSpec

CLASSES = ["good", "mirror_wobble", "shutter_fault"]


def metadata(
    classes: Sequence[str] = CLASSES,
    *,
    threshold: float | None = 0.5,
    spec: PreprocessSpec | None = None,
    name: str = "test-classifier",
) -> dict[str, str]:
    """The metadata the trainer's classifier export writes."""
    meta = {"tessera.class_names": json.dumps(list(classes)), "tessera.name": name}
    if threshold is not None:
        meta["tessera.threshold"] = str(threshold)
    meta.update((spec or PreprocessSpec(bin_factor=2, size=32, stretch="asinh")).to_metadata())
    return meta


def linear_classifier(
    weights: Sequence[float], bias: Sequence[float], *, channels: int = 1
) -> onnx.ModelProto:
    """logits = mean(frame) * weights + bias, for frames [N, channels, S, S]."""
    classes = len(bias)
    nodes = [
        helper.make_node("ReduceMean", ["frames"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["mean", "one"], ["mean_column"]),
        helper.make_node("MatMul", ["mean_column", "weights"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["logits"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.asarray(weights, np.float32).reshape(1, classes), "weights"),
        numpy_helper.from_array(np.asarray(bias, np.float32), "bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "frame_classifier",
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["N", channels, "S", "S"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, path: Path, meta: dict[str, str]) -> Path:
    """``model`` with ``meta`` written to ``path``."""
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def constant_classifier(path: Path, bias: Sequence[float], **meta: object) -> Path:
    """A classifier whose logits are ``bias`` for every frame."""
    return save(linear_classifier([0.0] * len(bias), bias), path, metadata(**meta))  # type: ignore[arg-type]
