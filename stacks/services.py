"""The services the platform runs, and exactly what each may touch.

This table is the one place that says which queues, buckets (and key prefixes), database schemas and log
groups a service uses; the program derives each service's IAM role, container environment, fleet and
database user from it, so a permission cannot be granted without showing up here.

Database schemas are named after the service package whose ``migrations`` create their tables
(``model_runner``, ``registry``, ``sight_catalog``...); the database bootstrap (``DATABASE_BOOTSTRAP``)
applies the migrations into them and grants each service's user exactly what its :class:`DatabaseUse` lists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class BucketUse:
    """A bucket (by purpose) and the key prefix a service may use in it."""

    purpose: str
    prefix: str = ""


@dataclass(frozen=True)
class DatabaseUse:
    """A service's own database user (IAM-authenticated) and the schemas it may use.

    ``writes``: schemas whose tables it reads and writes (SELECT, INSERT, UPDATE, DELETE; sequences);
    ``reads``: schemas whose tables it only reads. No user may create, alter or drop anything.
    """

    user: str
    writes: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (self.user, *self.writes, *self.reads):
            if not _IDENTIFIER.match(name):
                raise ValueError(f"database name {name!r}: use lowercase letters, digits and underscores")
        if set(self.writes) & set(self.reads):
            raise ValueError(f"{self.user}: a schema is listed in both writes and reads")

    @property
    def search_path(self) -> tuple[str, ...]:
        """Where the user's unqualified table names resolve: its own schemas first, then what it reads."""
        return (*self.writes, *self.reads)

    def as_input(self) -> dict[str, Any]:
        """The user as the database bootstrap reads it (its invocation's input)."""
        return {"user": self.user, "writes": list(self.writes), "reads": list(self.reads)}


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
    #: Its database user and schemas; None: no database access at all.
    database: DatabaseUse | None = None


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        "model-runner",
        gpu=True,
        runs_on="fleet",
        consumes=("image-requests", "region-requests"),
        sends=("region-requests",),
        reads=(BucketUse("imagery"), BucketUse("models")),
        writes=(BucketUse("results"),),
        # Its jobs and regions; model names resolve through the registry, which the trainer writes.
        database=DatabaseUse("model_runner", writes=("model_runner",), reads=("registry",)),
    ),
    ServiceSpec(
        "trainer",
        gpu=True,
        runs_on="training",
        consumes=("training-jobs",),
        reads=(BucketUse("datasets"), BucketUse("models")),
        writes=(BucketUse("models"), BucketUse("logs", "training/")),
        database=DatabaseUse("trainer", writes=("trainer", "registry")),
    ),
    ServiceSpec(
        "sky-generator",
        # Stellarium renders with Mesa's software OpenGL: a CPU fleet (stacks/settings.py DEFAULT_FLEETS).
        gpu=False,
        runs_on="fleet",
        # Job messages fan out as shard messages on the same queue.
        consumes=("sky-requests",),
        sends=("sky-requests",),
        # It reads back the manifest parts its shards wrote, to merge them.
        reads=(BucketUse("datasets", "sky/"),),
        writes=(BucketUse("datasets", "sky/"),),
        # Its jobs and shards.
        database=DatabaseUse("sky_generator", writes=("sky_generator",)),
    ),
    ServiceSpec(
        "fits-classifier",
        gpu=False,
        runs_on="fleet",
        consumes=("fits-frames",),
        reads=(BucketUse("imagery", "fits/"), BucketUse("models")),
        writes=(BucketUse("results", "fits/"),),
        # Its verdicts (services/fits_classifier/migrations/), and nothing else.
        database=DatabaseUse("fits_classifier", writes=("fits_classifier",)),
    ),
    ServiceSpec(
        "sight-catalog",
        gpu=False,
        # Fleets of its own (infra/catalog.py): the API (`tessera sights serve`) behind an internal load
        # balancer, scaled on CPU, and the refresher (`tessera worker sight-catalog`), one instance.
        runs_on="fleet",
        # A city's model is trained by the trainer, on a job the catalog sends.
        sends=("training-jobs",),
        # Its images and the training sets it exports live under catalog/ (services/sight_catalog/warehouse.py
        # KEY_PREFIX); the models bucket holds the models it lists.
        reads=(BucketUse("datasets", "catalog/"), BucketUse("models")),
        writes=(BucketUse("datasets", "catalog/"),),
        # Its warehouse; the registry is read to learn of the models the trainer registered per city.
        database=DatabaseUse("sight_catalog", writes=("sight_catalog",), reads=("registry",)),
    ),
)

SERVICE_NAMES: tuple[str, ...] = tuple(s.name for s in SERVICES)

#: The one-shot that alone reads the database master secret: it creates the users of ``SERVICES``, applies
#: the migrations and grants (its image is ``images/db-bootstrap.Dockerfile``; it is not a service).
DATABASE_BOOTSTRAP = "db-bootstrap"


def database_users() -> list[dict[str, Any]]:
    """Every service's database user and grants, as the bootstrap reads them."""
    return [s.database.as_input() for s in SERVICES if s.database is not None]


def service(name: str) -> ServiceSpec:
    """The spec of one service by name."""
    for spec in SERVICES:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown service {name!r}; services are {', '.join(SERVICE_NAMES)}")


def env_name(kind: str, purpose: str) -> str:
    """The environment variable that carries one resource, e.g. ``TESSERA_QUEUE_IMAGE_REQUESTS_URL``."""
    return f"TESSERA_{kind.upper()}_{purpose.upper().replace('-', '_')}"
