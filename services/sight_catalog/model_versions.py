"""A city's models in the warehouse (``sight_models``): each gets the next version of its city and starts
TRAINING (at most one at a time: a unique index), and ends READY or FAILED, once."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from services.errors import UserError


@dataclass(frozen=True)
class Model:
    """A city's model: TRAINING, READY (registered as ``registry_name`` v``registry_version``) or FAILED."""

    id: int
    city_id: int
    version: int
    status: str
    training_job_id: str
    dataset: str
    classes: list[str]
    images: int
    registry_name: str
    registry_version: int | None
    model_uri: str | None
    metrics: dict[str, Any]
    reason: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


def next_model_version(conn: psycopg.Connection[Any], city_id: int) -> int:
    """The version the city's next model gets (1 for its first)."""
    row = conn.execute(
        "SELECT coalesce(max(version), 0) + 1 FROM sight_models WHERE city_id = %s", (city_id,)
    ).fetchone()
    return int(row[0]) if row else 1


def start_model(
    conn: psycopg.Connection[Any],
    city_id: int,
    *,
    training_job_id: str,
    dataset: str,
    classes: Sequence[str],
    images: int,
    registry_name: str,
) -> Model:
    """Record the city's next model version as TRAINING (its job is about to be queued).

    UserError when the city has a model training already (one at a time), when the job id was recorded
    before, or when the city does not exist.
    """
    for _ in range(5):
        try:
            with conn.transaction():
                row = conn.execute(
                    "INSERT INTO sight_models (city_id, version, status, training_job_id, dataset, classes,"
                    " images, registry_name)"
                    " SELECT %s, coalesce(max(version), 0) + 1, 'TRAINING', %s, %s, %s, %s, %s"
                    " FROM sight_models WHERE city_id = %s"
                    " RETURNING id, city_id, version, status, training_job_id, dataset, classes, images,"
                    " registry_name, registry_version, model_uri, metrics, reason, created_at, updated_at",
                    (city_id, training_job_id, dataset, Jsonb(list(classes)), images, registry_name, city_id),
                ).fetchone()
        except psycopg.errors.ForeignKeyViolation:
            raise UserError(f"no city with id {city_id}") from None
        except psycopg.errors.UniqueViolation as exc:
            constraint = exc.diag.constraint_name or ""
            if constraint == "sight_models_one_training":
                training = training_model(conn, city_id)
                version = f" (version {training.version}, job {training.training_job_id})" if training else ""
                raise UserError(
                    f"city {city_id} has a model training already{version}; wait for it to finish"
                ) from None
            if "training_job_id" in constraint:
                raise UserError(f"training job {training_job_id!r} is recorded already") from None
            continue  # another version was taken meanwhile: count again
        assert row is not None
        return Model(*row)
    raise UserError(f"could not number the next model of city {city_id}; try again")


def get_model(conn: psycopg.Connection[Any], model_id: int) -> Model:
    """The model with id ``model_id``; UserError when there is none."""
    row = conn.execute(
        "SELECT id, city_id, version, status, training_job_id, dataset, classes, images, registry_name,"
        " registry_version, model_uri, metrics, reason, created_at, updated_at FROM sight_models"
        " WHERE id = %s",
        (model_id,),
    ).fetchone()
    if row is None:
        raise UserError(f"no sight model with id {model_id}")
    return Model(*row)


def model_for_job(conn: psycopg.Connection[Any], training_job_id: str) -> Model | None:
    """The model the training job ``training_job_id`` trains, or None."""
    row = conn.execute(
        "SELECT id, city_id, version, status, training_job_id, dataset, classes, images, registry_name,"
        " registry_version, model_uri, metrics, reason, created_at, updated_at FROM sight_models"
        " WHERE training_job_id = %s",
        (training_job_id,),
    ).fetchone()
    return None if row is None else Model(*row)


def mark_model_ready(
    conn: psycopg.Connection[Any],
    model_id: int,
    *,
    registry_version: int,
    model_uri: str,
    metrics: dict[str, Any] | None = None,
) -> Model:
    """TRAINING -> READY, with where the registry holds it. Marking it READY again changes nothing; a
    FAILED model cannot become READY (UserError)."""
    row = conn.execute(
        "UPDATE sight_models SET status = 'READY', registry_version = %s, model_uri = %s, metrics = %s,"
        " reason = NULL, updated_at = now() WHERE id = %s AND status = 'TRAINING'"
        " RETURNING id, city_id, version, status, training_job_id, dataset, classes, images, registry_name,"
        " registry_version, model_uri, metrics, reason, created_at, updated_at",
        (registry_version, model_uri, Jsonb(metrics or {}), model_id),
    ).fetchone()
    if row is not None:
        return Model(*row)
    model = get_model(conn, model_id)
    if model.status == "READY" and model.registry_version == registry_version:
        return model
    raise UserError(
        f"model version {model.version} of city {model.city_id} is {model.status}; only a TRAINING model"
        " can become READY"
    )


def mark_model_failed(conn: psycopg.Connection[Any], model_id: int, reason: str) -> Model:
    """TRAINING -> FAILED with ``reason``. Failing it again changes nothing; a READY model cannot fail
    (UserError)."""
    row = conn.execute(
        "UPDATE sight_models SET status = 'FAILED', reason = %s, updated_at = now()"
        " WHERE id = %s AND status = 'TRAINING'"
        " RETURNING id, city_id, version, status, training_job_id, dataset, classes, images, registry_name,"
        " registry_version, model_uri, metrics, reason, created_at, updated_at",
        (reason[:4000], model_id),
    ).fetchone()
    if row is not None:
        return Model(*row)
    model = get_model(conn, model_id)
    if model.status == "FAILED":
        return model
    raise UserError(
        f"model version {model.version} of city {model.city_id} is {model.status}; only a TRAINING model"
        " can fail"
    )


def ready_model(conn: psycopg.Connection[Any], city_id: int) -> Model | None:
    """The city's newest READY model (what recognitions use), or None."""
    row = conn.execute(
        "SELECT id, city_id, version, status, training_job_id, dataset, classes, images, registry_name,"
        " registry_version, model_uri, metrics, reason, created_at, updated_at FROM sight_models"
        " WHERE city_id = %s AND status = 'READY' ORDER BY version DESC LIMIT 1",
        (city_id,),
    ).fetchone()
    return None if row is None else Model(*row)


def training_model(conn: psycopg.Connection[Any], city_id: int) -> Model | None:
    """The city's model in training, or None."""
    row = conn.execute(
        "SELECT id, city_id, version, status, training_job_id, dataset, classes, images, registry_name,"
        " registry_version, model_uri, metrics, reason, created_at, updated_at FROM sight_models"
        " WHERE city_id = %s AND status = 'TRAINING'",
        (city_id,),
    ).fetchone()
    return None if row is None else Model(*row)


def list_models(conn: psycopg.Connection[Any], city_id: int) -> list[Model]:
    """The city's models, newest version first."""
    rows = conn.execute(
        "SELECT id, city_id, version, status, training_job_id, dataset, classes, images, registry_name,"
        " registry_version, model_uri, metrics, reason, created_at, updated_at FROM sight_models"
        " WHERE city_id = %s ORDER BY version DESC",
        (city_id,),
    ).fetchall()
    return [Model(*row) for row in rows]


def training_models(conn: psycopg.Connection[Any]) -> list[Model]:
    """Every city's model in training (at most one per city), oldest first."""
    rows = conn.execute(
        "SELECT id, city_id, version, status, training_job_id, dataset, classes, images, registry_name,"
        " registry_version, model_uri, metrics, reason, created_at, updated_at FROM sight_models"
        " WHERE status = 'TRAINING' ORDER BY created_at, id"
    ).fetchall()
    return [Model(*row) for row in rows]
