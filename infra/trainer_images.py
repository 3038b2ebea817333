"""Which trainer image a training instance runs: one per accelerator its family carries.

PyPI's torch 2.13 is a CUDA 13 build: it runs on NVIDIA Turing and newer, but CUDA 13 dropped Volta (the V100
of p3 and p3dn), and it has no Habana bridge, so on a DL1 (Gaudi) it would train on the CPU. The registry
builds one trainer image per accelerator (:data:`VARIANT_IMAGES`, each from its own Dockerfile in
``images/``), and the training instance gets the one its instance family needs (:func:`trainer_variant`).
There is no Neuron (Trainium, Inferentia) trainer image: a ``trn``/``inf`` training instance is refused
when the stack is planned, not left to train on the CPU.

A stack builds only the variants it needs (:func:`variants_to_build`): the Gaudi image alone is several GB,
so a stack that trains on a p3 should not build and push it on every first ``pulumi up``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, TypeVar, get_args

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

ALL_VARIANTS: tuple[TrainerVariant, ...] = get_args(TrainerVariant)
"""Every trainer variant, in the order stacks list them."""

VARIANTS_SETTING = "tessera:trainerVariants"
"""The data layer's setting that names the variants it builds (``stacks/settings.py`` reads it)."""
IMAGE_REFS_SETTING = "tessera:imageRefs"
"""Images built elsewhere and pinned by digest: a pinned variant is available without being built."""


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


def variants_to_build(
    configured: Iterable[str], training_instance_type: str | None
) -> tuple[TrainerVariant, ...]:
    """The trainer variants a data layer makes available, in :data:`ALL_VARIANTS` order.

    ``configured`` (:data:`VARIANTS_SETTING`) wins when given. Otherwise a stack that also holds the compute
    layer passes its ``training_instance_type`` and gets that type's variant alone; a data-only stack
    (``None``) cannot know what its compute stacks train on and gets every variant. A ValueError names the
    setting when ``configured`` holds a name that is not a variant.
    """
    wanted = list(configured)
    unknown = [name for name in wanted if name not in ALL_VARIANTS]
    if unknown:
        raise ValueError(
            f"{VARIANTS_SETTING}: unknown trainer variant(s) {', '.join(map(repr, unknown))}; "
            f"use some of {', '.join(ALL_VARIANTS)}"
        )
    if not wanted:
        if training_instance_type is None:
            return ALL_VARIANTS
        wanted = [trainer_variant(training_instance_type)]
    return tuple(v for v in ALL_VARIANTS if v in wanted)


def available_variants(
    built: Iterable[TrainerVariant], pinned_images: Iterable[str]
) -> tuple[TrainerVariant, ...]:
    """The variants a data layer exports: those it builds, and those pinned by digest
    (:data:`IMAGE_REFS_SETTING`)."""
    have = set(built) | {v for v, image in VARIANT_IMAGES.items() if image in set(pinned_images)}
    return tuple(v for v in ALL_VARIANTS if v in have)


def registry_variants(
    variants: Iterable[TrainerVariant],
) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """``RegistryArgs.variants`` and ``RegistryArgs.variants_only`` for a trainer with these ``variants``.

    The CUDA 13 trainer is the service's own image (``images/trainer.Dockerfile``): without it the trainer
    repository holds only its variants.
    """
    wanted = set(variants)
    suffixes = tuple(v for v in ALL_VARIANTS if v in wanted and VARIANT_IMAGES[v] != TRAINER)
    own = any(VARIANT_IMAGES[v] == TRAINER for v in wanted)
    return {TRAINER: suffixes}, (() if own else (TRAINER,))


def trainer_image_refs(image_refs: Mapping[str, T], variants: Iterable[TrainerVariant]) -> dict[str, T]:
    """Variant -> image reference for ``variants``, from the registry's references by image name."""
    return {variant: image_refs[VARIANT_IMAGES[variant]] for variant in variants}


def missing_variant_message(variant: TrainerVariant, instance_type: str, available: Iterable[str]) -> str:
    """Why a compute layer cannot run ``instance_type``: its data layer has no ``variant`` trainer image."""
    have = ", ".join(available) or "none"
    return (
        f"{INSTANCE_TYPE_SETTING}: {instance_type!r} needs the {variant!r} trainer image "
        f"({VARIANT_IMAGES[variant]}), which the data layer neither built nor pinned (it has: {have}). "
        f"On the data stack, add {variant} to the list {VARIANTS_SETTING} or pin its digest with "
        f"{IMAGE_REFS_SETTING}.{VARIANT_IMAGES[variant]}, and run pulumi up there first; or pick a training "
        "type whose variant it has."
    )
