"""The detector's synthetic data: training crops cut from scenes made on the fly, the held-out scenes no
training batch ever draws, the learning-rate schedule, and the held-out scoring of an exported ONNX file.

The detector task (:mod:`services.trainer.tasks.detector`) trains on these through the generic loop;
``tessera train detector --dataset synthetic --size full`` is how the shipped demo detector is made.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.scenes.scoring import Score, score_detections
from services.scenes.synthetic import DEFAULT_CLASSES, generate_scene, layout_scene, render_window

#: Held-out scenes use seeds from here on; training scenes never reach them.
HELD_OUT_SEED = 1_000_000_000
_EDGE = 32  # training crops are cut from scenes this much larger on each side, so some objects are cut


@dataclass(frozen=True)
class TrainSettings:
    """The synthetic-scene recipe: crops, density, classes and the schedule's length (the detector task
    fills it from its parameters)."""

    steps: int = 500
    batch_size: int = 16
    crop: int = 256
    seed: int = 0
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 60
    width: int = 32
    density_range: tuple[float, float] = (40.0, 180.0)
    classes: tuple[str, ...] = DEFAULT_CLASSES
    tile: int = 512  # the exported model's (square) input size; held-out scenes are this size
    eval_scenes: int = 32
    score_threshold: float = 0.3


def training_batches(
    settings: TrainSettings, start: int = 0
) -> Iterator[tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]]:
    """Endless batches (images float32 [B, 3, crop, crop] x/255, boxes, labels) of fresh scenes, by step.

    Each crop is cut at a random offset from a scene 2 x 32 px larger, so objects on the crop edge appear cut,
    with their boxes clipped to what is visible (kept when at least 35 % of the object shows).
    """
    size = settings.crop + 2 * _EDGE
    step = start
    while True:
        rng = np.random.default_rng([settings.seed, step])
        images = np.empty((settings.batch_size, 3, settings.crop, settings.crop), np.float32)
        boxes, labels = [], []
        for i in range(settings.batch_size):
            density = float(rng.uniform(*settings.density_range))
            layout = layout_scene(
                size,
                size,
                seed=int(rng.integers(0, HELD_OUT_SEED)),
                classes=settings.classes,
                density=density,
            )
            x, y = (int(v) for v in rng.integers(0, 2 * _EDGE + 1, 2))
            pixels = render_window(layout, x, y, settings.crop, settings.crop).astype(np.float32)
            # Brightness/contrast jitter: the model should not key on exact colours.
            gain, bias = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
            images[i] = np.clip(pixels * gain + bias, 0, 255) * (1 / 255)
            b = layout.boxes - np.array([x, y, x, y], np.float32)
            clipped = np.clip(b, 0, settings.crop)
            visible = np.prod(clipped[:, 2:] - clipped[:, :2], axis=1) / np.prod(b[:, 2:] - b[:, :2], axis=1)
            keep = (visible >= 0.35) & np.all(clipped[:, 2:] - clipped[:, :2] >= 4, axis=1)
            boxes.append(clipped[keep])
            labels.append(layout.labels[keep])
        yield images, boxes, labels
        step += 1


def lr_factor(step: int, settings: TrainSettings) -> float:
    """The learning-rate multiplier at ``step``: a linear warm-up, then a cosine down to 2 %."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(settings.steps - settings.warmup_steps, 1)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def held_out_scenes(
    count: int, size: int, classes: Sequence[str] = DEFAULT_CLASSES
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The held-out evaluation scenes (seeds no training batch draws): (pixels, boxes, labels) each."""
    return [generate_scene(size, size, seed=HELD_OUT_SEED + i, classes=classes) for i in range(count)]


def evaluate_onnx(
    path: str | Path,
    scenes: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    score_threshold: float = 0.3,
    iou_threshold: float = 0.5,
    batch_size: int = 8,
) -> Score:
    """Run an ONNX detector (the contract's outputs) on scenes; sum precision/recall counts over them."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    total = Score(0, 0, 0)
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        images = np.stack([pixels for pixels, _, _ in chunk]).astype(np.float32) * (1 / 255)
        boxes, scores, labels = session.run(["boxes", "scores", "labels"], {"images": images})
        for i, (_, true_boxes, true_labels) in enumerate(chunk):
            keep = scores[i] >= score_threshold
            total += score_detections(
                boxes[i][keep],
                scores[i][keep],
                labels[i][keep],
                true_boxes,
                true_labels,
                iou_threshold=iou_threshold,
            )
    return total
