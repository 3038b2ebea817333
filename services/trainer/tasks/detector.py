"""The detector task: the demo CenterNet detector (``detector_net``) trained by the loop, exported to the
tessera detector contract (``export``).

Its dataset is the word ``synthetic`` (fresh scenes every step, :mod:`services.trainer.detector_data`) or a
directory of labelled scenes::

    DIR/classes.json        ["ship", "plane"]          label i is classes[i]
    DIR/<scene>.png         an RGB image, at least ``crop`` pixels on each side
    DIR/<scene>.json        {"boxes": [[x1, y1, x2, y2], ...], "labels": ["ship", ...]}   (names or indices)

Every step trains on ``batch_size`` crops of ``crop`` pixels (random offsets; objects cut by the crop keep
their visible part when at least 35 % of them shows). The learning rate warms up, then follows a cosine
over ``schedule_steps`` (``detector_data.lr_factor``), computed from the step, so a resumed job follows it
exactly. ``tessera train detector --dataset synthetic --size full --steps 500`` makes the shipped demo
detector (services/models/README.md).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageDraw

from services.errors import UserError
from services.scenes.scoring import Score, score_detections
from services.scenes.synthetic import DEFAULT_CLASSES
from services.trainer.detector_data import TrainSettings, held_out_scenes, lr_factor, training_batches
from services.trainer.detector_net import (
    CenterNetDetector,
    Targets,
    detection_loss,
    encode_targets,
)
from services.trainer.export import export_detector, export_mismatch
from services.trainer.storage import SYNTHETIC
from services.trainer.task import ExportCheck, TrainState

#: Hyper-parameters and their defaults (the shipped demo detector's settings).
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "batch_size": 16,
    "crop": 256,
    "steps_per_epoch": 100,
    "learning_rate": 3e-3,
    "weight_decay": 1e-4,
    "warmup_steps": 60,
    "schedule_steps": 500,
    "width": 32,
    "density": [40.0, 180.0],
    "classes": list(DEFAULT_CLASSES),
    "tile": 512,
    "eval_scenes": 8,
    "score_threshold": 0.3,
    "grad_clip": 10.0,
    #: The exported model's ``tessera.name`` (the shipped one: tessera-demo-detector).
    "name": "detector",
}
_MIN_VISIBLE = 0.35
_MIN_SIDE = 4


@dataclass(frozen=True)
class Scene:
    """One labelled scene: pixels uint8 [3, H, W], boxes float32 [N, 4], labels int64 [N]."""

    name: str
    pixels: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class DetectorData:
    """What ``load`` opened: generated scenes (``scenes`` is None) or labelled ones."""

    classes: tuple[str, ...]
    scenes: tuple[Scene, ...] | None = None


Batch = tuple[torch.Tensor, list[np.ndarray], list[np.ndarray]]


class DetectorTask:
    """The demo detector as a training task."""

    name: ClassVar[str] = "detector"

    def __init__(self) -> None:
        self._classes: tuple[str, ...] | None = None

    def params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults merged with ``given``; unknown names and bad values raise one UserError."""
        problems = [
            f"$.params.{key}: unknown hyper-parameter of the detector; they are {', '.join(DEFAULTS)}"
            for key in given
            if key not in DEFAULTS
        ]
        merged = {**DEFAULTS, **{k: v for k, v in given.items() if k in DEFAULTS}}

        def whole(key: str, least: int, multiple: int = 1) -> None:
            value = merged[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < least or value % multiple:
                extra = f", a multiple of {multiple}" if multiple > 1 else ""
                problems.append(f"$.params.{key}: must be a whole number >= {least}{extra}, got {value!r}")

        def number(key: str, low: float, high: float) -> None:
            value = merged[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                problems.append(f"$.params.{key}: must be a number {low:g}..{high:g}, got {value!r}")

        whole("seed", 0)
        whole("batch_size", 1)
        whole("crop", 16, 16)
        whole("steps_per_epoch", 1)
        whole("warmup_steps", 1)
        whole("schedule_steps", 1)
        whole("width", 4, 2)
        whole("tile", 16, 16)
        whole("eval_scenes", 1)
        number("learning_rate", 1e-8, 10.0)
        number("weight_decay", 0.0, 1.0)
        number("score_threshold", 0.0, 1.0)
        number("grad_clip", 1e-6, 1e6)
        name = merged["name"]
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
            problems.append(f"$.params.name: 1-128 letters, digits, '.', '_' or '-', got {name!r}")
        density = merged["density"]
        if (
            not isinstance(density, list | tuple)
            or len(density) != 2
            or not all(isinstance(d, int | float) and not isinstance(d, bool) and d > 0 for d in density)
            or density[0] > density[1]
        ):
            problems.append(f"$.params.density: must be [low, high] objects per megapixel, got {density!r}")
        classes = merged["classes"]
        if (
            not isinstance(classes, list | tuple)
            or not classes
            or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)
        ):
            problems.append(f"$.params.classes: must be a list of distinct class names, got {classes!r}")
        if problems:
            raise UserError("bad hyper-parameters for the detector:\n  " + "\n  ".join(problems))
        merged["density"] = [float(d) for d in density]
        merged["classes"] = list(classes)
        return merged

    def load(self, dataset: Path, params: Mapping[str, Any]) -> DetectorData:
        """``synthetic``, or a directory of scenes (see the module docstring); UserError if unusable."""
        if str(dataset) == SYNTHETIC:
            classes = tuple(params["classes"])
            unknown = sorted(set(classes) - set(DEFAULT_CLASSES))
            if unknown:
                raise UserError(
                    f"$.params.classes: synthetic scenes draw only {', '.join(DEFAULT_CLASSES)}; "
                    f"not {', '.join(unknown)}"
                )
            self._classes = classes
            return DetectorData(classes=classes)
        scenes, classes = load_scenes(dataset, crop=int(params["crop"]))
        if len(scenes) < params["batch_size"]:
            raise UserError(
                f"dataset {dataset} holds {len(scenes)} scenes, fewer than one batch "
                f"(batch_size {params['batch_size']}); add scenes or lower batch_size"
            )
        self._classes = classes
        return DetectorData(classes=classes, scenes=tuple(scenes))

    def build(self, params: Mapping[str, Any], device: torch.device) -> TrainState:
        """A fresh detector (weights from ``seed``) and its AdamW optimiser."""
        classes = self._classes or tuple(params["classes"])
        torch.manual_seed(int(params["seed"]))
        model = CenterNetDetector(len(classes), width=int(params["width"])).to(device)
        model.train()
        optimiser = torch.optim.AdamW(
            model.parameters(), lr=float(params["learning_rate"]), weight_decay=float(params["weight_decay"])
        )
        schedule = {k: params[k] for k in ("learning_rate", "warmup_steps", "schedule_steps", "grad_clip")}
        return TrainState(
            models={"detector": model}, optimizers={"detector": optimiser}, extra={"schedule": schedule}
        )

    def batches(
        self, data: DetectorData, params: Mapping[str, Any], epoch: int, device: torch.device
    ) -> Iterator[Batch]:
        """``steps_per_epoch`` batches of generated crops, or one pass over the scenes in a seeded order."""
        if data.scenes is None:
            settings = _settings(params, data.classes)
            steps = int(params["steps_per_epoch"])
            for images, boxes, labels in islice(training_batches(settings, start=epoch * steps), steps):
                yield torch.from_numpy(images).to(device), boxes, labels
            return
        rng = np.random.default_rng([int(params["seed"]), epoch])
        order = rng.permutation(len(data.scenes))
        size, crop = int(params["batch_size"]), int(params["crop"])
        for start in range(0, len(order) - size + 1, size):
            images = np.empty((size, 3, crop, crop), np.float32)
            boxes, labels = [], []
            for i, index in enumerate(order[start : start + size]):
                scene = data.scenes[int(index)]
                height, width = scene.pixels.shape[1:]
                x = int(rng.integers(0, width - crop + 1))
                y = int(rng.integers(0, height - crop + 1))
                images[i] = scene.pixels[:, y : y + crop, x : x + crop] * np.float32(1 / 255)
                kept_boxes, kept_labels = crop_boxes(scene.boxes, scene.labels, x, y, crop)
                boxes.append(kept_boxes)
                labels.append(kept_labels)
            yield torch.from_numpy(images).to(device), boxes, labels

    def train_step(self, state: TrainState, batch: Batch) -> dict[str, float]:
        """One AdamW step on the CenterNet loss; the learning rate follows the step."""
        model = state.models["detector"]
        optimiser = state.optimizers["detector"]
        params = state.extra.get("schedule", {})
        assert isinstance(model, CenterNetDetector)
        images, boxes, labels = batch
        factor = lr_factor(
            state.step,
            TrainSettings(
                steps=int(params.get("schedule_steps", 500)), warmup_steps=int(params.get("warmup_steps", 60))
            ),
        )
        for group in optimiser.param_groups:
            group["lr"] = float(params.get("learning_rate", 3e-3)) * factor
        model.train()
        targets = encode_targets(boxes, labels, model.num_classes, images.shape[-2], images.shape[-1])
        targets = Targets(
            heat=targets.heat.to(images.device),
            cell_index=targets.cell_index.to(images.device),
            offset=targets.offset.to(images.device),
            log_size=targets.log_size.to(images.device),
        )
        loss = detection_loss(model.heads(images), targets)
        optimiser.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(params.get("grad_clip", 10.0)))
        optimiser.step()
        return {
            "loss": float(loss.total.detach()),
            "heat": loss.heat,
            "offset": loss.offset,
            "size": loss.size,
        }

    def evaluate(self, state: TrainState, data: DetectorData, params: Mapping[str, Any]) -> dict[str, float]:
        """Precision and recall (IoU 0.5) on held-out (or the dataset's) scenes at ``score_threshold``, with
        its counts; and at the score thresholds 0.25 and 0.5 as ``precision_at_0.25`` etc. Rates are left out
        where undefined (nothing detected, nothing known)."""
        model = _model(state)
        scenes = _evaluation_scenes(data, params)
        threshold = float(params["score_threshold"])
        thresholds = sorted({0.25, threshold, 0.5})
        totals = dict.fromkeys(thresholds, Score(0, 0, 0))
        device = next(model.parameters()).device
        model.eval()
        with torch.no_grad():
            for pixels, true_boxes, true_labels in scenes:
                images = torch.from_numpy(pixels[None].astype(np.float32) / 255).to(device)
                boxes, scores, labels = (t[0].cpu().numpy() for t in model(images))
                for cut in thresholds:
                    keep = scores >= cut
                    totals[cut] += score_detections(
                        boxes[keep], scores[keep], labels[keep], true_boxes, true_labels
                    )
        total = totals[threshold]
        others = {
            f"{name}_at_{cut:g}": value
            for cut in thresholds
            if cut != threshold
            for name, value in totals[cut].rates().items()
        }
        return {
            **total.rates(),  # precision is absent, not 1.0, when nothing was detected
            "true_positives": float(total.true_positives),
            "false_positives": float(total.false_positives),
            "false_negatives": float(total.false_negatives),
            "eval_scenes": float(len(scenes)),
            **others,
        }

    def export(self, state: TrainState, directory: Path, params: Mapping[str, Any]) -> ExportCheck:
        """``detector.onnx`` in the detector contract (tile ``tile`` px); boxes and labels are checked here
        (as sets: top-K may order tied scores differently), the sorted scores by the loop."""
        from services.trainer.loop import ExportMismatchError

        model = copy.deepcopy(_model(state)).cpu().eval()
        tile = int(params["tile"])
        classes = self._classes or tuple(params["classes"])
        path = export_detector(
            model,
            directory / "detector.onnx",
            classes,
            tile=(tile, tile),
            name=str(params["name"]),
            description=f"tessera detector trained by the trainer's detector task ({len(classes)} classes)",
        )
        # Noise, not scenes: flat backgrounds make exactly tied heat peaks, which top-K may order either way.
        images = np.random.default_rng(int(params["seed"])).random((2, 3, tile, tile), dtype=np.float32)
        with torch.no_grad():
            _, scores, _ = model(torch.from_numpy(images))
        # Detections tied with the K-th score may be picked differently by top-K; compare those above it.
        cutoff = max(0.05, float(scores[:, -1].max()) + 1e-3)
        mismatch = export_mismatch(model, path, images, min_score=cutoff)
        if not mismatch < 1e-3:
            raise ExportMismatchError(
                f"ONNX Runtime disagrees with torch on the exported detector (max difference {mismatch})"
            )
        # The detections were compared above, tie-aware; the sorted top-K scores are not compared again
        # (two tied plateau pixels, either of which may be the peak, shift them).
        return ExportCheck(path=path, inputs={"images": images}, expected={}, measured=mismatch)

    def pictures(self, state: TrainState, directory: Path, params: Mapping[str, Any]) -> list[Path]:
        """The detections on one evaluation scene (green: detections over ``score_threshold``)."""
        model = _model(state)
        pixels, _, _ = held_out_scenes(1, int(params["tile"]), DEFAULT_CLASSES)[0]
        device = next(model.parameters()).device
        model.eval()
        with torch.no_grad():
            boxes, scores, _ = (
                t[0].cpu().numpy()
                for t in model(torch.from_numpy(pixels[None].astype(np.float32) / 255).to(device))
            )
        image = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))
        draw = ImageDraw.Draw(image)
        for box in boxes[scores >= float(params["score_threshold"])]:
            draw.rectangle(tuple(float(v) for v in box), outline=(40, 220, 60), width=2)
        path = directory / "detections.png"
        image.save(path)
        return [path]


TASK = DetectorTask


def _model(state: TrainState) -> CenterNetDetector:
    model = state.models["detector"]
    assert isinstance(model, CenterNetDetector)
    return model


def _settings(params: Mapping[str, Any], classes: Sequence[str]) -> TrainSettings:
    low, high = params["density"]
    return replace(
        TrainSettings(),
        batch_size=int(params["batch_size"]),
        crop=int(params["crop"]),
        seed=int(params["seed"]),
        density_range=(float(low), float(high)),
        classes=tuple(classes),
    )


def _fit(pixels: np.ndarray, size: int) -> np.ndarray:
    """``pixels`` [3, H, W] cut or zero-padded to [3, size, size]."""
    out = np.zeros((3, size, size), pixels.dtype)
    height, width = min(size, pixels.shape[1]), min(size, pixels.shape[2])
    out[:, :height, :width] = pixels[:, :height, :width]
    return out


def _evaluation_scenes(
    data: DetectorData, params: Mapping[str, Any]
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    count = int(params["eval_scenes"])
    if data.scenes is None:
        return held_out_scenes(count, int(params["tile"]), data.classes)
    out = []
    for scene in data.scenes[:count]:
        # The network needs sides that are multiples of its stride 16; keep the top-left part.
        height = scene.pixels.shape[1] // 16 * 16
        width = scene.pixels.shape[2] // 16 * 16
        boxes, labels = crop_boxes(scene.boxes, scene.labels, 0, 0, max(height, width))
        inside = (boxes[:, 2] <= width) & (boxes[:, 3] <= height)
        out.append((scene.pixels[:, :height, :width], boxes[inside], labels[inside]))
    return out


def crop_boxes(
    boxes: np.ndarray, labels: np.ndarray, x: int, y: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes seen through the crop (x, y, size, size), in crop pixels: clipped; kept when at least 35 % of
    the object and 4 px each way show (as the synthetic crops do)."""
    if not len(boxes):
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    shifted = boxes - np.array([x, y, x, y], np.float32)
    clipped = np.clip(shifted, 0, size)
    area = np.prod(shifted[:, 2:] - shifted[:, :2], axis=1)
    visible = np.prod(clipped[:, 2:] - clipped[:, :2], axis=1) / np.maximum(area, 1e-9)
    keep = (visible >= _MIN_VISIBLE) & np.all(clipped[:, 2:] - clipped[:, :2] >= _MIN_SIDE, axis=1)
    return clipped[keep].astype(np.float32), labels[keep].astype(np.int64)


def load_scenes(directory: Path, *, crop: int) -> tuple[list[Scene], tuple[str, ...]]:
    """The labelled scenes of a directory and its class names; UserError naming what is wrong."""
    layout = (
        "expected classes.json (a list of class names) and scenes as NAME.png with NAME.json "
        '({"boxes": [[x1, y1, x2, y2], ...], "labels": [...]})'
    )
    if not directory.is_dir():
        raise UserError(f"dataset {directory} is not a directory; {layout}")
    classes_file = directory / "classes.json"
    if not classes_file.is_file():
        raise UserError(f"dataset {directory} has no classes.json; {layout}")
    try:
        classes = json.loads(classes_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{classes_file} is not JSON: {exc}") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{classes_file} must hold a non-empty list of class names")
    images = sorted(directory.glob("*.png"))
    if not images:
        raise UserError(f"dataset {directory} holds no scenes (*.png); {layout}")
    scenes = []
    for image_path in images:
        label_path = image_path.with_suffix(".json")
        if not label_path.is_file():
            raise UserError(f"scene {image_path.name} has no {label_path.name} beside it; {layout}")
        try:
            labels_json = json.loads(label_path.read_text(encoding="utf-8"))
            raw_boxes = np.asarray(labels_json["boxes"], np.float32).reshape(-1, 4)
            raw_labels = list(labels_json["labels"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"{label_path} is not {{'boxes': [[x1, y1, x2, y2], ...], 'labels': [...]}}: {exc}"
            ) from None
        if len(raw_labels) != len(raw_boxes):
            raise UserError(f"{label_path}: {len(raw_boxes)} boxes but {len(raw_labels)} labels")
        indices = []
        for label in raw_labels:
            if isinstance(label, str) and label in classes:
                indices.append(classes.index(label))
            elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(classes):
                indices.append(label)
            else:
                raise UserError(f"{label_path}: label {label!r} is not one of classes.json {classes}")
        with Image.open(image_path) as opened:
            pixels = np.asarray(opened.convert("RGB")).transpose(2, 0, 1).copy()
        if pixels.shape[1] < crop or pixels.shape[2] < crop:
            raise UserError(
                f"scene {image_path.name} is {pixels.shape[2]} x {pixels.shape[1]} px, smaller than the crop "
                f"({crop} px); lower the crop hyper-parameter or use larger scenes"
            )
        scenes.append(Scene(image_path.stem, pixels, raw_boxes, np.asarray(indices, np.int64)))
    return scenes, tuple(classes)
