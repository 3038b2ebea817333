"""The classifier task: a VGG16-style network (``nets.vgg``) sorting telescope frames into classes.

Dataset layout: one subfolder per class, its name the class name; frames inside (searched recursively) are
FITS (.fits, .fit, .fts, .fits.gz, tile-compressed .fz: the first image HDU with data, 2-D after dropping
size-1 axes) or PNG (colour averaged to grey)::

    DATASET/
      star_field/  a.fits  b.fit  c.png ...
      cloudy/      d.fits ...

Or the word ``synthetic``: ``synthetic_per_class`` generated frames (:mod:`services.frames.synthetic`) of
``synthetic_side`` x ``synthetic_side`` pixels for each of the classes good, mirror_wobble and
shutter_fault (or the subset named by ``classes``), drawn from ``seed``, written as 16-bit FITS files like a
CCD's to a temporary folder and read back through the same path as real frames. With the defaults (24 x 3
frames of 512 px, binned 2x2 to 256 and cropped to 224) they are made and prepared in a few seconds; the
network's cost is then ``width``'s: on 2 CPU cores a step of 32 frames takes about 30 s at width 1 and 2 s
at width 0.125 (``--param width=0.125`` for a quick look). Those 512 px frames are a quick look, not a
stand-in for real ones: binned by 2, their stars are 4.5 times wider in the network's pixels than on a
2048 px IO:O frame binned by 9. A model meant for real frames trains on ``synthetic_side=2048`` (the same
binning as in service; about 0.75 s a frame to make and prepare).

Class names are the subfolder names in sorted order (class index = position); folders whose names start
with "." are ignored; at least two classes are needed, and every class folder must hold a frame. Every
frame is prepared by :meth:`services.frames.PreprocessSpec.prepare_views`, the function the classifier
service runs on incoming frames, with the hyper-parameters ``bin_factor`` (boxcar median; 0, the default,
picks per frame the largest factor that keeps the binned frame at least ``input_size`` on its shorter side:
9 for 2x2-binned IO:O frames of 2048 px, 2 for the synthetic 512 px ones), ``stretch`` (asinh, linear or
zscale), ``input_size`` (centre crop or zero-pad) and ``stamps`` (0: the whole-frame view alone; n > 0: a
second view, an n x n grid of unbinned stamps of the brightest stars, which keeps their shape: what a
mirror wobble changes), once, in ``load`` (kept in memory as float32: 4 * views * input_size^2 bytes
each). ``val_fraction`` of each class (rounded; always leaving one for training) is held out, chosen
by ``seed``, for ``evaluate``; with none held out, ``evaluate`` reports on the training frames
(``held_out_frames`` = 0 says so).

The number of classes is a property of the dataset, while ``build`` sees only the parameters: ``build``
takes the class names from the ``classes`` parameter when given (a sorted list; it must match the folders),
or else from the latest ``load`` on this task object; so a loop calls ``load`` before ``build`` (one task
object per job). The names are kept in ``TrainState.extra["class_names"]`` and exported as ONNX metadata,
with the preprocessing (:meth:`services.frames.PreprocessSpec.to_metadata`) and the verdict rule the
classifier service applies (``tessera.threshold``, the ``threshold`` parameter: a fault is declared when its
probability reaches it; ``tessera.good_class`` when a class is named good), which the service reads back.

Training: cross-entropy, AdamW; with ``augment``, each training frame is turned by one of the 8 flips and
quarter turns of the square (all views alike), drawn from the (seed, epoch) generator: a frame's class does
not depend on its orientation. Export: ``frames [N, views, S, S]`` -> ``logits [N, classes]``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch spelling)

from services.errors import UserError
from services.frames import STRETCHES, PreprocessSpec
from services.frames.preprocess import MAX_STAMPS
from services.frames.synthetic import CLASSES as SYNTHETIC_CLASSES
from services.frames.synthetic import make_dataset
from services.trainer.data.frames import FRAME_SUFFIXES, read_frame
from services.trainer.data.images import decode_all, list_files
from services.trainer.data.seeding import batch_indices, epoch_generator, held_out_split, seeded
from services.trainer.nets.modes import evaluating
from services.trainer.nets.vgg import VggClassifier
from services.trainer.storage import SYNTHETIC
from services.trainer.task import ExportCheck, TrainState
from services.trainer.tasks.hyperparameters import Rule, resolve
from services.trainer.tasks.onnx_export import bare, export_onnx

#: The class of a frame with nothing wrong (the synthetic frames' name for it).
GOOD_CLASS = "good"
RULES: dict[str, Rule] = {
    "input_size": Rule(224, int, 32, 1024, multiple_of=32),
    "bin_factor": Rule(0, int, 0, 64),
    "stretch": Rule("asinh", str, choices=STRETCHES),
    "stamps": Rule(0, int, 0, MAX_STAMPS),
    "augment": Rule(False, bool),
    "width": Rule(1.0, float, 0.0, 4.0, open_low=True),
    "head_width": Rule(256, int, 1, 4096),
    "batch_size": Rule(32, int, 1, 4096),
    "lr": Rule(1e-3, float, 0.0, 1.0, open_low=True),
    "weight_decay": Rule(0.01, float, 0.0, 1.0),
    "val_fraction": Rule(0.2, float, 0.0, 0.9),
    "classes": Rule((), list),
    "seed": Rule(0, int, 0, 2**31 - 1),
    "synthetic_per_class": Rule(24, int, 2, 10_000),
    "synthetic_side": Rule(512, int, 64, 8192),
    "threshold": Rule(0.5, float, 0.0, 1.0, open_low=True),
}
_LAYOUT = "one subfolder per class holding .fits/.fit/.fz/.png frames, or 'synthetic'"
_EXPORT_STREAM = 2
_AUGMENT_STREAM = 3


@dataclass(frozen=True)
class FrameSet:
    """Prepared frames ``[N, views, S, S]`` (float32 in [0, 1]), their class indices, the class names and the
    training/held-out split (index tensors into ``frames``)."""

    frames: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    training: torch.Tensor
    held_out: torch.Tensor
    files: list[Path]


class FrameBatch(NamedTuple):
    """Frames ``[B, views, S, S]`` and their class indices ``[B]``."""

    frames: torch.Tensor
    labels: torch.Tensor


class ClassifierTask:
    """VGG16-style FITS frame classifier."""

    name: ClassVar[str] = "classifier"

    def __init__(self) -> None:
        self._loaded_classes: list[str] | None = None

    def params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults (see ``RULES``) merged with ``given``; ``classes``: optional list of the class names the
        dataset must have, in sorted order (lets ``build`` run before ``load``)."""
        params = resolve(self.name, RULES, given)
        names = params["classes"]
        if names and (
            len(names) < 2 or not all(isinstance(n, str) and n for n in names) or names != sorted(names)
        ):
            raise UserError(
                f"{self.name}: parameter classes must list at least two class names (the dataset's subfolder "
                f"names, sorted), got {names!r}"
            )
        return params

    def load(self, dataset: Path, params: Mapping[str, Any]) -> FrameSet:
        """Read and prepare every frame under ``dataset`` (or generated ones for ``synthetic``); split off
        the held-out frames."""
        if str(dataset) == SYNTHETIC:
            return self._load_synthetic(params)
        return self._load_folder(Path(dataset), params)

    def _load_synthetic(self, params: Mapping[str, Any]) -> FrameSet:
        names = list(params["classes"]) or list(SYNTHETIC_CLASSES)
        unknown = sorted(set(names) - set(SYNTHETIC_CLASSES))
        if unknown:
            raise UserError(
                f"{self.name}: synthetic frames come in classes {', '.join(SYNTHETIC_CLASSES)}; "
                f"parameter classes names {', '.join(unknown)}"
            )
        side = params["synthetic_side"]
        with tempfile.TemporaryDirectory(prefix="tessera-frames-") as folder:
            make_dataset(folder, params["synthetic_per_class"], params["seed"], (side, side), classes=names)
            data = self._load_folder(Path(folder), params)
        # The files are gone with the folder: keep their names, relative to the word that made them.
        files = [Path(SYNTHETIC) / f.relative_to(folder) for f in data.files]
        return FrameSet(data.frames, data.labels, data.class_names, data.training, data.held_out, files)

    def _load_folder(self, folder: Path, params: Mapping[str, Any]) -> FrameSet:
        if not folder.is_dir():
            raise UserError(f"dataset {folder} does not exist or is not a directory; expected {_LAYOUT}")
        class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(class_dirs) < 2:
            raise UserError(f"dataset {folder} has {len(class_dirs)} class folder(s); expected {_LAYOUT}")
        names = [d.name for d in class_dirs]
        if params["classes"] and list(params["classes"]) != names:
            raise UserError(
                f"dataset {folder} has classes {', '.join(names)}; parameter classes says "
                f"{', '.join(params['classes'])}"
            )
        files: list[Path] = []
        labels: list[int] = []
        training: list[int] = []
        held_out: list[int] = []
        for label, class_dir in enumerate(class_dirs):
            found = list_files(class_dir, FRAME_SUFFIXES, f"frames of class {class_dir.name}")
            kept, held = held_out_split(len(found), params["val_fraction"], params["seed"] + label)
            training += [len(files) + i for i in kept]
            held_out += [len(files) + i for i in held]
            files += found
            labels += [label] * len(found)
        frames = decode_all(files, partial(prepared_views, spec=preprocess_spec(params)))
        self._loaded_classes = names
        return FrameSet(
            torch.from_numpy(frames),
            torch.tensor(labels, dtype=torch.int64),
            names,
            torch.tensor(training, dtype=torch.int64),
            torch.tensor(held_out, dtype=torch.int64),
            files,
        )

    def build(self, params: Mapping[str, Any], device: torch.device) -> TrainState:
        """The VGG16-style network for the dataset's classes and its AdamW optimiser."""
        names = list(params["classes"]) or self._loaded_classes
        if names is None:
            raise UserError(f"{self.name}: the classes are unknown; load the dataset first or give classes")
        with seeded(params["seed"]):
            views = preprocess_spec(params).views  # a trunk for each view (nets.vgg)
            model = VggClassifier(len(names), 1, params["width"], params["head_width"], views=views)
        model = model.to(device)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"]
        )
        return TrainState(
            {"classifier": model}, {"classifier": optimizer}, extra={"class_names": list(names)}
        )

    def batches(
        self, data: FrameSet, params: Mapping[str, Any], epoch: int, device: torch.device
    ) -> Iterator[FrameBatch]:
        """The training frames, shuffled by the (seed, epoch) generator (and turned, with ``augment``)."""
        source = epoch_generator(params["seed"], epoch)
        turns = epoch_generator(params["seed"], epoch, _AUGMENT_STREAM)
        for index in batch_indices(len(data.training), params["batch_size"], source):
            chosen = data.training[index]
            frames = data.frames[chosen]
            if params["augment"]:
                frames = dihedral(frames, torch.randint(0, 8, (len(chosen),), generator=turns))
            yield FrameBatch(frames.to(device), data.labels[chosen].to(device))

    def train_step(self, state: TrainState, batch: FrameBatch) -> dict[str, float]:
        """One AdamW step on the cross-entropy; the loss and the batch's accuracy."""
        model, optimizer = state.models["classifier"], state.optimizers["classifier"]
        model.train()
        optimizer.zero_grad(set_to_none=True)
        logits = model(batch.frames)
        loss = F.cross_entropy(logits, batch.labels)
        loss.backward()
        optimizer.step()
        accuracy = (logits.argmax(dim=1) == batch.labels).float().mean()
        return {"loss": loss.item(), "accuracy": accuracy.item()}

    def evaluate(self, state: TrainState, data: FrameSet, params: Mapping[str, Any]) -> dict[str, float]:
        """Accuracy and mean cross-entropy on the held-out frames (on the training frames if none)."""
        model = bare(state.models["classifier"])
        device = next(model.parameters()).device
        chosen = data.held_out if len(data.held_out) else data.training
        correct, loss = 0, 0.0
        with evaluating(model), torch.no_grad():
            for start in range(0, len(chosen), params["batch_size"]):
                index = chosen[start : start + params["batch_size"]]
                logits = model(data.frames[index].to(device))
                labels = data.labels[index].to(device)
                loss += F.cross_entropy(logits, labels, reduction="sum").item()
                correct += int((logits.argmax(dim=1) == labels).sum().item())
        return {
            "accuracy": correct / len(chosen),
            "loss": loss / len(chosen),
            "held_out_frames": float(len(data.held_out)),
        }

    def export(self, state: TrainState, directory: Path, params: Mapping[str, Any]) -> ExportCheck:
        """``classifier.onnx``: ``frames [N, views, S, S]`` -> ``logits [N, classes]``, with the class
        names."""
        size = params["input_size"]
        spec = preprocess_spec(params)
        source = epoch_generator(params["seed"], 0, _EXPORT_STREAM)
        frames = torch.rand(2, spec.views, size, size, generator=source).numpy()
        names = state.extra["class_names"]
        metadata = {
            "tessera.task": self.name,
            "tessera.architecture": f"vgg16-bn-gap-width{params['width']:g}"
            + (f"-views{spec.views}" if spec.views > 1 else ""),
            "tessera.class_names": json.dumps(list(names)),
            "tessera.input_size": f"{size}x{size}",
            "tessera.input_scaling": spec.describe(),
            "tessera.params": json.dumps(dict(params), sort_keys=True),
            # The service's verdict rule: a fault when its probability reaches the threshold, else good.
            "tessera.threshold": f"{params['threshold']:g}",
            **({"tessera.good_class": GOOD_CLASS} if GOOD_CLASS in names else {}),
            **spec.to_metadata(),
        }
        return export_onnx(
            state.models["classifier"],
            Path(directory) / f"{self.name}.onnx",
            {"frames": frames},
            ["logits"],
            metadata=metadata,
            description=f"tessera FITS frame classifier ({len(names)} classes, {size} px)",
        )

    def pictures(self, state: TrainState, directory: Path, params: Mapping[str, Any]) -> list[Path]:
        """None: the loss and accuracy curves say it all."""
        return []


def preprocess_spec(params: Mapping[str, Any]) -> PreprocessSpec:
    """How this job prepares frames (its ``bin_factor``, ``input_size``, ``stretch`` and ``stamps``)."""
    return PreprocessSpec(params["bin_factor"], params["input_size"], params["stretch"], params["stamps"])


def prepared_views(path: Path, spec: PreprocessSpec) -> np.ndarray:
    """``path`` read and prepared by ``spec`` (:meth:`~services.frames.PreprocessSpec.prepare_views`, as the
    classifier service does): float32 ``[views, size, size]`` in [0, 1], the network input."""
    frame = read_frame(path)
    try:
        return spec.prepare_views(frame)
    except UserError as error:  # reading errors name the file already; preparing ones do not
        raise UserError(f"{path}: {error}") from error


def dihedral(frames: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """``frames [B, C, S, S]``, frame ``i`` turned by ``turns[i]`` (0..7): ``t % 4`` quarter turns, then a
    left-right flip when ``t >= 4``. Every view of a frame alike."""
    out = frames.clone()
    for turn in range(1, 8):
        chosen = turns == turn
        if chosen.any():
            turned = torch.rot90(frames[chosen], turn % 4, (2, 3))
            out[chosen] = turned.flip(3) if turn >= 4 else turned
    return out
