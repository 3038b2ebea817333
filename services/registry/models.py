"""Registered models: ``register`` a trained model, find the ``latest`` of a name, ``resolve`` a reference.

A reference is ``"name"`` (the latest version) or ``"name:version"``. Names are 1-128 letters, digits,
``.``, ``_`` or ``-``, starting alphanumeric; versions count 1, 2, ... per name, given out by
:func:`register` under a per-name lock, so two trainers finishing together get two versions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from services.errors import UserError

if TYPE_CHECKING:  # the functions take a connection; only register needs psycopg itself (lazily: ~50 ms)
    import psycopg

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})(?::(?P<version>[0-9]{1,9}))?$")
_COLUMNS = "name, version, task, metrics, uri, job_id, created"


@dataclass(frozen=True)
class RegisteredModel:
    """One row of the registry."""

    name: str
    version: int
    task: str
    metrics: dict[str, Any]
    uri: str
    job_id: str | None
    created: datetime

    @property
    def ref(self) -> str:
        """``name:version``: the reference that always means this row."""
        return f"{self.name}:{self.version}"


def check_name(name: str) -> str:
    """``name`` if it is a valid model name; UserError saying what a name may hold otherwise."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise UserError(
            f"model name {name!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"name"`` -> ``(name, None)``; ``"name:3"`` -> ``(name, 3)``; anything else raises UserError."""
    match = _REF.match(ref) if isinstance(ref, str) else None
    if match is None:
        raise UserError(f"{ref!r} is not a model reference; write NAME or NAME:VERSION (e.g. ships:3)")
    version = match.group("version")
    return match.group("name"), int(version) if version is not None else None


def is_registry_ref(model: str) -> bool:
    """Whether ``model`` names a registry entry rather than a file: no scheme, no slash, no ``.onnx``."""
    return (
        "://" not in model
        and "/" not in model
        and not model.lower().endswith(".onnx")
        and _REF.match(model) is not None
    )


def register(
    conn: psycopg.Connection[Any],
    name: str,
    *,
    task: str,
    uri: str,
    metrics: Mapping[str, Any] | None = None,
    job_id: str | None = None,
) -> RegisteredModel:
    """Add the next version of ``name`` (1 for a new name) and return its row."""
    check_name(name)
    with conn.transaction():
        # Serialise version numbering per name; other names register concurrently.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('tessera.models'), hashtext(%s))", (name,))
        row = conn.execute(
            f"INSERT INTO models (name, version, task, metrics, uri, job_id)"
            f" SELECT %s, COALESCE(MAX(version), 0) + 1, %s, %s, %s, %s FROM models WHERE name = %s"
            f" RETURNING {_COLUMNS}",
            (name, task, _jsonb(dict(metrics or {})), uri, job_id, name),
        ).fetchone()
    assert row is not None
    return _model(row)


def _jsonb(value: dict[str, Any]) -> Any:
    from psycopg.types.json import Jsonb  # imported here: checking a name needs no database driver

    return Jsonb(value)


def latest(conn: psycopg.Connection[Any], name: str) -> RegisteredModel:
    """The newest version of ``name``; UserError when no model has that name."""
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM models WHERE name = %s ORDER BY version DESC LIMIT 1", (name,)
    ).fetchone()
    if row is None:
        raise UserError(_unknown(conn, name))
    return _model(row)


def list_versions(conn: psycopg.Connection[Any], name: str) -> list[RegisteredModel]:
    """Every version of ``name``, oldest first (empty for an unknown name)."""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM models WHERE name = %s ORDER BY version", (name,)).fetchall()
    return [_model(r) for r in rows]


def latest_of_each(conn: psycopg.Connection[Any]) -> list[RegisteredModel]:
    """The newest version of every registered name, by name."""
    rows = conn.execute(
        "SELECT DISTINCT ON (name) name, version, task, metrics, uri, job_id, created FROM models"
        " ORDER BY name, version DESC"
    ).fetchall()
    return [_model(r) for r in rows]


def resolve(conn: psycopg.Connection[Any], ref: str) -> RegisteredModel:
    """The row ``"name"`` (latest) or ``"name:version"`` means; UserError for an unknown name or version."""
    name, version = parse_ref(ref)
    if version is None:
        return latest(conn, name)
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM models WHERE name = %s AND version = %s", (name, version)
    ).fetchone()
    if row is None:
        versions = [m.version for m in list_versions(conn, name)]
        if not versions:
            raise UserError(_unknown(conn, name))
        raise UserError(
            f"model {name} has no version {version}; its versions are {', '.join(map(str, versions))}"
        )
    return _model(row)


def resolve_model_uri(conn: psycopg.Connection[Any], ref: str) -> str:
    """The URI to load for ``ref``: a registry reference resolves to its model's URI; a path, ``file://``
    or ``s3://`` URI (or any ``*.onnx``) is returned as it is."""
    if not is_registry_ref(ref):
        return ref
    return resolve(conn, ref).uri


def _unknown(conn: psycopg.Connection[Any], name: str) -> str:
    names = [r[0] for r in conn.execute("SELECT DISTINCT name FROM models ORDER BY name LIMIT 20").fetchall()]
    known = f"registered models: {', '.join(names)}" if names else "the registry is empty"
    return f"no model named {name!r} in the registry ({known}); train one with --register {name}"


def _model(row: tuple[Any, ...]) -> RegisteredModel:
    name, version, task, metrics, uri, job_id, created = row
    return RegisteredModel(
        name=name,
        version=int(version),
        task=task,
        metrics=dict(metrics or {}),
        uri=uri,
        job_id=job_id,
        created=created,
    )
