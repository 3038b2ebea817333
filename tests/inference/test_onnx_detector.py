"""OnnxDetector on real ONNX models: the contract, batching, class names, providers, and refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx_builders import (
    CLASS_NAMES,
    LABELS,
    TILE,
    contract_model,
    expected_contract,
    graph_model,
    shaped_model,
    tiles_of_means,
    yolo_model,
)

from services.errors import UserError
from services.inference.detector import OnnxDetector

MEANS = [0.9, 0.3, 0.0, 0.6, 1.0]  # 0.3: the 0.25-scaled box drops below the threshold; 0.0: no boxes


def assert_tile(d: object, mean: float, threshold: float) -> None:
    boxes, scores, labels = expected_contract(mean, threshold)
    np.testing.assert_allclose(d.boxes, boxes, atol=1e-3)  # type: ignore[attr-defined]
    np.testing.assert_allclose(d.scores, scores, atol=1e-4)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(d.labels, labels)  # type: ignore[attr-defined]


def test_contract_model_gives_each_tile_its_boxes_scores_and_labels(contract_path: Path) -> None:
    det = OnnxDetector(contract_path, providers="cpu", batch_size=2, score_threshold=0.1)
    assert (det.channels, det.tile_height, det.tile_width, det.batch_size) == (3, TILE, TILE, 2)
    assert det.class_names == CLASS_NAMES and det.name == "contract" and not det.is_yolo
    # 5 tiles in batches of 2: the last batch is padded to 2 and the padding's result dropped.
    out = det.detect(tiles_of_means(MEANS))
    assert len(out) == len(MEANS)
    for d, mean in zip(out, MEANS, strict=True):
        assert_tile(d, mean, 0.1)
    assert len(out[2]) == 0  # a black tile scores 0 everywhere
    assert len(out[1]) == 2  # the third box scored 0.075 < 0.1
    assert out[0].boxes.dtype == np.float32 and out[0].labels.dtype == np.int32


def test_batch_size_does_not_change_results(contract_path: Path) -> None:
    tiles = tiles_of_means(MEANS)
    one = OnnxDetector(contract_path, providers="cpu", batch_size=1).detect(tiles)
    four = OnnxDetector(contract_path, providers="cpu", batch_size=4).detect(tiles)
    for a, b in zip(one, four, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_fixed_batch_dimension_sets_the_batch_size(make_model: Callable[..., Path]) -> None:
    det = OnnxDetector(make_model(contract_model(batch=4)), providers="cpu", batch_size=16)
    assert det.batch_size == 4
    out = det.detect(tiles_of_means(MEANS))  # 4 + 1 padded to 4
    for d, mean in zip(out, MEANS, strict=True):
        assert_tile(d, mean, 0.25)


@pytest.mark.parametrize("label_type", [TensorProto.INT32, TensorProto.FLOAT])
def test_labels_as_int32_or_float(make_model: Callable[..., Path], label_type: int) -> None:
    det = OnnxDetector(make_model(contract_model(label_type=label_type)), providers="cpu")
    (d,) = det.detect(tiles_of_means([1.0]))
    np.testing.assert_array_equal(d.labels, LABELS)


def test_outputs_found_by_rank_and_type_when_names_say_nothing(make_model: Callable[..., Path]) -> None:
    # Generic names, listed as labels, boxes, scores.
    model = contract_model(names=("out_a", "out_b", "out_c"), order=(2, 0, 1))
    (d,) = OnnxDetector(make_model(model), providers="cpu").detect(tiles_of_means([0.8]))
    assert_tile(d, 0.8, 0.25)


def test_dynamic_tile_size_needs_and_uses_tile_size(make_model: Callable[..., Path]) -> None:
    path = make_model(contract_model(height="H", width="W"))
    with pytest.raises(UserError, match="dynamic tile size"):
        OnnxDetector(path, providers="cpu")
    det = OnnxDetector(path, providers="cpu", tile_size=(48, 40))
    assert (det.tile_width, det.tile_height) == (48, 40)
    (d,) = det.detect(np.full((1, 3, 40, 48), 0.5, np.float32))
    assert_tile(d, 0.5, 0.25)


def test_tile_size_must_match_a_fixed_model(contract_path: Path) -> None:
    with pytest.raises(UserError, match="does not fit"):
        OnnxDetector(contract_path, providers="cpu", tile_size=(64, 64))


def test_wrong_tile_shape_is_refused(contract_path: Path) -> None:
    det = OnnxDetector(contract_path, providers="cpu")
    with pytest.raises(UserError, match=r"takes tiles \[B, 3, 32, 32\]"):
        det.detect(np.zeros((2, 1, TILE, TILE), np.float32))


def test_provider_is_reported_and_fallback_is_quiet(
    contract_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    det = OnnxDetector(contract_path, providers="auto", intra_op_threads=1)
    assert det.provider == det._session.get_providers()[0]
    assert det.provider in {"CPUExecutionProvider", "CUDAExecutionProvider"}
    assert det._session.get_session_options().intra_op_num_threads == 1
    # ONNX Runtime's "failed to load the CUDA provider" error does not reach the output.
    assert "CUDAExecutionProvider" not in capfd.readouterr().err
    assert OnnxDetector(contract_path, providers="cpu").provider == "CPUExecutionProvider"


def test_cuda_request_runs_on_cuda_or_says_why_not(contract_path: Path) -> None:
    try:
        det = OnnxDetector(contract_path, providers="cuda")
    except UserError as exc:
        assert "CUDA" in str(exc)
    else:
        assert det.provider == "CUDAExecutionProvider"


def test_model_from_bytes(contract_path: Path) -> None:
    det = OnnxDetector(contract_path.read_bytes(), providers="cpu")
    assert det.class_names == CLASS_NAMES
    (d,) = det.detect(tiles_of_means([0.5]))
    assert_tile(d, 0.5, 0.25)


def test_metadata_name_and_input_scale(make_model: Callable[..., Path]) -> None:
    path = make_model(
        contract_model(), "file", {"tessera.name": "vehicles-v2", "tessera.input_scale": "1/65535"}
    )
    det = OnnxDetector(path, providers="cpu")
    assert det.name == "vehicles-v2" and det.input_scale == "1/65535" and det.class_names == []
    assert det.class_name(1) == "1"


# --- models that break the contract -------------------------------------------------------------------

F, I64, U8 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.UINT8
GOOD_OUT = [("boxes", F, ["N", 3, 4]), ("scores", F, ["N", 3]), ("labels", I64, ["N", 3])]


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        ([("x", F, ["N", 3, 32])], GOOD_OUT, r"\[N, 3, 32\].*one input \[N, C, H, W\] float32"),
        ([("x", U8, ["N", 3, 32, 32])], GOOD_OUT, r"uint8 \[N, 3, 32, 32\].*float32"),
        ([("x", F, ["N", 3, 32, 32]), ("y", F, ["N", 3, 32, 32])], GOOD_OUT, "has 2 inputs"),
        ([("x", F, ["N", "C", 32, 32])], GOOD_OUT, "channel count C must be fixed"),
        (
            [("x", F, ["N", 3, 32, 32])],
            GOOD_OUT[:1],
            r"returns 'boxes' float32 \[N, 3, 4\]; the detector contract",
        ),
        (
            [("x", F, ["N", 3, 32, 32])],
            GOOD_OUT[:2],
            "returns 'boxes'.*'scores'.*the detector contract wants",
        ),
        ([("x", F, ["N", 3, 32, 32])], [("boxes", F, ["N", 3, 5]), *GOOD_OUT[1:]], r"\[N, 3, 5\]"),
        (
            [("x", F, ["N", 3, 32, 32])],
            [("boxes", F, ["N", 3, 4]), *GOOD_OUT[1:2], ("labels", F, ["N"])],
            r"'labels' float32 \[N\]",
        ),
        ([("x", F, ["N", 3, 32, 32])], [("raw", F, ["N", 3, 100])], r"raw Ultralytics YOLO output"),
        ([("x", F, ["N", 3, 32, 32])], [("raw", I64, ["N", 7, 60])], r"int64 \[N, 7, 60\]"),
    ],
)
def test_models_outside_the_contract_are_refused(
    make_model: Callable[..., Path], inputs: list, outputs: list, message: str
) -> None:
    path = make_model(shaped_model(inputs, outputs), "bad")
    with pytest.raises(UserError, match=message):
        OnnxDetector(path, providers="cpu")


def test_transposed_yolo_head_is_named(make_model: Callable[..., Path]) -> None:
    path = make_model(yolo_model(transposed=True), "yolo_t")  # [N, anchors, 4 + classes]
    with pytest.raises(UserError, match="transposed YOLO"):
        OnnxDetector(path, providers="cpu")


def test_runtime_shapes_are_checked(make_model: Callable[..., Path]) -> None:
    # Declared shapes are dynamic, so loading passes; at run time labels come out [N, 1] for [N, 3, 4] boxes.
    x = helper.make_tensor_value_info("x", F, ["N", 3, 4, 4])
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["boxes"], axes=[3], keepdims=0),  # [N, 3, 4]
        helper.make_node("ReduceMean", ["boxes"], ["scores"], axes=[2], keepdims=0),  # [N, 3]
        helper.make_node("ReduceMean", ["scores"], ["mean"], axes=[1], keepdims=1),  # [N, 1]
        helper.make_node("Cast", ["mean"], ["labels"], to=I64),
    ]
    outputs: list[tuple[str, int, list[str | int]]] = [
        ("boxes", F, ["N", "K", 4]),
        ("scores", F, ["N", "K"]),
        ("labels", I64, ["N", "K"]),
    ]
    model = graph_model(nodes, [x], [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs])
    det = OnnxDetector(make_model(model, "runtime_bad"), providers="cpu", batch_size=1)
    with pytest.raises(UserError, match=r"labels \[1, 1\] for a batch of 1; the contract wants \[1, K, 4\]"):
        det.detect(np.ones((1, 3, 4, 4), np.float32))


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model file not found"):
        OnnxDetector(tmp_path / "nope.onnx")


def test_file_that_is_not_onnx(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"this is a GeoTIFF, honest\x00\x01")
    with pytest.raises(UserError, match=r"model.onnx is not a model ONNX Runtime can load"):
        OnnxDetector(path)


def test_bad_class_names_metadata(make_model: Callable[..., Path]) -> None:
    path = make_model(contract_model(), "names_bad", {"tessera.class_names": "car, truck"})
    with pytest.raises(UserError, match=r"tessera.class_names is not JSON"):
        OnnxDetector(path, providers="cpu")
    path = make_model(contract_model(), "names_dict", {"tessera.class_names": json.dumps({"0": "car"})})
    with pytest.raises(UserError, match="JSON list of names"):
        OnnxDetector(path, providers="cpu")


def test_bad_arguments(contract_path: Path) -> None:
    with pytest.raises(UserError, match="unknown providers"):
        OnnxDetector(contract_path, providers="tpu")
    with pytest.raises(UserError, match="batch_size"):
        OnnxDetector(contract_path, batch_size=0)


def test_cpu_sessions_run_batches_side_by_side_in_input_order(contract_path: Path) -> None:
    det = OnnxDetector(contract_path, providers="cpu", batch_size=2, score_threshold=0.1, sessions=3)
    assert det.sessions == 3
    assert all(s.get_session_options().intra_op_num_threads == 1 for s in det._sessions)
    means = [0.9, 0.3, 0.0, 0.6, 1.0, 0.45, 0.75]
    tiles = tiles_of_means(means)
    batches = [tiles[i : i + 2] for i in range(0, len(means), 2)]  # the last one short
    found = [d for batch in det.detect_many(iter(batches)) for d in batch]
    assert len(found) == len(means)
    for d, mean in zip(found, means, strict=True):
        assert_tile(d, mean, 0.1)
    for d, mean in zip(det.detect(tiles), means, strict=True):
        assert_tile(d, mean, 0.1)
    det.close()
    # An explicit intra-op thread count keeps one session.
    assert OnnxDetector(contract_path, providers="cpu", intra_op_threads=2).sessions == 1
