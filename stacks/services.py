"""The services the platform runs, and exactly what each may touch.

This table is the one place that says which queues, buckets (and key prefixes), secrets and log groups a
service uses; the program derives each service's IAM role, container environment and fleet from it, so a
permission cannot be granted without showing up here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BucketUse:
    """A bucket (by purpose) and the key prefix a service may use in it."""

    purpose: str
    prefix: str = ""


@dataclass(frozen=True)
class ServiceSpec:
    """One service: its image, where it runs and what it may touch."""

    name: str
    #: Runs on NVIDIA GPUs (CUDA base image, ``--gpus all``).
    gpu: bool
    #: Where it runs: "fleet" (an Auto Scaling group), "training" (the training instance) or "none" yet.
    runs_on: str
    consumes: tuple[str, ...] = ()
    sends: tuple[str, ...] = ()
    reads: tuple[BucketUse, ...] = ()
    writes: tuple[BucketUse, ...] = ()
    database: bool = False


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        "model-runner",
        gpu=True,
        runs_on="fleet",
        consumes=("image-requests", "region-requests"),
        sends=("region-requests",),
        reads=(BucketUse("imagery"), BucketUse("models")),
        writes=(BucketUse("results"),),
        database=True,
    ),
    ServiceSpec(
        "trainer",
        gpu=True,
        runs_on="training",
        consumes=("training-jobs",),
        reads=(BucketUse("datasets"), BucketUse("models")),
        writes=(BucketUse("models"), BucketUse("logs", "training/")),
        database=True,
    ),
    ServiceSpec(
        "sky-generator",
        gpu=True,
        runs_on="fleet",
        consumes=("sky-requests",),
        writes=(BucketUse("datasets", "sky/"),),
    ),
    ServiceSpec(
        "fits-classifier",
        gpu=False,
        runs_on="fleet",
        consumes=("fits-frames",),
        reads=(BucketUse("imagery", "fits/"), BucketUse("models")),
        writes=(BucketUse("results", "fits/"),),
        database=True,
    ),
    ServiceSpec(
        "sight-catalog",
        gpu=False,
        runs_on="none",
        sends=("training-jobs",),
        reads=(BucketUse("datasets"), BucketUse("models")),
        writes=(BucketUse("datasets", "catalog/"),),
        database=True,
    ),
)

SERVICE_NAMES: tuple[str, ...] = tuple(s.name for s in SERVICES)


def service(name: str) -> ServiceSpec:
    """The spec of one service by name."""
    for spec in SERVICES:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown service {name!r}; services are {', '.join(SERVICE_NAMES)}")


def env_name(kind: str, purpose: str) -> str:
    """The environment variable that carries one resource, e.g. ``TESSERA_QUEUE_IMAGE_REQUESTS_URL``."""
    return f"TESSERA_{kind.upper()}_{purpose.upper().replace('-', '_')}"
