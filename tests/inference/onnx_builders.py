"""Real ONNX models built by the tests with ``onnx.helper``: contract detectors whose boxes depend on the
pixels, a raw Ultralytics-YOLO-shaped head, and models that break the contract."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from model_stall import endless_loop
from onnx import TensorProto, helper, numpy_helper

TILE = 32
#: Per box k: box = BOX_SCALE[k] * mean + BOX_OFFSET[k]; score = SCORE_SCALE[k] * mean; label = LABELS[k].
BOX_SCALE = np.array([[10, 10, 10, 10], [0, 20, 0, 20], [5, 0, 5, 0]], dtype=np.float32)
BOX_OFFSET = np.array([[1, 2, 9, 12], [3, 0, 11, 6], [0, 0, 32, 32]], dtype=np.float32)
SCORE_SCALE = np.array([1.0, 0.5, 0.25], dtype=np.float32)
LABELS = np.array([0, 1, 2], dtype=np.int64)
CLASS_NAMES = ["car", "truck", "ship"]

Dim = int | str


def save(model: onnx.ModelProto, path: Path, metadata: dict[str, str] | None = None) -> Path:
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def graph_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test_detector", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what this onnxruntime reads
    return model


def const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def contract_model(
    *,
    channels: int = 3,
    height: Dim = TILE,
    width: Dim = TILE,
    batch: Dim = "N",
    label_type: int = TensorProto.INT64,
    names: tuple[str, str, str] = ("boxes", "scores", "labels"),
    order: tuple[int, int, int] = (0, 1, 2),
) -> onnx.ModelProto:
    """A detector following the contract: three boxes per tile, placed and scored by the tile's mean."""
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, channels, height, width])
    k = len(LABELS)
    nodes = [
        helper.make_node("ReduceMean", ["pixels"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean4", "shape_n11"], ["mean3"]),
        helper.make_node("Reshape", ["mean4", "shape_n1"], ["mean2"]),
        helper.make_node("Mul", ["mean3", "box_scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "box_offset"], [names[0]]),
        helper.make_node("Mul", ["mean2", "score_scale"], [names[1]]),
        helper.make_node("Shape", [names[1]], ["nk"]),
        helper.make_node("Expand", ["labels_row", "nk"], ["labels64"]),
    ]
    if label_type == TensorProto.INT64:
        nodes.append(helper.make_node("Identity", ["labels64"], [names[2]]))
    else:
        nodes.append(helper.make_node("Cast", ["labels64"], [names[2]], to=label_type))
    inits = [
        const("shape_n11", np.array([-1, 1, 1], np.int64)),
        const("shape_n1", np.array([-1, 1], np.int64)),
        const("box_scale", BOX_SCALE[None]),
        const("box_offset", BOX_OFFSET[None]),
        const("score_scale", SCORE_SCALE[None]),
        const("labels_row", LABELS[None]),
    ]
    outs = [
        helper.make_tensor_value_info(names[0], TensorProto.FLOAT, [batch, k, 4]),
        helper.make_tensor_value_info(names[1], TensorProto.FLOAT, [batch, k]),
        helper.make_tensor_value_info(names[2], label_type, [batch, k]),
    ]
    return graph_model(nodes, [x], [outs[i] for i in order], inits)


def hanging_model(trips: int = 2**62) -> onnx.ModelProto:
    """A contract detector that never returns (see ``model_stall.endless_loop``)."""
    return endless_loop(contract_model(), "pixels", trips=trips)


def expected_contract(mean: float, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What :func:`contract_model` gives for a tile of mean ``mean``, after the score threshold."""
    boxes = BOX_SCALE * np.float32(mean) + BOX_OFFSET
    scores = SCORE_SCALE * np.float32(mean)
    keep = scores >= threshold
    return boxes[keep], scores[keep], LABELS[keep].astype(np.int32)


#: A raw YOLO head: 16 anchors, 3 classes; columns (cx, cy, w, h, score per class). Anchor 5's class-0
#: score is the tile's mean (so it shows only on bright tiles).
YOLO_ANCHORS = np.array(
    [
        [10, 10, 8, 8, 0.90, 0.10, 0.00],  # kept: car
        [11, 10, 8, 8, 0.80, 0.00, 0.00],  # car, IoU 0.78 with anchor 0: suppressed
        [10, 10, 8, 8, 0.00, 0.70, 0.00],  # same box, truck: kept (NMS is per class)
        [20, 20, 6, 6, 0.00, 0.00, 0.10],  # below the threshold
        [30, 5, 10, 4, 0.00, 0.00, 0.60],  # ship, sticks out of the tile: clipped to x2 = 32
        [16, 24, 4, 6, 0.00, 0.00, 0.00],  # car with the tile's mean as score
        *[[8 + i, 8, 4, 4, 0.0, 0.0, 0.0] for i in range(10)],  # empty anchors (heads have thousands)
    ],
    dtype=np.float32,
)


def yolo_model(*, batch: Dim = "N", transposed: bool = False) -> onnx.ModelProto:
    """A model with Ultralytics' raw detection output [N, 4 + classes, anchors]."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, TILE, TILE])
    base = YOLO_ANCHORS.T[None]  # [1, 7, anchors]
    gain = np.zeros_like(base)
    gain[0, 4, 5] = 1.0
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean4", "shape_n11"], ["mean3"]),
        helper.make_node("Mul", ["mean3", "gain"], ["varying"]),
        helper.make_node("Add", ["varying", "base"], ["head" if transposed else "output0"]),
    ]
    shape: list[Dim] = [batch, 7, len(YOLO_ANCHORS)]
    if transposed:
        nodes.append(helper.make_node("Transpose", ["head"], ["output0"], perm=[0, 2, 1]))
        shape = [batch, len(YOLO_ANCHORS), 7]
    inits = [const("shape_n11", np.array([-1, 1, 1], np.int64)), const("base", base), const("gain", gain)]
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, shape)
    return graph_model(nodes, [x], [out], inits)


def shaped_model(inputs: list[tuple[str, int, list[Dim]]], outputs: list[tuple[str, int, list[Dim]]]) -> Any:
    """A model with exactly the given inputs and outputs (for shapes the contract refuses). Each output
    ``[N, d1, ...]`` is cut from the flattened first input, so ONNX Runtime infers the declared shape."""
    ins = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    outs = [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs]
    nodes = [
        helper.make_node("Cast", [inputs[0][0]], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["as_float", "flat_shape"], ["flat"]),
    ]
    inits = [const("flat_shape", np.array([0, -1], np.int64)), const("zero", np.array([0], np.int64))]
    inits.append(const("one", np.array([1], np.int64)))
    for name, dtype, shape in outputs:
        rest = [int(d) for d in shape[1:]]
        if not rest:
            nodes.append(helper.make_node("ReduceMean", ["flat"], [f"{name}_f"], axes=[1], keepdims=0))
        else:
            inits.append(const(f"{name}_end", np.array([int(np.prod(rest))], np.int64)))
            inits.append(const(f"{name}_shape", np.array([0, *rest], np.int64)))
            nodes.append(helper.make_node("Slice", ["flat", "zero", f"{name}_end", "one"], [f"{name}_s"]))
            nodes.append(helper.make_node("Reshape", [f"{name}_s", f"{name}_shape"], [f"{name}_f"]))
        nodes.append(helper.make_node("Cast", [f"{name}_f"], [name], to=dtype))
    return graph_model(nodes, ins, outs, inits)


def tiles_of_means(means: Sequence[float], channels: int = 3, size: int = TILE) -> np.ndarray:
    """Constant tiles whose pixel values are the given means (multiples of 1/255: exact through PNG)."""
    return np.stack([np.full((channels, size, size), m, np.float32) for m in means])
