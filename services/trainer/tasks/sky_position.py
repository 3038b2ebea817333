"""The sky-position task (celnav): where on Earth was this sky photographed, given when?

Dataset: a folder of sky images with a manifest, as ``data.sky_manifest`` defines it (``manifest.csv`` or
``manifest.jsonl``: file, lat, lon, time ISO-8601 UTC), which is what the sky generator writes. Images are
read as grey (``channels`` 1) or RGB (3), squeezed whole to ``image_size`` x ``image_size`` (no crop: the
horizon and every star count) and kept in memory as uint8; the network sees x/255. Times become the six
features of ``data.sky_manifest.time_features`` (sin/cos of day of year, UTC hour and Greenwich sidereal
time). ``val_fraction`` of the shots (chosen by ``seed``) are held out for ``evaluate``, unless the manifest's
``split`` column names them (then ``val_fraction`` is not used); with none held out it reports on the
training shots (``held_out_images`` = 0 says so).

Network: ``nets.sky.SkyPositionNet`` (latitude via 90 tanh, longitude as a direction atan2(s, c)). Loss:
mean great-circle distance in km (``nets.sky.great_circle_km``), AdamW.

Export: inputs ``image [N, C, S, S]`` (x/255) and ``time [N, 6]`` -> ``latlon [N, 2]`` (degrees).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch

from services.celnav.time_input import TIME_FEATURE_DEFINITION
from services.errors import UserError
from services.trainer.data.images import decode_all, read_resized
from services.trainer.data.seeding import batch_indices, epoch_generator, held_out_split, seeded
from services.trainer.data.sky_manifest import (
    TIME_FEATURE_NAMES,
    TIME_FEATURES,
    SkyShot,
    read_manifest,
    time_features,
)
from services.trainer.nets.modes import evaluating
from services.trainer.nets.sky import SkyPositionNet, great_circle_km
from services.trainer.storage import SYNTHETIC
from services.trainer.task import ExportCheck, TrainState
from services.trainer.tasks.hyperparameters import Rule, resolve
from services.trainer.tasks.onnx_export import bare, export_onnx

RULES: dict[str, Rule] = {
    "image_size": Rule(128, int, 64, 1024, multiple_of=64),
    "channels": Rule(1, int, choices=(1, 3)),
    "width": Rule(16, int, 1, 256),
    "hidden": Rule(128, int, 1, 4096),
    "batch_size": Rule(32, int, 1, 4096),
    "lr": Rule(1e-3, float, 0.0, 1.0, open_low=True),
    "weight_decay": Rule(1e-4, float, 0.0, 1.0),
    "val_fraction": Rule(0.1, float, 0.0, 0.9),
    "seed": Rule(0, int, 0, 2**31 - 1),
}
_EXPORT_STREAM = 2
#: Two instants the export check feeds the model (an equinox night and a solstice noon).
_EXPORT_TIMES = (datetime(2024, 3, 20, 21, 15, tzinfo=UTC), datetime(2024, 6, 21, 12, 0, tzinfo=UTC))


@dataclass(frozen=True)
class SkySet:
    """Images uint8 ``[N, C, S, S]``, time features ``[N, 6]``, positions ``[N, 2]`` (lat, lon degrees) and
    the training/held-out split (index tensors)."""

    images: torch.Tensor
    times: torch.Tensor
    positions: torch.Tensor
    training: torch.Tensor
    held_out: torch.Tensor
    files: list[Path]


class SkyBatch(NamedTuple):
    """Images x/255 ``[B, C, S, S]``, time features ``[B, 6]`` and true (lat, lon) ``[B, 2]``."""

    images: torch.Tensor
    times: torch.Tensor
    positions: torch.Tensor


class SkyPositionTask:
    """Observer latitude/longitude from a sky image and its UTC time."""

    name: ClassVar[str] = "sky-position"

    def params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults (see ``RULES``) merged with ``given``; a bad value raises UserError."""
        return resolve(self.name, RULES, given)

    def load(self, dataset: Path, params: Mapping[str, Any]) -> SkySet:
        """Read the manifest and every image it lists; split off the held-out shots."""
        if str(dataset) == SYNTHETIC:
            raise UserError(
                "sky-position's synthetic skies are rendered with Stellarium by `tessera train sky-position "
                "--dataset synthetic` on a machine that has it; a queued job names rendered frames (an s3:// "
                "prefix of `tessera sky submit`'s output, or a folder with a manifest)"
            )
        shots = read_manifest(Path(dataset))
        decode = partial(read_resized, size=params["image_size"], channels=params["channels"])
        images = decode_all([shot.file for shot in shots], decode)
        training, held_out = _split(shots, params)
        return SkySet(
            torch.from_numpy(images),
            torch.from_numpy(time_features([shot.time for shot in shots])),
            torch.tensor([[shot.lat, shot.lon] for shot in shots], dtype=torch.float32),
            torch.tensor(training, dtype=torch.int64),
            torch.tensor(held_out, dtype=torch.int64),
            [shot.file for shot in shots],
        )

    def build(self, params: Mapping[str, Any], device: torch.device) -> TrainState:
        """The sky-position network and its AdamW optimiser."""
        with seeded(params["seed"]):
            model = SkyPositionNet(params["channels"], TIME_FEATURES, params["width"], params["hidden"])
        model = model.to(device)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"]
        )
        return TrainState({"sky": model}, {"sky": optimizer})

    def batches(
        self, data: SkySet, params: Mapping[str, Any], epoch: int, device: torch.device
    ) -> Iterator[SkyBatch]:
        """The training shots, shuffled by the (seed, epoch) generator."""
        source = epoch_generator(params["seed"], epoch)
        for index in batch_indices(len(data.training), params["batch_size"], source):
            yield _batch(data, data.training[index], device)

    def train_step(self, state: TrainState, batch: SkyBatch) -> dict[str, float]:
        """One AdamW step on the mean great-circle error; ``loss`` is that error in km."""
        model, optimizer = state.models["sky"], state.optimizers["sky"]
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = great_circle_km(model(batch.images, batch.times), batch.positions).mean()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    def evaluate(self, state: TrainState, data: SkySet, params: Mapping[str, Any]) -> dict[str, float]:
        """Mean and median great-circle error (km) on the held-out shots (on the training shots if none)."""
        model = bare(state.models["sky"])
        device = next(model.parameters()).device
        chosen = data.held_out if len(data.held_out) else data.training
        errors = []
        with evaluating(model), torch.no_grad():
            for start in range(0, len(chosen), params["batch_size"]):
                batch = _batch(data, chosen[start : start + params["batch_size"]], device)
                errors.append(great_circle_km(model(batch.images, batch.times), batch.positions).cpu())
        error = torch.cat(errors).double()
        return {
            "mean_error_km": float(error.mean()),
            "median_error_km": float(error.median()),
            "held_out_images": float(len(data.held_out)),
        }

    def export(self, state: TrainState, directory: Path, params: Mapping[str, Any]) -> ExportCheck:
        """``sky-position.onnx``: ``image [N, C, S, S]``, ``time [N, 6]`` -> ``latlon [N, 2]`` degrees."""
        size, channels = params["image_size"], params["channels"]
        source = epoch_generator(params["seed"], 0, _EXPORT_STREAM)
        inputs = {
            "image": torch.rand(len(_EXPORT_TIMES), channels, size, size, generator=source).numpy(),
            "time": time_features(_EXPORT_TIMES),
        }
        metadata = {
            "tessera.task": self.name,
            "tessera.architecture": f"sky-conv4-mlp-width{params['width']}",
            "tessera.input_size": f"{size}x{size}",
            "tessera.input_channels": str(channels),
            "tessera.input_scale": "1/255",
            "tessera.time_features": json.dumps(list(TIME_FEATURE_NAMES)),
            "tessera.time_feature_definition": TIME_FEATURE_DEFINITION,
            "tessera.output": "latlon [N, 2]: latitude, longitude in degrees (east positive, (-180, 180])",
            "tessera.params": json.dumps(dict(params), sort_keys=True),
        }
        return export_onnx(
            state.models["sky"],
            Path(directory) / f"{self.name}.onnx",
            inputs,
            ["latlon"],
            metadata=metadata,
            description=f"tessera sky-position regressor ({size} px, {channels} channel(s))",
            atol=1e-3,  # degrees (about 100 m); atan2 amplifies float rounding of small outputs
        )

    def pictures(self, state: TrainState, directory: Path, params: Mapping[str, Any]) -> list[Path]:
        """None: the error curves say it all."""
        return []


def _split(shots: list[SkyShot], params: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """(training, held-out) indices: the manifest's own split when it names one, else a seeded one."""
    if all(shot.split is None for shot in shots):
        return held_out_split(len(shots), params["val_fraction"], params["seed"])
    held_out = [i for i, shot in enumerate(shots) if shot.split == "held_out"]
    training = [i for i, shot in enumerate(shots) if shot.split != "held_out"]
    if not training:
        raise UserError(
            "the manifest's split column holds out every shot; mark some 'train' (or leave them empty)"
        )
    return training, held_out


def _batch(data: SkySet, index: torch.Tensor, device: torch.device) -> SkyBatch:
    return SkyBatch(
        (data.images[index].float() / 255.0).to(device),
        data.times[index].to(device),
        data.positions[index].to(device),
    )
