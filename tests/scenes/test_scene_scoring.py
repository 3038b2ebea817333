"""Precision/recall matching: greedy by score, class-aware, same answer as a brute-force matcher."""

from __future__ import annotations

import numpy as np

from services.scenes.scoring import Score, score_detections
from services.scenes.synthetic import layout_scene

TRUE = np.array([[10, 10, 30, 30], [100, 100, 140, 120], [200, 50, 216, 66]], np.float32)
TRUE_LABELS = np.array([0, 1, 2], np.int32)


def brute_force(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, true_boxes: np.ndarray, true_labels: np.ndarray
) -> int:
    """Matches by the textbook loop over the full IoU matrix."""
    matched = 0
    taken = np.zeros(len(true_boxes), bool)
    for i in np.argsort(-scores, kind="stable"):
        best, best_iou = -1, 0.5
        for j, t in enumerate(true_boxes):
            if taken[j] or labels[i] != true_labels[j]:
                continue
            w = max(0.0, min(boxes[i, 2], t[2]) - max(boxes[i, 0], t[0]))
            h = max(0.0, min(boxes[i, 3], t[3]) - max(boxes[i, 1], t[1]))
            inter = w * h
            union = (
                (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
                + (t[2] - t[0]) * (t[3] - t[1])
                - inter
            )
            if inter / union >= best_iou:
                best, best_iou = j, inter / union
        if best >= 0:
            taken[best] = True
            matched += 1
    return matched


def test_perfect_detections() -> None:
    score = score_detections(TRUE, np.ones(3), TRUE_LABELS, TRUE, TRUE_LABELS)
    assert score == Score(3, 0, 0) and score.precision == score.recall == 1.0


def test_shifted_duplicate_and_wrong_class_detections() -> None:
    boxes = np.array(
        [
            [12, 11, 31, 30],  # good match for object 0
            [10, 10, 30, 30],  # duplicate of object 0: a false positive
            [120, 100, 160, 120],  # object 1 shifted by half its width: IoU 1/3
            [200, 50, 216, 66],  # object 2 exactly, but called class 0
        ],
        np.float32,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([0, 0, 1, 0])
    score = score_detections(boxes, scores, labels, TRUE, TRUE_LABELS)
    assert score == Score(1, 3, 2)
    assert score.precision == 0.25 and abs(score.recall - 1 / 3) < 1e-12
    assert score_detections(boxes, scores, labels, TRUE, TRUE_LABELS, class_aware=False) == Score(2, 2, 1)
    assert score_detections(boxes, scores, labels, TRUE, TRUE_LABELS, iou_threshold=0.3) == Score(2, 2, 1)


def test_empty_sides() -> None:
    none = np.zeros((0, 4), np.float32)
    assert score_detections(none, np.zeros(0), np.zeros(0), TRUE, TRUE_LABELS) == Score(0, 0, 3)
    assert score_detections(TRUE, np.ones(3), TRUE_LABELS, none, np.zeros(0)) == Score(0, 3, 0)
    empty = score_detections(none, np.zeros(0), np.zeros(0), none, np.zeros(0))
    assert empty.precision == empty.recall == 1.0


def test_agrees_with_brute_force_on_a_scene() -> None:
    layout = layout_scene(1500, 1200, seed=2, density=150)
    rng = np.random.default_rng(0)
    true_boxes, true_labels = layout.boxes, layout.labels
    jitter = true_boxes + rng.normal(0, 3.0, true_boxes.shape).astype(np.float32)
    corner = rng.uniform(0, 1450, (150, 2))
    noise = np.concatenate([corner, corner + rng.uniform(8, 50, (150, 2))], axis=1).astype(np.float32)
    huge = np.array([[0, 0, 1500, 1200]], np.float32)
    boxes = np.concatenate([jitter, jitter[:40] + 2, noise, huge])
    labels = np.concatenate([true_labels, true_labels[:40], rng.integers(0, 3, 150), [0]])
    scores = rng.random(len(boxes))
    score = score_detections(boxes, scores, labels, true_boxes, true_labels)
    expected = brute_force(boxes, scores, labels, true_boxes, true_labels)
    assert 0 < expected < len(true_boxes)
    assert score == Score(expected, len(boxes) - expected, len(true_boxes) - expected)


def test_rates_are_reported_only_where_defined() -> None:
    assert Score(0, 0, 0).rates() == {}  # nothing detected, nothing known: no 1.0 of nothing
    assert Score(0, 0, 3).rates() == {"recall": 0.0}
    assert Score(5367, 2, 0).rates() == {"precision": 0.9996, "recall": 1.0}
