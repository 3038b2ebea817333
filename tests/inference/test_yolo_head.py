"""The raw Ultralytics YOLO head: detected by its shape, decoded, thresholded, suppressed per tile."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from onnx_builders import tiles_of_means, yolo_model

from services.errors import UserError
from services.inference.detector import OnnxDetector
from services.inference.yolo import ultralytics_class_names

ULTRALYTICS_NAMES = "{0: 'car', 1: 'truck', 2: 'ship'}"


def by_label_then_x(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> list[tuple]:
    rows = [
        (int(lab), *np.round(b, 3).tolist(), round(float(s), 4))
        for b, s, lab in zip(boxes, scores, labels, strict=True)
    ]
    return sorted(rows)


def expected(mean: float) -> list[tuple]:
    rows = [
        (0, 6.0, 6.0, 14.0, 14.0, 0.9),  # anchor 0; anchor 1 (same class, IoU 0.78) is suppressed
        (1, 6.0, 6.0, 14.0, 14.0, 0.7),  # anchor 2: same box, other class
        (2, 25.0, 3.0, 32.0, 7.0, 0.6),  # anchor 4: clipped to the tile
    ]
    if mean >= 0.25:
        rows.append((0, 14.0, 21.0, 18.0, 27.0, round(mean, 4)))  # anchor 5 scores the tile's mean
    return sorted(rows)


def test_yolo_head_is_decoded_per_tile(make_model: Callable[..., Path]) -> None:
    det = OnnxDetector(
        make_model(yolo_model(), "yolo", {"names": ULTRALYTICS_NAMES}), providers="cpu", batch_size=2
    )
    assert det.is_yolo and det.class_names == ["car", "truck", "ship"]
    means = [0.8, 0.1, 0.5]  # two batches of 2, the second padded
    out = det.detect(tiles_of_means(means))
    assert len(out) == 3
    for d, mean in zip(out, means, strict=True):
        got = by_label_then_x(d.boxes, d.scores, d.labels)
        assert [r[:5] for r in got] == [r[:5] for r in expected(mean)]
        np.testing.assert_allclose([r[5] for r in got], [r[5] for r in expected(mean)], atol=1e-3)


def test_score_and_iou_thresholds_apply(make_model: Callable[..., Path]) -> None:
    path = make_model(yolo_model(), "yolo")
    (strict,) = OnnxDetector(path, providers="cpu", score_threshold=0.75).detect(tiles_of_means([0.5]))
    assert by_label_then_x(strict.boxes, strict.scores, strict.labels)[0][:5] == (0, 6.0, 6.0, 14.0, 14.0)
    assert len(strict) == 1
    # An IoU threshold above 0.78 keeps anchor 1 beside anchor 0.
    (loose,) = OnnxDetector(path, providers="cpu", yolo_iou_threshold=0.8).detect(tiles_of_means([0.5]))
    assert len(loose) == len(expected(0.5)) + 1


def test_class_names_fall_back_and_are_checked(make_model: Callable[..., Path]) -> None:
    assert OnnxDetector(make_model(yolo_model(), "plain"), providers="cpu").class_names == [
        "class_0",
        "class_1",
        "class_2",
    ]
    ours = make_model(
        yolo_model(), "ours", {"tessera.class_names": json.dumps(["a", "b", "c"]), "names": "{0: 'x'}"}
    )
    assert OnnxDetector(ours, providers="cpu").class_names == ["a", "b", "c"]
    wrong = make_model(yolo_model(), "wrong", {"tessera.class_names": json.dumps(["a", "b"])})
    with pytest.raises(UserError, match=r"has 3 classes but metadata tessera\.class_names names 2"):
        OnnxDetector(wrong, providers="cpu")


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("{0: 'car', 1: 'truck'}", ["car", "truck"]),
        ('{"1": "truck", "0": "car"}', ["car", "truck"]),
        ('["car", "truck", "extra"]', ["car", "truck"]),
        ("not a dict", None),
    ],
)
def test_ultralytics_names_metadata(text: str, names: list[str] | None) -> None:
    assert ultralytics_class_names({"names": text}, 2) == names
