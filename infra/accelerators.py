"""Which EC2 instance families carry which accelerator: the one table the training instance, the trainer
images and the stack settings (the GPU fleet's NVIDIA families) read.

Standard library only, so that ``stacks/settings.py`` can read it without loading Pulumi.
"""

from __future__ import annotations

from typing import Literal

Accelerator = Literal["nvidia", "gaudi", "neuron"]

INSTANCE_TYPE_SETTING = "tessera:trainingInstanceType"
"""The stack setting that chooses the instance type; named in validation errors so users know what to fix."""

FAMILY_ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA: Volta (p3), Turing (g4dn), Ampere (p4d, g5), Ada (g6, g6e, gr6), Hopper (p5*), Blackwell (p6).
    "p3": "nvidia",
    "p3dn": "nvidia",
    "p4d": "nvidia",
    "p4de": "nvidia",
    "p5": "nvidia",
    "p5e": "nvidia",
    "p5en": "nvidia",
    "p6-b200": "nvidia",
    "g4dn": "nvidia",
    "g5": "nvidia",
    "g6": "nvidia",
    "g6e": "nvidia",
    "gr6": "nvidia",
    # Intel Habana Gaudi.
    "dl1": "gaudi",
    # AWS Trainium / Inferentia 2 (Neuron SDK).
    "trn1": "neuron",
    "trn1n": "neuron",
    "trn2": "neuron",
    "inf2": "neuron",
}
"""Instance families that can train, and the accelerator each carries. ``dl2q`` (Qualcomm AI 100) is left out:
it is an inference-only part with no training stack and no container runtime path here."""

ACCELERATOR_FAMILIES: tuple[str, ...] = tuple(FAMILY_ACCELERATORS)
"""The family names alone, in table order (what settings validation offers)."""

NVIDIA_FAMILIES: tuple[str, ...] = tuple(sorted(f for f, a in FAMILY_ACCELERATORS.items() if a == "nvidia"))
"""The families that carry NVIDIA GPUs, by name (what a GPU worker fleet may run on)."""

VOLTA_FAMILIES = frozenset({"p3", "p3dn"})
"""Families whose GPUs (V100) newer NVIDIA drivers (590 and later) no longer support."""

GAUDI_SYNAPSE_VERSION = "1.21"
"""The Intel Gaudi software (SynapseAI) release of the Gaudi trainer image (``gaudi-docker/<version>.x/`` in
``images/trainer-gaudi.Dockerfile``; a test keeps them equal), the last release for first-generation Gaudi
(DL1). Habana's host driver must be of the container's SynapseAI release, so the training AMI is pinned to it
(``infra/training.py`` ``AMI_NAME_PATTERNS``) and the box checks its driver at boot."""


def accelerator_for(instance_type: str) -> Accelerator:
    """The accelerator of ``instance_type`` (``p3.2xlarge`` -> ``nvidia``); a ValueError says what to set."""
    family, dot, size = instance_type.partition(".")
    accelerator = FAMILY_ACCELERATORS.get(family) if dot and size else None
    if accelerator is None:
        families = ", ".join(ACCELERATOR_FAMILIES)
        raise ValueError(
            f"{INSTANCE_TYPE_SETTING}: {instance_type!r} is not an instance type tessera can train on. "
            f"Set it to a size of one of these GPU/accelerator families: {families} "
            "(for example p3.2xlarge for development, dl1.24xlarge for Gaudi)."
        )
    return accelerator
