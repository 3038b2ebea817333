"""Where training runs: CUDA (data-parallel over every GPU under torchrun), Habana HPU, or the CPU.

``choose_device`` reads torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; with more than one process it
joins the process group (NCCL on CUDA, HCCL on HPU, gloo on CPU). Gradients are averaged across processes
before every optimiser step (:func:`average_gradients`, hooked onto each optimiser by the loop), which is
what DDP does, without wrapping the task's networks: tasks call sub-networks (``heads``) and drive several
optimisers (GANs), which a DDP wrapper does not see. Each process takes its own share of every epoch's
batches (:func:`shard`). The Habana bridge is imported only when asked for or present; it is never a
dependency.

``auto`` never falls back to the CPU on a box that has an accelerator: when ``$TESSERA_ACCELERATOR`` (set
by the stack from the training instance type) or a device file (``/dev/nvidia0``, ``/dev/hl0``, a Habana
``/dev/accel/accel0``, ``/dev/neuron0``) says there is one, and this torch cannot use it (no CUDA, no
kernels for the GPU's architecture, no Habana bridge), it raises :class:`UserError` naming the accelerator,
what torch reports and which trainer image to run, and the worker records that as the job's failure. A job
that asks for device ``cpu`` trains on the CPU on purpose.
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
ACCELERATOR_ENV = "TESSERA_ACCELERATOR"
"""What the box carries (``nvidia``, ``gaudi``, ``neuron``; ``none``); the stack sets it on training boxes."""
ACCELERATORS = ("nvidia", "gaudi", "neuron")


@dataclass(frozen=True)
class DeviceFile:
    """A device file that betrays an accelerator; ``driver`` (when set) must be what its sysfs link names."""

    path: str
    accelerator: str
    driver_link: str | None = None
    driver: str | None = None


DEVICE_FILES: tuple[DeviceFile, ...] = (
    DeviceFile("/dev/nvidia0", "nvidia"),
    DeviceFile("/dev/hl0", "gaudi"),
    # The kernel's accel class also holds other vendors' devices (NPUs): count it only when Habana's.
    DeviceFile("/dev/accel/accel0", "gaudi", "/sys/class/accel/accel0/device/driver", "habanalabs"),
    DeviceFile("/dev/neuron0", "neuron"),
)
TRAINER_IMAGES = {
    "nvidia": (
        "the trainer image built for the GPU: images/trainer.Dockerfile (torch 2.13, CUDA 13) for Turing "
        "and newer, images/trainer-cuda12.Dockerfile (torch 2.10, CUDA 12.8) for Volta (p3, p3dn), run with "
        "--gpus all"
    ),
    "gaudi": (
        "images/trainer-gaudi.Dockerfile (SynapseAI PyTorch with habana_frameworks), run with "
        "--runtime=habana"
    ),
    "neuron": (
        "no image: tessera builds no Neuron trainer; set tessera:trainingInstanceType to an NVIDIA "
        "or Gaudi type"
    ),
}
"""Which image trains on each accelerator (what the refusal tells the user to run)."""
_LABELS = {"nvidia": "an NVIDIA GPU", "gaudi": "a Habana Gaudi card", "neuron": "an AWS Neuron device"}


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


def box_accelerator(env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """The accelerator this box carries and what says so (``$TESSERA_ACCELERATOR``, else a device file)."""
    env = os.environ if env is None else env
    declared = env.get(ACCELERATOR_ENV, "").strip().lower()
    if declared in ("none", "cpu"):
        return None
    if declared:
        if declared not in ACCELERATORS:
            raise UserError(
                f"{ACCELERATOR_ENV}={declared!r} is not one of {', '.join(ACCELERATORS)} (or none); "
                "the stack sets it from tessera:trainingInstanceType"
            )
        return declared, f"{ACCELERATOR_ENV}={declared}"
    for device in DEVICE_FILES:
        if not os.path.exists(device.path):
            continue
        if device.driver_link is not None:
            driver = os.path.basename(os.path.realpath(device.driver_link))
            if driver != device.driver:
                continue
        return device.accelerator, device.path
    return None


def _arch_supported(capability: tuple[int, int], arch_list: Iterable[str]) -> bool:
    """Whether torch holds kernels a GPU of ``capability`` runs: a cubin of the same major architecture and
    no newer minor one (``sm_80`` runs on 8.6), or PTX (``compute_XY``) no newer than the GPU."""
    major, minor = capability
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        digits = number.rstrip("af")  # arch-specific (sm_90a) and family (sm_100f) builds
        if not digits.isdigit() or len(digits) < 2:
            continue
        arch_major, arch_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def _torch_build() -> str:
    cuda = getattr(torch.version, "cuda", None)
    return f"torch {torch.__version__} ({f'CUDA {cuda}' if cuda else 'a build without CUDA'})"


def cuda_problem() -> str | None:
    """Why this torch cannot train on this box's NVIDIA GPUs, or None when it can."""
    if not torch.cuda.is_available():
        return f"{_torch_build()} sees no usable CUDA GPU (torch.cuda.is_available() is False)"
    arch_list = torch.cuda.get_arch_list()
    for index in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(index)
        if not _arch_supported(capability, arch_list):
            name = torch.cuda.get_device_name(index)
            return (
                f"{_torch_build()} has kernels for {' '.join(arch_list) or 'no architecture'} only, and GPU "
                f"{index} ({name}) is sm_{capability[0]}{capability[1]}"
            )
    return None


def hpu_problem() -> str | None:
    """Why this torch cannot train on this box's Gaudi cards, or None when it can."""
    try:
        importlib.import_module("habana_frameworks.torch")
    except Exception as exc:
        return f"{_torch_build()} has no Habana bridge (import habana_frameworks.torch: {exc})"
    return None if hpu_available() else "habana_frameworks.torch imports but sees no Gaudi card"


def _refuse(accelerator: str, evidence: str, problem: str) -> UserError:
    return UserError(
        f"this box has {_LABELS[accelerator]} ({evidence}), but {problem}; refusing to train on the CPU "
        f'instead. Run {TRAINER_IMAGES[accelerator]}; or give the job device "cpu" to train on the CPU '
        "on purpose"
    )


def _auto_kind(env: Mapping[str, str] | None) -> str:
    """What ``auto`` trains on: the box's accelerator if torch can use it (else a refusal); HPU, CUDA, CPU."""
    found = box_accelerator(env)
    if found is None:
        return "hpu" if hpu_available() else "cuda" if torch.cuda.is_available() else "cpu"
    accelerator, evidence = found
    if accelerator == "neuron":
        raise _refuse(accelerator, evidence, f"{_torch_build()} cannot train on Neuron")
    problem = cuda_problem() if accelerator == "nvidia" else hpu_problem()
    if problem is not None:
        raise _refuse(accelerator, evidence, problem)
    return "cuda" if accelerator == "nvidia" else "hpu"


def local_device_count(prefer: str = "auto", env: Mapping[str, str] | None = None) -> int:
    """How many devices of the kind ``prefer`` resolves to this machine holds (1 for the CPU).

    The same choice as :func:`choose_device` (``auto``: the box's accelerator, refusing one torch cannot
    use; else HPU, then CUDA, then the CPU), without touching the devices: the worker asks this before
    starting one training process per device.
    """
    if prefer not in KINDS:
        raise UserError(f"device {prefer!r} is not one of {', '.join(KINDS)}")
    kind = _auto_kind(env) if prefer == "auto" else prefer
    if kind == "hpu" and hpu_available():
        try:
            return max(1, int(torch.hpu.device_count()))  # type: ignore[attr-defined]
        except Exception:
            return 1
    if kind == "cuda" and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return 1


def choose_device(prefer: str = "auto", env: Mapping[str, str] | None = None) -> Device:
    """The device to train on: ``auto`` takes the box's accelerator (see the module doc: never a silent CPU
    run beside one), else HPU, then CUDA, then the CPU; the others insist on one kind.

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
        kind = _auto_kind(env)
    elif prefer == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but torch sees no CUDA GPU; use device auto or cpu")
    elif prefer == "cuda" and (problem := cuda_problem()) is not None:
        raise UserError(f"device cuda was asked for, but {problem}. Run {TRAINER_IMAGES['nvidia']}")
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
