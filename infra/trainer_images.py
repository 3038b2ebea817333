"""Which trainer image a training instance runs: one per accelerator its family carries.

PyPI's torch 2.13 is a CUDA 13 build: it runs on NVIDIA Turing and newer, but CUDA 13 dropped Volta (the V100
of p3 and p3dn), and it has no Habana bridge, so on a DL1 (Gaudi) it would train on the CPU. The registry
builds one trainer image per accelerator (:data:`VARIANT_IMAGES`, each from its own Dockerfile in
``images/``), and the training instance gets the one its instance family needs (:func:`trainer_variant`).
There is no Neuron (Trainium, Inferentia) trainer image: a ``trn``/``inf`` training instance is refused
when the stack is planned, not left to train on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, TypeVar

from infra.training import INSTANCE_TYPE_SETTING, VOLTA_FAMILIES, accelerator_for

T = TypeVar("T")
TrainerVariant = Literal["cuda13", "cuda12", "gaudi"]

TRAINER = "trainer"
"""The trainer service (its repository holds every variant)."""

VARIANT_IMAGES: dict[TrainerVariant, str] = {
    # PyPI's torch 2.13 (CUDA 13): Turing (g4dn), Ampere (p4d, g5), Ada (g6), Hopper (p5), Blackwell (p6).
    "cuda13": "trainer",
    # torch 2.10.0 (CUDA 12.8, the last PyPI build with sm_70 kernels): Volta (p3, p3dn).
    "cuda12": "trainer-cuda12",
    # Intel's SynapseAI 1.21 PyTorch image (torch 2.6 + habana_frameworks): first-generation Gaudi (dl1).
    "gaudi": "trainer-gaudi",
}
"""Each trainer variant and its image name (``images/<image>.Dockerfile``)."""

BUILT_VARIANTS: dict[str, tuple[str, ...]] = {TRAINER: ("cuda12", "gaudi")}
"""What the registry builds beside each service's own image (``RegistryArgs.variants``)."""


def trainer_variant(instance_type: str) -> TrainerVariant:
    """The trainer variant ``instance_type`` needs (``p3.2xlarge``: ``cuda12``; ``dl1.24xlarge``: ``gaudi``).

    A ValueError names :data:`infra.training.INSTANCE_TYPE_SETTING` and what to set instead.
    """
    accelerator = accelerator_for(instance_type)
    if accelerator == "gaudi":
        return "gaudi"
    if accelerator == "neuron":
        raise ValueError(
            f"{INSTANCE_TYPE_SETTING}: {instance_type!r} carries AWS Neuron (Trainium/Inferentia), and "
            "tessera builds no Neuron trainer image (torch-neuronx), so it would train on the CPU. Set it "
            "to an NVIDIA or Gaudi type (for example p3.2xlarge, g6.xlarge or dl1.24xlarge)."
        )
    return "cuda12" if instance_type.partition(".")[0] in VOLTA_FAMILIES else "cuda13"


def trainer_image_refs(image_refs: Mapping[str, T]) -> dict[str, T]:
    """Variant -> image reference, from the registry's references by image name."""
    return {variant: image_refs[image] for variant, image in VARIANT_IMAGES.items()}
