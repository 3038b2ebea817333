"""Checkpoints: the full training state, written by rank 0 only, atomically, with a ``latest`` pointer.

A checkpoint holds every network, optimiser and grad scaler (state dicts), the task's extras, the progress
(completed epochs, optimiser steps, and batches done in the epoch under way), the loss history so far, and
the RNG states (Python, NumPy, torch CPU and every CUDA device). It is written with ``torch.save`` to a local
file under a temporary name, renamed, then stored as ``checkpoints/step-NNNNNNNNN.pt`` in the job's output
(one PUT on S3); ``checkpoints/latest.json`` is written only after, so it never points at a missing or
partial file. :func:`load_latest` refuses anything that is not a full checkpoint (an integer, a bare
state dict): resuming from less would silently restart training.

Resumption continues after what the checkpoint recorded: a checkpoint written at the end of epoch ``e``
says ``epoch = e + 1, epoch_step = 0`` and the loop starts epoch ``e + 1``; one written mid-epoch says how
many of the epoch's batches are done and the loop skips exactly those.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.trainer.device import Device
from services.trainer.storage import Storage
from services.trainer.task import TrainState

FORMAT = "tessera.checkpoint/v1"
LATEST = "checkpoints/latest.json"
#: The keys every checkpoint holds; :func:`check_checkpoint` insists on each.
KEYS = ("format", "models", "optimizers", "scalers", "epoch", "step", "epoch_step", "extra", "history", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (not a full tessera checkpoint, or unreadable)."""


@dataclass
class Progress:
    """Where training stands: completed epochs, optimiser steps, batches done in the epoch under way, and
    the losses recorded at every step so far."""

    epoch: int = 0
    step: int = 0
    epoch_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def rng_states() -> dict[str, Any]:
    """Every RNG state a training step may draw from, in a form ``torch.load(weights_only=True)`` reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` captured (CUDA only when both sides have it)."""
    random.setstate(_tuples(states["python"]))
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def _tuples(value: Any) -> Any:
    # random.setstate wants tuples all the way down; a checkpoint may hand back lists.
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


def checkpoint_state(state: TrainState, progress: Progress) -> dict[str, Any]:
    """The full checkpoint of ``state`` at ``progress``, as one dict for ``torch.save``."""
    return {
        "format": FORMAT,
        "models": {name: model.state_dict() for name, model in state.models.items()},
        "optimizers": {name: opt.state_dict() for name, opt in state.optimizers.items()},
        "scalers": {name: scaler.state_dict() for name, scaler in state.scalers.items()},
        "epoch": int(progress.epoch),
        "step": int(progress.step),
        "epoch_step": int(progress.epoch_step),
        "extra": dict(state.extra),
        "history": [dict(h) for h in progress.history],
        "rng": rng_states(),
    }


def check_checkpoint(checkpoint: Any, source: str, state: TrainState | None = None) -> dict[str, Any]:
    """``checkpoint`` if it is a full checkpoint (matching ``state``'s networks); CheckpointError if not."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(
            f"{source} is not a full tessera checkpoint (got {type(checkpoint).__name__}); refusing to "
            "resume from it: delete it (and checkpoints/latest.json) to start afresh"
        )
    missing = [k for k in KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}; it cannot be resumed from")
    if state is not None:
        for kind, have in (("models", state.models), ("optimizers", state.optimizers)):
            if set(checkpoint[kind]) != set(have):
                raise CheckpointError(
                    f"{source} holds {kind} {sorted(checkpoint[kind])}, but the task builds {sorted(have)}"
                )
    return checkpoint


def save_checkpoint(
    state: TrainState, progress: Progress, storage: Storage, device: Device, workdir: Path
) -> str | None:
    """Write the checkpoint (rank 0 only; other ranks return None at once); returns its URI."""
    if not device.is_main:
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    name = f"checkpoints/step-{progress.step:09d}.pt"
    local = workdir / f"step-{progress.step:09d}.pt"
    temporary = local.with_name(local.name + ".tmp")
    torch.save(checkpoint_state(state, progress), temporary)
    os.replace(temporary, local)
    uri = storage.put_file(local, name)
    pointer = {"checkpoint": name, "epoch": progress.epoch, "step": progress.step}
    storage.put_bytes(json.dumps(pointer).encode(), LATEST)
    # The local copy served its purpose (the stored one is the truth); keep the disk from filling.
    local.unlink(missing_ok=True)
    return uri


def load_latest(storage: Storage, workdir: Path, device: Device) -> dict[str, Any] | None:
    """The checkpoint ``checkpoints/latest.json`` points at, checked; None when there is none yet."""
    body = storage.get_bytes(LATEST)
    if body is None:
        return None
    try:
        pointer = json.loads(body)
        name = pointer["checkpoint"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{storage.uri(LATEST)} is not a checkpoint pointer") from None
    workdir.mkdir(parents=True, exist_ok=True)
    local = workdir / f"resume-{device.rank}.pt"
    if not storage.get_file(name, local):
        raise CheckpointError(f"{storage.uri(LATEST)} points at {storage.uri(name)}, which does not exist")
    try:
        checkpoint = torch.load(local, map_location=device.torch_device, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read the checkpoint {storage.uri(name)}: {exc}") from None
    finally:
        local.unlink(missing_ok=True)
    return check_checkpoint(checkpoint, storage.uri(name))


def restore(state: TrainState, checkpoint: dict[str, Any], source: str = "the checkpoint") -> Progress:
    """Load ``checkpoint`` into ``state`` (networks, optimisers, scalers, extras, RNG); returns progress."""
    check_checkpoint(checkpoint, source, state)
    for name, model in state.models.items():
        model.load_state_dict(checkpoint["models"][name])
    for name, optimizer in state.optimizers.items():
        optimizer.load_state_dict(checkpoint["optimizers"][name])
    for name, scaler in state.scalers.items():
        if name in checkpoint["scalers"]:
            scaler.load_state_dict(checkpoint["scalers"][name])
    state.extra.update(checkpoint["extra"])
    state.epoch = int(checkpoint["epoch"])
    state.step = int(checkpoint["step"])
    set_rng_states(checkpoint["rng"])
    return Progress(
        epoch=int(checkpoint["epoch"]),
        step=int(checkpoint["step"]),
        epoch_step=int(checkpoint["epoch_step"]),
        history=[dict(h) for h in checkpoint["history"]],
    )
