"""Training throughput: images per second of each trainer task, on the CPU (or CUDA when present).

    .venv/bin/python bench/training.py [--steps 20] [--device auto|cpu|cuda] [--quick]

Each task trains its default-sized network (or the tiny test size with ``--quick``) on data this script
generates into a scratch folder, through the task's own batches and ``train_step``, exactly as the training
loop calls them. Images per second = images in the timed steps / their wall time, after one warm-up step.
There is no reference implementation to compare with on this machine; the figures are the baseline later
changes are measured against (and what the training instance should beat on a GPU).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Hyper-parameters per task: the benchmark size, and the tiny size of the tests.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "detector": {"full": {}, "quick": {}},
    "dcgan": {
        "full": {"image_size": 64, "batch_size": 64},
        "quick": {"image_size": 64, "batch_size": 8, "ngf": 8, "ndf": 8},
    },
    "classifier": {
        "full": {"input_size": 128, "batch_size": 16, "width": 0.5},
        "quick": {"input_size": 32, "batch_size": 8, "width": 0.0625, "head_width": 16},
    },
    "sky-position": {
        "full": {"image_size": 128, "batch_size": 32},
        "quick": {"image_size": 64, "batch_size": 8, "width": 4, "hidden": 32},
    },
}


def _noise_image(rng: np.random.Generator, size: int) -> np.ndarray:
    return (rng.random((size, size, 3)) * 255).astype(np.uint8)


def make_dataset(task: str, folder: Path, count: int) -> str:
    """Scratch data for ``task`` in ``folder``; returns the dataset argument the task's ``load`` takes."""
    rng = np.random.default_rng(0)
    if task == "detector":
        return "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    if task == "dcgan":
        for i in range(count):
            Image.fromarray(_noise_image(rng, 96)).save(folder / f"{i:04d}.png")
    elif task == "classifier":
        from astropy.io import fits

        for label in ("stars", "streaks"):
            (folder / label).mkdir(exist_ok=True)
            for i in range(count // 2):
                frame = rng.normal(100, 5, (160, 160)).astype(np.float32)
                if label == "streaks":
                    frame[80:83, :] += 200
                fits.PrimaryHDU(frame).writeto(folder / label / f"{i:04d}.fits", overwrite=True)
    elif task == "sky-position":
        start = datetime(2026, 1, 1, tzinfo=UTC)
        with (folder / "manifest.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "lat", "lon", "time"])
            for i in range(count):
                name = f"sky-{i:04d}.png"
                Image.fromarray(_noise_image(rng, 160)[:, :, 0]).save(folder / name)
                when = start + timedelta(hours=7 * i)
                writer.writerow([name, rng.uniform(-60, 60), rng.uniform(-180, 180), when.isoformat()])
    return str(folder)


def measure(
    task_name: str, params: Mapping[str, Any], dataset: str, steps: int, device_kind: str
) -> dict[str, Any]:
    """Images per second of ``steps`` training steps of one task (after one warm-up step)."""
    import torch

    from services.trainer.device import choose_device
    from services.trainer.tasks import make_task

    device = choose_device(device_kind)
    task = make_task(task_name)
    chosen = task.params(dict(params))
    data = (
        task.load(Path(dataset), chosen) if dataset != "synthetic" else task.load(Path("synthetic"), chosen)
    )
    state = task.build(chosen, device.torch_device)
    timed, images, seconds, epoch = 0, 0, 0.0, 0
    warmed = False
    while timed < steps:
        for batch in task.batches(data, chosen, epoch, device.torch_device):
            count = int(batch[0].shape[0])
            started = time.perf_counter()
            task.train_step(state, batch)
            if device.torch_device.type == "cuda":
                torch.cuda.synchronize()
            if not warmed:
                warmed = True
                continue
            seconds += time.perf_counter() - started
            images += count
            timed += 1
            if timed >= steps:
                break
        epoch += 1
    return {
        "task": task_name,
        "device": device.kind,
        "batch": int(images / max(timed, 1)),
        "steps": timed,
        "seconds": seconds,
        "images_per_s": images / seconds if seconds else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per task (default 20)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny networks and data (a smoke run)")
    parser.add_argument("--tasks", nargs="*", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args(argv)
    size = "quick" if args.quick else "full"
    steps = 2 if args.quick else args.steps
    rows = []
    with tempfile.TemporaryDirectory(prefix="tessera-bench-train-") as scratch:
        for name in args.tasks:
            dataset = make_dataset(name, Path(scratch) / name, 32 if args.quick else 256)
            rows.append(measure(name, SIZES[name][size], dataset, steps, args.device))
    print(f"{'task':<14}{'device':<8}{'batch':>6}{'steps':>7}{'seconds':>10}{'images/s':>11}")
    for row in rows:
        print(
            f"{row['task']:<14}{row['device']:<8}{row['batch']:>6}{row['steps']:>7}"
            f"{row['seconds']:>10.2f}{row['images_per_s']:>11.1f}"
        )
    for row in rows:
        print(
            f"RESULT training_images_per_s[{row['task']},{row['device']}]="
            f"{row['images_per_s']:.1f} (baseline)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
