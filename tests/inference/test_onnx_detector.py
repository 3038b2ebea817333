"""OnnxDetector on real ONNX models: the contract, batching, class names, providers, and refusals."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx_builders import (
    CLASS_NAMES,
    LABELS,
    TILE,
    const,
    contract_model,
    expected_contract,
    graph_model,
    shaped_model,
    tiles_of_means,
    yolo_model,
)

from services.errors import UserError
from services.inference.detections import BoxChecks
from services.inference.detector import CPU_BATCH_BYTES, DEFAULT_BATCH, OnnxDetector, default_batch_size

MEANS = [0.9, 0.3, 0.0, 0.6, 1.0]  # 0.3: the 0.25-scaled box drops below the threshold; 0.0: no boxes


def assert_tile(d: object, mean: float, threshold: float, size: tuple[int, int] = (TILE, TILE)) -> None:
    boxes, scores, labels = expected_contract(mean, threshold)
    boxes = np.clip(boxes, 0, np.array([*size, *size], np.float32))  # the detector clips boxes to the tile
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


def test_with_no_batch_size_asked_for_the_provider_sets_one(make_model: Callable[..., Path]) -> None:
    # On a CPU: as many tiles as fit in CPU_BATCH_BYTES of float32 (cache-sized), 1 to DEFAULT_BATCH.
    assert CPU_BATCH_BYTES == 8 * 2**20 and DEFAULT_BATCH == 8
    assert default_batch_size("CPUExecutionProvider", 3, 512, 512) == 2
    assert default_batch_size("CPUExecutionProvider", 3, 1024, 1024) == 1
    assert default_batch_size("CPUExecutionProvider", 1, 16384, 16384) == 1
    assert default_batch_size("CPUExecutionProvider", 3, 256, 256) == 8
    assert default_batch_size("CPUExecutionProvider", 3, 32, 32) == 8
    assert default_batch_size("CUDAExecutionProvider", 3, 512, 512) == 8  # a GPU wants its batches full
    small = OnnxDetector(make_model(contract_model()), providers="cpu", batch_size=None)
    assert small.batch_size == 8  # 32 px tiles
    assert OnnxDetector(make_model(contract_model(batch=4)), providers="cpu", batch_size=None).batch_size == 4
    found = small.detect(tiles_of_means(MEANS))
    for d, mean in zip(found, MEANS, strict=True):
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
    assert_tile(d, 0.5, 0.25, size=(48, 40))


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


class _Delayed:
    """A real session that first sleeps: one session slower than the others (descheduled, say)."""

    def __init__(self, session: Any, seconds: float, log: list[str], name: str) -> None:
        self.session, self.seconds, self.log, self.name = session, seconds, log, name

    def run(self, names: Any, feed: Any, options: Any) -> Any:
        time.sleep(self.seconds)
        self.log.append(self.name)
        return self.session.run(names, feed, options)


def test_a_free_session_takes_the_next_batch_while_a_slow_one_runs(contract_path: Path) -> None:
    """Batches go to whichever session is free, not round-robin: a session held up (by the tile reader,
    on a busy machine) does not hold the others back, and the results still come in input order."""
    det = OnnxDetector(contract_path, providers="cpu", batch_size=1, score_threshold=0.1, sessions=2)
    ran: list[str] = []
    slow, fast = det._sessions
    det._sessions = [_Delayed(slow, 0.6, ran, "slow"), _Delayed(fast, 0.01, ran, "fast")]
    means = [0.9, 0.3, 0.0, 0.6, 1.0, 0.45, 0.75, 0.9, 0.3, 0.6]
    tiles = tiles_of_means(means)
    found = [d for batch in det.detect_many(tiles[i : i + 1] for i in range(len(means))) for d in batch]
    for d, mean in zip(found, means, strict=True):
        assert_tile(d, mean, 0.1)
    # Round-robin gives each 5; here the slow one takes one batch per 4 drawn (2 x sessions ahead).
    assert ran.count("slow") <= 3 and ran.count("fast") >= 7
    det.close()


NAN, INF = float("nan"), float("inf")


def constant_model(outputs: dict[str, np.ndarray]) -> Any:
    """A model on [N, 3, TILE, TILE] tiles whose float outputs are ``outputs`` (``[1, ...]``, broadcast over
    the batch; NaN and infinities survive) and, for a ``scores`` output, int64 ``labels`` of zeros."""
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, TILE, TILE])
    nodes = [
        helper.make_node("ReduceMean", ["pixels"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Mul", ["mean4", "zero"], ["zero4"]),
    ]
    inits, outs = [const("zero", np.zeros((1, 1, 1, 1), np.float32))], []
    for name, value in outputs.items():
        shape = [-1, *value.shape[1:]]
        nodes.append(helper.make_node("Reshape", ["zero4", f"{name}_ones"], [f"{name}_zero"]))
        nodes.append(helper.make_node("Add", [f"{name}_zero", f"{name}_value"], [name]))
        inits.append(const(f"{name}_ones", np.array([-1, *[1] * (value.ndim - 1)], np.int64)))
        inits.append(const(f"{name}_value", value.astype(np.float32)))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *shape[1:]]))
    if "scores" in outputs:
        nodes.append(helper.make_node("Shape", ["scores"], ["nk"]))
        nodes.append(helper.make_node("Expand", ["labels_row", "nk"], ["labels"]))
        inits.append(const("labels_row", np.zeros((1, 1), np.int64)))
        outs.append(
            helper.make_tensor_value_info("labels", TensorProto.INT64, ["N", outputs["scores"].shape[1]])
        )
    return graph_model(nodes, [x], outs, inits)


def test_nan_inverted_and_off_tile_boxes_never_leave_the_detector(make_model: Callable[..., Path]) -> None:
    rows = np.array(
        [
            [4, 4, 12, 12, 0.9],  # valid
            [NAN, 4, 12, 12, 0.9],  # NaN coordinate
            [4, 4, 12, 12, NAN],  # NaN score (no padding: NaN is not below the threshold)
            [4, 4, 12, INF, 0.9],  # infinite coordinate
            [12, 4, 4, 12, 0.9],  # inverted
            [40, 4, 50, 12, 0.9],  # wholly right of the 32 px tile
            [20, 20, 40, 36, 0.8],  # partly outside: clipped
            [1, 1, 5, 5, 1.5],  # score past 1: clamped
            [1, 1, 5, 5, 0.1],  # below the threshold: padding
        ],
        np.float32,
    )
    model = constant_model({"boxes": rows[None, :, :4], "scores": rows[None, :, 4]})
    det = OnnxDetector(make_model(model, "bad_boxes"), providers="cpu", batch_size=2, sessions=2)
    seen: list[BoxChecks] = []
    out = det.detect(tiles_of_means([0.5, 0.5, 0.5]), on_checks=seen.append)
    assert len(seen) == 2  # one report per batch
    assert sum(seen, BoxChecks()) == BoxChecks(
        non_finite=9, inverted=3, outside=3, clipped=3, score_clamped=3
    )
    for d in out:
        np.testing.assert_array_equal(d.boxes, [[4, 4, 12, 12], [20, 20, 32, 32], [1, 1, 5, 5]])
        np.testing.assert_allclose(d.scores, [0.9, 0.8, 1.0])
    # The same checks on the one-session path, and through detect_many.
    single = OnnxDetector(make_model(model, "bad_boxes_1"), providers="cpu", batch_size=3, sessions=1)
    many: list[BoxChecks] = []
    (batch,) = list(single.detect_many([tiles_of_means([0.5])], on_checks=many.append))
    assert many == [BoxChecks(non_finite=3, inverted=1, outside=1, clipped=1, score_clamped=1)]
    assert np.isfinite(batch[0].boxes).all()
    det.close()


def test_each_tile_of_a_batch_gets_its_own_checked_boxes(contract_path: Path) -> None:
    """The batch's boxes are checked at once and split back: every tile keeps its own rows, in order, when
    others lose boxes to the checks or to padding — a tile whose boxes all go comes back empty, in place."""
    det = OnnxDetector(contract_path, providers="cpu", batch_size=4, score_threshold=0.25)
    boxes = np.array(
        [
            [[1, 1, 5, 5], [NAN, 1, 5, 5], [2, 2, 6, 6]],  # tile 0: a NaN box between two good ones
            [[40, 1, 50, 5], [3, 3, 4, 4], [0, 0, 1, 1]],  # tile 1: off the tile, then two padding rows
            [[7, 7, 9, 9], [8, 8, 40, 40], [9, 9, 10, 10]],  # tile 2: one clipped to the tile
            [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],  # the batch's padding tile: never returned
        ],
        np.float32,
    )
    scores = np.array([[0.9, 0.8, 0.7], [0.9, 0.1, 0.2], [0.5, 0.6, 0.3], [0.9, 0.9, 0.9]], np.float32)
    labels = np.array([[0, 1, 2], [1, 1, 1], [2, 0, -1], [0, 0, 0]], np.int64)
    raw = [None] * 3
    for name, value in (("boxes", boxes), ("scores", scores), ("labels", labels)):
        raw[getattr(det._outputs, name)] = value
    out, checks = det._decode(raw, 3)
    assert len(out) == 3
    np.testing.assert_array_equal(out[0].boxes, [[1, 1, 5, 5], [2, 2, 6, 6]])
    np.testing.assert_array_equal(out[0].labels, [0, 2])
    assert len(out[1]) == 0
    np.testing.assert_array_equal(out[2].boxes, [[7, 7, 9, 9], [8, 8, TILE, TILE]])  # label -1: padding
    np.testing.assert_allclose(out[2].scores, [0.5, 0.6])
    assert checks == BoxChecks(non_finite=1, outside=1, clipped=1)


def test_a_yolo_head_with_nan_and_inverted_anchors(make_model: Callable[..., Path]) -> None:
    anchors = np.array(
        [
            [10, 10, 8, 8, 0.9, 0.0],  # kept
            [NAN, 10, 8, 8, 0.9, 0.0],  # NaN centre
            [20, 20, 6, 6, NAN, 0.0],  # NaN score
            [20, 20, -6, 6, 0.0, 0.8],  # negative width: inverted
            [40, 10, 4, 4, 0.0, 0.7],  # wholly outside
            [30, 5, 10, 4, 0.0, 0.6],  # partly outside: clipped to x2 = 32
            [5, 5, 2, 2, 0.1, 0.0],  # below the threshold
        ],
        np.float32,
    )
    model = constant_model({"output0": anchors.T[None]})
    det = OnnxDetector(make_model(model, "bad_yolo"), providers="cpu", batch_size=1)
    assert det.is_yolo
    seen: list[BoxChecks] = []
    (d,) = det.detect(tiles_of_means([0.5]), on_checks=seen.append)
    assert seen == [BoxChecks(non_finite=2, inverted=1, outside=1, clipped=1)]
    np.testing.assert_array_equal(d.boxes, [[6, 6, 14, 14], [25, 3, 32, 7]])
    np.testing.assert_array_equal(d.labels, [0, 1])
