"""Train the demo detector on synthetic scenes made on the fly, export it, and score it on held-out scenes.

``retrain`` is the one call behind ``python -m services.trainer detector``: train (CPU, all cores, a rich
progress bar), export ONNX in the detector contract, check ONNX Runtime against torch, score the ONNX file on
held-out scenes, and write the loss curve (PNG) and the metrics (JSON) next to the model.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from services.scenes.scoring import Score, score_detections
from services.scenes.synthetic import DEFAULT_CLASSES, generate_scene, layout_scene, render_window
from services.trainer.curves import draw_curves
from services.trainer.detector_net import CenterNetDetector, detection_loss, encode_targets, parameter_count
from services.trainer.export import export_detector, export_mismatch

#: Held-out scenes use seeds from here on; training scenes never reach them.
HELD_OUT_SEED = 1_000_000_000
_EDGE = 32  # training crops are cut from scenes this much larger on each side, so some objects are cut


@dataclass(frozen=True)
class TrainSettings:
    """Every knob of a training run; the defaults make the shipped demo detector."""

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
    threads: int = 0  # 0: every core
    tile: int = 512  # the exported model's (square) input size; held-out scenes are this size
    eval_scenes: int = 32
    score_threshold: float = 0.3


@dataclass
class TrainedDetector:
    """A trained model and what its training saw."""

    model: CenterNetDetector
    settings: TrainSettings
    losses: list[float] = field(default_factory=list)
    loss_parts: list[tuple[float, float, float]] = field(default_factory=list)
    seconds: float = 0.0


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


def train_detector(settings: TrainSettings, *, console: Console | None = None) -> TrainedDetector:
    """Train a fresh detector for ``settings.steps`` steps (AdamW, warm-up then cosine decay), CPU."""
    console = console or Console()
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    model = CenterNetDetector(len(settings.classes), width=settings.width)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: _lr_factor(step, settings))
    result = TrainedDetector(model, settings)
    console.print(
        f"training the demo detector: {parameter_count(model):,} parameters, {settings.steps} steps of "
        f"{settings.batch_size} x {settings.crop}x{settings.crop} px, seed {settings.seed}, "
        f"{torch.get_num_threads()} threads"
    )
    started = time.perf_counter()
    model.train()
    columns = (
        TextColumn("[bold]detector"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    batches = training_batches(settings)
    # One thread paints the next batch while torch trains on this one (NumPy releases the GIL).
    with ThreadPoolExecutor(1) as painter, Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=settings.steps, loss=float("nan"))
        upcoming = painter.submit(next, batches)
        for step in range(settings.steps):
            images, boxes, labels = upcoming.result()
            if step + 1 < settings.steps:
                upcoming = painter.submit(next, batches)
            targets = encode_targets(boxes, labels, len(settings.classes), settings.crop, settings.crop)
            loss = detection_loss(model.heads(torch.from_numpy(images)), targets)
            optimiser.zero_grad(set_to_none=True)
            loss.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimiser.step()
            schedule.step()
            result.losses.append(float(loss.total.detach()))
            result.loss_parts.append((loss.heat, loss.offset, loss.size))
            smoothed = float(np.mean(result.losses[-20:]))
            progress.update(task, advance=1, loss=smoothed)
            if (step + 1) % max(settings.steps // 10, 1) == 0:
                progress.console.print(
                    f"step {step + 1:5d}  loss {smoothed:.3f}  (heat {loss.heat:.3f}, "
                    f"offset {loss.offset:.3f}, "
                    f"size {loss.size:.3f})  lr {schedule.get_last_lr()[0]:.2e}"
                )
    result.seconds = time.perf_counter() - started
    model.eval()
    return result


def _lr_factor(step: int, settings: TrainSettings) -> float:
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


@dataclass(frozen=True)
class DetectorReport:
    """What ``retrain`` wrote and measured."""

    model_path: Path
    curve_path: Path
    metrics_path: Path
    metrics: dict[str, object]


def retrain(
    out: str | Path, settings: TrainSettings | None = None, *, console: Console | None = None
) -> DetectorReport:
    """Train, export ``out`` (ONNX), check it against torch, score it on held-out scenes, write PNG + JSON."""
    settings = settings or TrainSettings()
    console = console or Console()
    out = Path(out)
    trained = train_detector(settings, console=console)
    export_detector(
        trained.model,
        out,
        settings.classes,
        tile=(settings.tile, settings.tile),
        description=_description(settings),
    )
    check_images = (
        np.stack([p for p, _, _ in held_out_scenes(2, settings.tile, settings.classes)]).astype(np.float32)
        / 255
    )
    mismatch = export_mismatch(trained.model, out, check_images)
    if not mismatch < 1e-3:
        raise RuntimeError(
            f"ONNX Runtime disagrees with torch on the exported model (max difference {mismatch})"
        )

    scenes = held_out_scenes(settings.eval_scenes, settings.tile, settings.classes)
    metrics: dict[str, object] = {
        "model": out.name,
        "bytes": out.stat().st_size,
        "parameters": parameter_count(trained.model),
        "classes": list(settings.classes),
        "train_seconds": round(trained.seconds, 1),
        "final_loss": round(float(np.mean(trained.losses[-50:])), 4),
        "onnx_vs_torch_max_abs_diff": mismatch,
        "held_out": {"scenes": len(scenes), "size": settings.tile, "first_seed": HELD_OUT_SEED, "iou": 0.5},
        "settings": asdict(settings),
    }
    for threshold in sorted({0.25, settings.score_threshold, 0.5}):
        score = evaluate_onnx(out, scenes, score_threshold=threshold)
        metrics[f"score_threshold_{threshold:g}"] = {
            "precision": round(score.precision, 4),
            "recall": round(score.recall, 4),
            "true_positives": score.true_positives,
            "false_positives": score.false_positives,
            "false_negatives": score.false_negatives,
        }
    curve_path = out.with_suffix(".loss.png")
    metrics_path = out.with_suffix(".metrics.json")
    draw_loss_curve(trained, curve_path)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    at = metrics[f"score_threshold_{settings.score_threshold:g}"]
    console.print(
        f"wrote {out} ({metrics['bytes']:,} bytes) in {trained.seconds:.0f} s of training; held-out "
        f"precision/recall at score {settings.score_threshold:g}: {at}"
    )
    return DetectorReport(out, curve_path, metrics_path, metrics)


def _description(settings: TrainSettings) -> str:
    return (
        "tessera demo detector: CenterNet-style, stride 4, trained on synthetic scenes "
        "(services.scenes) with "
        f"`python -m services.trainer detector --steps {settings.steps} --seed {settings.seed}`"
    )


def draw_loss_curve(trained: TrainedDetector, path: str | Path, size: tuple[int, int] = (900, 500)) -> Path:
    """A PNG of the training losses (log scale; total and its parts, smoothed over 20 steps)."""
    parts = np.array(trained.loss_parts, np.float64).reshape(-1, 3)
    history = [
        {"total": float(total), "heat": float(heat), "offset": float(offset), "size": float(size_loss)}
        for total, (heat, offset, size_loss) in zip(trained.losses, parts, strict=True)
    ]
    return draw_curves(history, path, title="demo detector training loss", size=size)
