"""The dcgan task: msls-dcgan (64 or 128 px) trained on a folder of pictures.

Dataset: a directory holding .png/.jpg/.jpeg pictures (searched recursively), of any size: each is resized so
its shorter side is ``image_size``, centre-cropped to a square and scaled to [-1, 1]. The pictures are
decoded once, in ``load``, and kept in memory as uint8 (3 * image_size^2 bytes each). Or the word
``synthetic``: ``synthetic_images`` cartoon faces drawn from the seed (:func:`synthetic_faces`), a dataset to
try the task on without one of your own.

Training: per batch one discriminator step (BCE-with-logits: real -> 1, ``G(z)`` -> 0) and one generator
step (``D(G(z))`` -> 1) on the same ``z``; AdamW (betas 0.5, 0.999) for both. The latents come from the
epoch's generator with the shuffle, so an epoch is the same whenever it is replayed. On CUDA (and
``mixed_precision``) both steps run under float16 autocast with one GradScaler, ``scalers["amp"]``.

The fixed noise for sample grids is drawn from the seed in ``build`` and kept in ``TrainState.extra``
(``"fixed_noise"``, a CPU tensor), so a resumed job draws the same grid as the job it continues.

Export: the generator, input ``noise [N, nz, 1, 1]`` -> ``images [N, 3, S, S]`` in [-1, 1].
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch spelling)
from PIL import Image

from services.trainer.data.images import PICTURE_SUFFIXES, decode_all, list_files, read_square_rgb
from services.trainer.data.seeding import batch_indices, epoch_generator, seeded
from services.trainer.nets.dcgan import IMAGE_SIZES, Discriminator, Generator
from services.trainer.nets.modes import evaluating
from services.trainer.storage import SYNTHETIC
from services.trainer.task import ExportCheck, TrainState
from services.trainer.tasks.hyperparameters import Rule, resolve
from services.trainer.tasks.onnx_export import bare, export_onnx

RULES: dict[str, Rule] = {
    "image_size": Rule(64, int, choices=IMAGE_SIZES),
    "batch_size": Rule(128, int, 1, 4096),
    "nz": Rule(100, int, 1, 1024),
    "ngf": Rule(64, int, 1, 512),
    "ndf": Rule(64, int, 1, 512),
    "lr": Rule(2e-4, float, 0.0, 1.0, open_low=True),
    "weight_decay": Rule(0.01, float, 0.0, 1.0),  # torch.optim.AdamW's own default
    "samples": Rule(64, int, 1, 1024),
    "eval_images": Rule(256, int, 1, 1_000_000),
    "mixed_precision": Rule(True, bool),
    "seed": Rule(0, int, 0, 2**31 - 1),
    "synthetic_images": Rule(512, int, 1, 100_000),
}
BETAS = (0.5, 0.999)
_FIXED_NOISE_STREAM = 1  # generator streams, so the fixed noise, export and evaluation draws never coincide
_EXPORT_STREAM = 2
_EVAL_STREAM = 3
_LAYOUT = "a folder of .png/.jpg pictures (any size; resized and centre-cropped to image_size)"


@dataclass(frozen=True)
class PictureSet:
    """The decoded dataset: uint8 ``images [N, 3, S, S]`` and the files they came from."""

    images: torch.Tensor
    files: list[Path]


class GanBatch(NamedTuple):
    """Real images in [-1, 1] and the latents ``[B, nz, 1, 1]`` the generator turns into fakes (a tuple, so
    loops that count images by the first array of a batch see the images)."""

    images: torch.Tensor
    noise: torch.Tensor


class DcganTask:
    """msls-dcgan: a generator/discriminator pair trained on an image folder."""

    name: ClassVar[str] = "dcgan"

    def params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults (see ``RULES``) merged with ``given``; a bad value raises UserError."""
        return resolve(self.name, RULES, given)

    def load(self, dataset: Path, params: Mapping[str, Any]) -> PictureSet:
        """Decode every picture under ``dataset`` at ``image_size``; ``synthetic``: draw
        ``synthetic_images`` cartoon faces (:func:`synthetic_faces`) instead."""
        if str(dataset) == SYNTHETIC:
            size, count = params["image_size"], params["synthetic_images"]
            return PictureSet(torch.from_numpy(synthetic_faces(count, size, params["seed"])), [])
        files = list_files(Path(dataset), PICTURE_SUFFIXES, _LAYOUT)
        images = decode_all(files, partial(read_square_rgb, size=params["image_size"]))
        return PictureSet(torch.from_numpy(images), files)

    def build(self, params: Mapping[str, Any], device: torch.device) -> TrainState:
        """Generator, discriminator, their AdamW optimisers, the fixed noise and (CUDA) a grad scaler."""
        with seeded(params["seed"]):
            generator = Generator(params["image_size"], params["nz"], params["ngf"])
            discriminator = Discriminator(params["image_size"], params["ndf"])
        models = {"generator": generator.to(device), "discriminator": discriminator.to(device)}
        optimizers: dict[str, torch.optim.Optimizer] = {
            name: torch.optim.AdamW(
                model.parameters(), lr=params["lr"], betas=BETAS, weight_decay=params["weight_decay"]
            )
            for name, model in models.items()
        }
        scalers = (
            {"amp": torch.amp.GradScaler("cuda")}
            if device.type == "cuda" and params["mixed_precision"]
            else {}
        )
        noise_source = epoch_generator(params["seed"], 0, _FIXED_NOISE_STREAM)
        fixed_noise = torch.randn(params["samples"], params["nz"], 1, 1, generator=noise_source)
        return TrainState(models, optimizers, scalers, extra={"fixed_noise": fixed_noise})

    def batches(
        self, data: PictureSet, params: Mapping[str, Any], epoch: int, device: torch.device
    ) -> Iterator[GanBatch]:
        """Shuffled real images with their latents, both drawn from the (seed, epoch) generator."""
        source = epoch_generator(params["seed"], epoch)
        for index in batch_indices(len(data.images), params["batch_size"], source):
            noise = torch.randn(len(index), params["nz"], 1, 1, generator=source)
            yield GanBatch(_to_unit_range(data.images[index].to(device)), noise.to(device))

    def train_step(self, state: TrainState, batch: GanBatch) -> dict[str, float]:
        """One discriminator step, then one generator step; losses and mean D outputs on this batch."""
        generator, discriminator = state.models["generator"], state.models["discriminator"]
        scaler = state.scalers.get("amp")
        device_type = batch.images.device.type
        generator.train()
        discriminator.train()

        state.optimizers["discriminator"].zero_grad(set_to_none=True)
        with torch.autocast(device_type, enabled=scaler is not None):
            fake = generator(batch.noise)
            real_logits = discriminator(batch.images)
            fake_logits = discriminator(fake.detach())
            loss_d = _bce(real_logits, 1.0) + _bce(fake_logits, 0.0)
        _step(loss_d, state.optimizers["discriminator"], scaler)

        state.optimizers["generator"].zero_grad(set_to_none=True)
        with torch.autocast(device_type, enabled=scaler is not None):
            loss_g = _bce(discriminator(fake), 1.0)
        _step(loss_g, state.optimizers["generator"], scaler)
        if scaler is not None:
            scaler.update()
        return {
            "loss_d": loss_d.item(),
            "loss_g": loss_g.item(),
            "d_real": torch.sigmoid(real_logits.float()).mean().item(),
            "d_fake": torch.sigmoid(fake_logits.float()).mean().item(),
        }

    def evaluate(self, state: TrainState, data: PictureSet, params: Mapping[str, Any]) -> dict[str, float]:
        """Mean D(real) and D(fake) (probabilities) and both losses over the first ``eval_images`` pictures
        and as many fakes from a fixed draw; networks in evaluation mode, nothing in the state changes."""
        generator, discriminator = bare(state.models["generator"]), bare(state.models["discriminator"])
        device = next(generator.parameters()).device
        count = min(params["eval_images"], len(data.images))
        source = epoch_generator(params["seed"], 0, _EVAL_STREAM)
        noise = torch.randn(count, params["nz"], 1, 1, generator=source)
        sums = dict.fromkeys(("d_real", "d_fake", "loss_d", "loss_g"), 0.0)
        with evaluating(generator, discriminator), torch.no_grad():
            for start in range(0, count, params["batch_size"]):
                stop = min(count, start + params["batch_size"])
                real_logits = discriminator(_to_unit_range(data.images[start:stop].to(device)))
                fake_logits = discriminator(generator(noise[start:stop].to(device)))
                sums["d_real"] += torch.sigmoid(real_logits).sum().item()
                sums["d_fake"] += torch.sigmoid(fake_logits).sum().item()
                sums["loss_d"] += (_bce(real_logits, 1.0, "sum") + _bce(fake_logits, 0.0, "sum")).item()
                sums["loss_g"] += _bce(fake_logits, 1.0, "sum").item()
        return {key: value / count for key, value in sums.items()}

    def export(self, state: TrainState, directory: Path, params: Mapping[str, Any]) -> ExportCheck:
        """The generator as ``dcgan.onnx``: ``noise [N, nz, 1, 1]`` -> ``images [N, 3, S, S]``."""
        source = epoch_generator(params["seed"], 0, _EXPORT_STREAM)
        noise = torch.randn(2, params["nz"], 1, 1, generator=source).numpy()
        size = params["image_size"]
        metadata = {
            "tessera.task": self.name,
            "tessera.architecture": f"msls-dcgan-generator-{size}",
            "tessera.nz": str(params["nz"]),
            "tessera.image_size": f"{size}x{size}",
            "tessera.output_scale": "tanh [-1, 1]: pixel = (x + 1) * 127.5",
            "tessera.params": json.dumps(dict(params), sort_keys=True),
        }
        return export_onnx(
            state.models["generator"],
            Path(directory) / f"{self.name}.onnx",
            {"noise": noise},
            ["images"],
            metadata=metadata,
            description=f"tessera DCGAN generator ({size} px, nz={params['nz']})",
        )

    def pictures(self, state: TrainState, directory: Path, params: Mapping[str, Any]) -> list[Path]:
        """``dcgan-samples.png``: the generator (evaluation mode) on the fixed noise, as a square grid."""
        generator = bare(state.models["generator"])
        device = next(generator.parameters()).device
        with evaluating(generator), torch.no_grad():
            images = generator(state.extra["fixed_noise"].to(device)).float().cpu()
        path = Path(directory) / "dcgan-samples.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample_grid(images.numpy())).save(path)
        return [path]


def sample_grid(images: np.ndarray, gap: int = 2) -> np.ndarray:
    """float images ``[N, 3, S, S]`` in [-1, 1] as one uint8 RGB picture, ceil(sqrt(N)) columns."""
    count, _, size, _ = images.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    step = size + gap
    grid = np.zeros((rows * step + gap, columns * step + gap, 3), np.uint8)
    pixels = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    for i, picture in enumerate(pixels):
        row, column = divmod(i, columns)
        grid[gap + row * step : gap + row * step + size, gap + column * step : gap + column * step + size] = (
            picture
        )
    return grid


def _to_unit_range(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def _bce(logits: torch.Tensor, target: float, reduction: str = "mean") -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(
        logits.float(), torch.full_like(logits, target, dtype=torch.float32), reduction=reduction
    )


def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)


def synthetic_faces(count: int, size: int, seed: int) -> np.ndarray:
    """uint8 ``[count, 3, size, size]``: cartoon faces (a skin-toned oval, two eyes, a mouth that smiles or
    frowns, sometimes hair) on plain backgrounds, each drawn at a random place, scale, tone and tilt; the
    same ``seed``, the same pictures. A dataset anyone can train the GAN on in minutes, with samples a person
    can judge at a glance."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    scale = 4  # drawn large, then shrunk: smooth edges
    big = size * scale
    out = np.empty((count, 3, size, size), np.uint8)
    for i in range(count):
        background = tuple(int(v) for v in rng.integers(30, 226, 3))
        picture = Image.new("RGB", (big, big), background)
        draw = ImageDraw.Draw(picture)
        half_w, half_h = big * rng.uniform(0.26, 0.36), big * rng.uniform(0.32, 0.42)
        cx, cy = big / 2 + big * rng.uniform(-0.08, 0.08), big / 2 + big * rng.uniform(-0.06, 0.06)
        skin = tuple(int(v) for v in np.array([224, 172, 140]) * rng.uniform(0.45, 1.1))
        if rng.random() < 0.6:  # hair
            hair = tuple(int(v) for v in rng.integers(10, 120, 3))
            draw.ellipse(
                [cx - half_w * 1.08, cy - half_h * 1.12, cx + half_w * 1.08, cy + half_h * 0.3], fill=hair
            )
        draw.ellipse([cx - half_w, cy - half_h, cx + half_w, cy + half_h], fill=skin)
        eye_dx, eye_y, eye_r = (
            half_w * rng.uniform(0.32, 0.45),
            cy - half_h * 0.2,
            half_w * rng.uniform(0.1, 0.16),
        )
        for side in (-1, 1):
            ex = cx + side * eye_dx
            draw.ellipse([ex - eye_r, eye_y - eye_r, ex + eye_r, eye_y + eye_r], fill=(250, 250, 250))
            pupil = eye_r * 0.5
            draw.ellipse([ex - pupil, eye_y - pupil, ex + pupil, eye_y + pupil], fill=(20, 20, 30))
        mouth_w, mouth_y = half_w * rng.uniform(0.35, 0.6), cy + half_h * rng.uniform(0.35, 0.5)
        smile = rng.random() < 0.7
        box = [cx - mouth_w, mouth_y - half_h * 0.15, cx + mouth_w, mouth_y + half_h * 0.15]
        draw.arc(box, 0 if smile else 180, 180 if smile else 360, fill=(120, 20, 30), width=max(2, big // 40))
        picture = picture.rotate(
            float(rng.uniform(-15, 15)), resample=Image.Resampling.BICUBIC, fillcolor=background
        )
        out[i] = np.asarray(picture.resize((size, size), Image.Resampling.LANCZOS), np.uint8).transpose(
            2, 0, 1
        )
    return out
