"""Where training runs: CUDA (data-parallel over every GPU under torchrun), Habana HPU, or the CPU.

``choose_device`` reads torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; with more than one process it
joins the process group (NCCL on CUDA, HCCL on HPU, gloo on CPU). Gradients are averaged across processes
before every optimiser step (:func:`average_gradients`, hooked onto each optimiser by the loop), which is
what DDP does, without wrapping the task's networks: tasks call sub-networks (``heads``) and drive several
optimisers (GANs), which a DDP wrapper does not see. Each process takes its own share of every epoch's
batches (:func:`shard`). The Habana bridge is imported only when asked for or present; it is never a
dependency.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from services.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")
KINDS = ("auto", "cpu", "cuda", "hpu")


@dataclass(frozen=True)
class Device:
    """The device of this process and its place among the training processes."""

    kind: str  # "cpu", "cuda" or "hpu"
    torch_device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints, results and logs (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one training process."""
        return self.world_size > 1


def hpu_available() -> bool:
    """Whether Habana's PyTorch bridge imports and sees a Gaudi card (never raises)."""
    try:
        importlib.import_module("habana_frameworks.torch")
    except Exception:
        return False
    hpu = getattr(torch, "hpu", None)
    try:
        return bool(hpu is not None and hpu.is_available())
    except Exception:
        return False


def local_device_count(prefer: str = "auto") -> int:
    """How many devices of the kind ``prefer`` resolves to this machine holds (1 for the CPU).

    The same choice as :func:`choose_device` (``auto``: HPU, then CUDA, then the CPU), without touching
    the devices: the worker asks this before starting one training process per device.
    """
    if prefer not in KINDS:
        raise UserError(f"device {prefer!r} is not one of {', '.join(KINDS)}")
    if prefer in ("auto", "hpu") and hpu_available():
        try:
            return max(1, int(torch.hpu.device_count()))  # type: ignore[attr-defined]
        except Exception:
            return 1
    if prefer in ("auto", "cuda") and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return 1


def choose_device(prefer: str = "auto", env: Mapping[str, str] | None = None) -> Device:
    """The device to train on: ``auto`` takes HPU, then CUDA, then the CPU; others insist on one kind.

    Under torchrun (``WORLD_SIZE`` > 1) it also joins the process group, once.
    """
    env = os.environ if env is None else env
    if prefer not in KINDS:
        raise UserError(f"device {prefer!r} is not one of {', '.join(KINDS)}")
    rank = int(env.get("RANK", "0"))
    world_size = int(env.get("WORLD_SIZE", "1"))
    local_rank = int(env.get("LOCAL_RANK", str(rank)))
    kind = prefer
    if prefer == "auto":
        kind = "hpu" if hpu_available() else "cuda" if torch.cuda.is_available() else "cpu"
    elif prefer == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but torch sees no CUDA GPU; use device auto or cpu")
    elif prefer == "hpu" and not hpu_available():
        raise UserError("device hpu was asked for, but habana_frameworks.torch is not importable here")
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    elif kind == "hpu":
        torch_device = torch.device("hpu")
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        backend = {"cuda": "nccl", "hpu": "hccl", "cpu": "gloo"}[kind]
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        log.info("joined the %s process group as rank %d of %d", backend, rank, world_size)
    return Device(kind=kind, torch_device=torch_device, rank=rank, world_size=world_size)


def shard(batches: Iterable[T], device: Device) -> Iterator[T]:
    """This process's share of ``batches``: of every ``world_size`` consecutive batches, the ``rank``-th.

    A last incomplete group is dropped, so every process takes the same number of steps (the gradient
    all-reduce would wait forever for a process that ran out).
    """
    if not device.distributed:
        yield from batches
        return
    group: list[T] = []
    for batch in batches:
        group.append(batch)
        if len(group) == device.world_size:
            yield group[device.rank]
            group = []


def average_gradients(parameters: Iterable[nn.Parameter], device: Device) -> None:
    """Average the gradients of ``parameters`` over every process (one all-reduce of a flat buffer)."""
    if not device.distributed:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= device.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def hook_gradient_averaging(optimizers: Iterable[torch.optim.Optimizer], device: Device) -> list[Any]:
    """Average gradients before every step of each optimiser; returns the hook handles (``.remove()``)."""
    if not device.distributed:
        return []
    handles = []
    for optimizer in optimizers:

        def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            average_gradients((p for group in opt.param_groups for p in group["params"]), device)

        handles.append(optimizer.register_step_pre_hook(before_step))
    return handles


def broadcast_models(models: Iterable[nn.Module], device: Device) -> None:
    """Make every process start from rank 0's weights and buffers."""
    if not device.distributed:
        return
    for model in models:
        for tensor in model.state_dict().values():
            if isinstance(tensor, torch.Tensor):
                dist.broadcast(tensor, src=0)


def barrier(device: Device) -> None:
    """Wait for every process (no-op alone)."""
    if device.distributed:
        dist.barrier()


def leave(device: Device) -> None:
    """Leave the process group, if this process joined one."""
    if device.distributed and dist.is_initialized():
        dist.destroy_process_group()
