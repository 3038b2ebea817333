"""Frames judged by a model whose answer is known: the threshold rule, unreadable frames, the contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fits_models import CLASSES, constant_classifier, linear_classifier, metadata, save

from services.errors import UserError
from services.fits_classifier.model import FrameClassifier
from services.fits_classifier.verdicts import CLASSIFIED, UNREADABLE, checksum, judge
from services.frames import PreprocessSpec, generate_frame, write_fits


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    return [e / sum(exps) for e in exps]


@pytest.fixture
def frame_bytes(tmp_path: Path) -> bytes:
    return write_fits(tmp_path / "f.fits", generate_frame("good", 3, (64, 64))).read_bytes()


def test_a_fault_is_declared_when_its_probability_reaches_the_threshold(
    tmp_path: Path, frame_bytes: bytes
) -> None:
    logits = [0.0, 2.0, -1.0]
    classifier = FrameClassifier(constant_classifier(tmp_path / "m.onnx", logits, threshold=0.8))
    [verdict] = judge(classifier, [("f.fits", frame_bytes)])
    expected = _softmax(logits)
    assert verdict.status == CLASSIFIED
    assert verdict.verdict == "mirror_wobble"
    assert verdict.score == pytest.approx(expected[1], abs=1e-6)
    assert list(verdict.probabilities or {}) == CLASSES
    assert sum((verdict.probabilities or {}).values()) == pytest.approx(1.0)
    assert verdict.checksum == checksum(frame_bytes) and verdict.size_bytes == len(frame_bytes)
    assert verdict.model_name == "test-classifier" and verdict.model_version.startswith("sha256:")

    # The same probabilities under a stricter threshold: no fault is sure enough, the frame is good.
    strict = FrameClassifier(constant_classifier(tmp_path / "s.onnx", logits, threshold=0.9))
    [verdict] = judge(strict, [("f.fits", frame_bytes)])
    assert verdict.verdict == "good"
    assert verdict.score == pytest.approx(expected[0], abs=1e-6)


def test_without_a_good_class_the_most_probable_class_wins(tmp_path: Path, frame_bytes: bytes) -> None:
    path = constant_classifier(tmp_path / "m.onnx", [0.3, 1.0], classes=["cloudy", "clear"], threshold=None)
    [verdict] = judge(FrameClassifier(path), [("f.fits", frame_bytes)])
    assert verdict.verdict == "clear"


def test_unreadable_frames_get_a_reason_and_do_not_stop_the_others(
    tmp_path: Path, frame_bytes: bytes
) -> None:
    classifier = FrameClassifier(constant_classifier(tmp_path / "m.onnx", [0.0, 2.0, -1.0]))
    cube = tmp_path / "cube.fits"
    from astropy.io import fits

    fits.PrimaryHDU(np.zeros((3, 8, 8), np.float32)).writeto(cube)
    frames = [
        ("text", b"SIMPLE? no, just text" * 5),
        ("good", frame_bytes),
        ("truncated", frame_bytes[: len(frame_bytes) // 2]),
        ("empty", b""),
        ("cube", cube.read_bytes()),
    ]
    verdicts = judge(classifier, frames)
    assert [v.source for v in verdicts] == [name for name, _ in frames]
    by_name = {v.source: v for v in verdicts}
    assert by_name["good"].status == CLASSIFIED
    for name in ("text", "truncated", "empty", "cube"):
        verdict = by_name[name]
        assert verdict.status == UNREADABLE and verdict.verdict == "unreadable" and verdict.score is None
        assert verdict.reason, name
    assert "empty" in (by_name["empty"].reason or "")
    assert "3-D" in (by_name["cube"].reason or "") or "2-D" in (by_name["cube"].reason or "")
    assert by_name["text"].checksum == checksum(frames[0][1])


def test_the_model_sees_the_frame_as_its_spec_prepares_it(tmp_path: Path) -> None:
    # logits = mean(prepared) * w: a frame whose prepared mean is known gives known probabilities.
    spec = PreprocessSpec(bin_factor=1, size=16, stretch="linear")
    path = save(linear_classifier([0.0, 4.0, 0.0], [0.0, 0.0, 0.0]), tmp_path / "m.onnx", metadata(spec=spec))
    classifier = FrameClassifier(path)
    assert classifier.spec == spec
    ramp = np.tile(np.linspace(0, 1000, 16, dtype=np.float32), (16, 1))
    from astropy.io import fits

    target = tmp_path / "ramp.fits"
    fits.PrimaryHDU(ramp).writeto(target)
    [verdict] = judge(classifier, [("ramp", target.read_bytes())])
    mean = float(spec.apply(ramp).mean())
    expected = _softmax([0.0, 4.0 * mean, 0.0])
    assert (verdict.probabilities or {})["mirror_wobble"] == pytest.approx(expected[1], abs=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tessera.class_names": None}, "tessera.class_names"),
        ({"tessera.class_names": "good,bad"}, "not JSON"),
        ({"tessera.class_names": json.dumps(["good"])}, "two or more"),
        ({"tessera.threshold": None}, "tessera.threshold"),
        ({"tessera.threshold": "1.5"}, "between 0 and 1"),
        ({"tessera.good_class": "fine"}, "not one of its classes"),
        ({"tessera.frames.version": "tessera.frames.preprocess/0"}, "retrain"),
        ({"tessera.frames.size": None}, "tessera.frames.size"),
    ],
)
def test_a_model_that_breaks_the_contract_is_refused_with_what_it_lacks(
    tmp_path: Path, change: dict[str, str | None], message: str
) -> None:
    meta = metadata()
    for key, value in change.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path = save(linear_classifier([0.0] * 3, [0.0] * 3), tmp_path / "bad.onnx", meta)
    with pytest.raises(UserError, match=message) as caught:
        FrameClassifier(path)
    assert "bad.onnx" in str(caught.value)


def test_a_model_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    two_outputs = save(linear_classifier([0.0] * 2, [0.0] * 2), tmp_path / "two.onnx", metadata())
    with pytest.raises(UserError, match="2 outputs per frame but 3 class names"):
        FrameClassifier(two_outputs)
    rgb = save(linear_classifier([0.0] * 3, [0.0] * 3, channels=3), tmp_path / "rgb.onnx", metadata())
    with pytest.raises(UserError, match=r"\[N, 1, S, S\]"):
        FrameClassifier(rgb)
    not_onnx = tmp_path / "x.onnx"
    not_onnx.write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"x\.onnx"):
        FrameClassifier(not_onnx)
