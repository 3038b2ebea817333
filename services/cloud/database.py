"""PostgreSQL: where to connect (from the environment) and the schema migrations of every service.

On the platform a service gets ``TESSERA_DB_HOST``, ``TESSERA_DB_PORT``, ``TESSERA_DB_NAME`` and
``TESSERA_DB_SECRET_ARN`` (the Secrets Manager secret RDS manages, holding ``{"username", "password"}``);
locally, and in tests, ``TESSERA_DB_URL`` (a libpq URI) takes precedence.

Migrations are ``services/<service>/migrations/NNN_name.sql`` files; each is applied once, in a transaction,
and recorded in ``schema_migrations``. An advisory lock makes workers that start together apply them once.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from services.errors import UserError

#: Where the service packages live; each may hold a ``migrations`` folder.
SERVICES_ROOT = Path(__file__).resolve().parent.parent
_MIGRATION = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
#: An arbitrary, fixed key for ``pg_advisory_xact_lock``: only migrations take it.
_MIGRATIONS_LOCK = 0x7E55E4A


def database_url(env: Mapping[str, str] | None = None, *, secrets_client: Any = None) -> str:
    """The libpq connection string from the environment.

    ``TESSERA_DB_URL`` wins; otherwise host, port and name come from ``TESSERA_DB_HOST/PORT/NAME`` and the
    user and password from the secret named by ``TESSERA_DB_SECRET_ARN`` (TLS required, as RDS enforces).
    """
    env = os.environ if env is None else env
    if env.get("TESSERA_DB_URL"):
        return env["TESSERA_DB_URL"]
    missing = [k for k in ("TESSERA_DB_HOST", "TESSERA_DB_SECRET_ARN") if not env.get(k)]
    if missing:
        raise UserError(
            f"no database configured: set TESSERA_DB_URL (e.g. postgresql://user:pass@host/db), or "
            f"{' and '.join(missing)} with TESSERA_DB_PORT and TESSERA_DB_NAME as the platform does"
        )
    if secrets_client is None:
        import boto3

        secrets_client = boto3.client("secretsmanager")
    secret = json.loads(
        secrets_client.get_secret_value(SecretId=env["TESSERA_DB_SECRET_ARN"])["SecretString"]
    )
    return make_conninfo(
        host=env["TESSERA_DB_HOST"],
        port=env.get("TESSERA_DB_PORT", "5432"),
        dbname=env.get("TESSERA_DB_NAME", "tessera"),
        user=secret["username"],
        password=secret["password"],
        sslmode="require",
    )


def connect(url: str | None = None, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    """A connection (autocommit by default: multi-statement work opens ``conn.transaction()`` itself)."""
    return psycopg.connect(url or database_url(), autocommit=autocommit)


@dataclass(frozen=True)
class Migration:
    """One migration file: ``name`` (``service/NNN_x.sql``) is what ``schema_migrations`` records."""

    name: str
    path: Path


def migrations(root: Path = SERVICES_ROOT) -> list[Migration]:
    """Every ``<service>/migrations/NNN_*.sql`` under ``root``, by service then number.

    A file in a migrations folder whose name does not match ``NNN_lowercase_name.sql`` raises ValueError,
    so a misnamed migration is never silently skipped.
    """
    found: list[Migration] = []
    for folder in sorted(root.glob("*/migrations")):
        for path in sorted(folder.glob("*.sql")):
            if not _MIGRATION.match(path.name):
                raise ValueError(f"{path}: migration files are named NNN_lowercase_name.sql")
            found.append(Migration(f"{folder.parent.name}/{path.name}", path))
    return found


def apply_migrations(conn: psycopg.Connection[Any], files: list[Migration] | None = None) -> list[str]:
    """Apply the migrations not applied yet, each once, in its own transaction; returns the names applied."""
    files = migrations() if files is None else files
    applied: list[str] = []
    with conn.transaction():
        # Workers that start together would race on CREATE TABLE IF NOT EXISTS without the lock.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATIONS_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
    for migration in files:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATIONS_LOCK,))
            done = conn.execute(
                "SELECT 1 FROM schema_migrations WHERE name = %s", (migration.name,)
            ).fetchone()
            if done:
                continue
            conn.execute(migration.path.read_bytes())
            conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (migration.name,))
            applied.append(migration.name)
    return applied
