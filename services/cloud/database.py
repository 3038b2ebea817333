"""PostgreSQL: where to connect (from the environment) and the schema migrations of every service.

On the platform a service gets ``TESSERA_DB_HOST``, ``TESSERA_DB_PORT``, ``TESSERA_DB_NAME`` and
``TESSERA_DB_USER``: it logs in as its own user with an IAM authentication token, made afresh for every
connection (tokens last 15 minutes) over TLS; no service knows a password. Locally, and in tests,
``TESSERA_DB_URL`` (a libpq URI) takes precedence.

Migrations are ``services/<service>/migrations/NNN_name.sql`` files; each is applied once, in a transaction,
and recorded in ``schema_migrations``. An advisory lock makes workers that start together apply them once.
On the platform the database bootstrap (``services/cloud/database_roles.py``) applies them, each service's
into a schema of its own, and the services' users may not change the schema: there,
:func:`apply_migrations` leaves it alone.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from services.errors import UserError

log = logging.getLogger(__name__)

#: Where the service packages live; each may hold a ``migrations`` folder.
SERVICES_ROOT = Path(__file__).resolve().parent.parent
_MIGRATION = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
#: An arbitrary, fixed key for ``pg_advisory_xact_lock``: only migrations take it.
_MIGRATIONS_LOCK = 0x7E55E4A


def database_url(env: Mapping[str, str] | None = None) -> str:
    """The libpq connection string from the environment.

    ``TESSERA_DB_URL`` wins; otherwise host, port, name and user come from ``TESSERA_DB_HOST/PORT/NAME/USER``
    with TLS required (as RDS enforces) and no password: :func:`connect` adds an IAM token.
    """
    env = os.environ if env is None else env
    if env.get("TESSERA_DB_URL"):
        return env["TESSERA_DB_URL"]
    missing = [k for k in ("TESSERA_DB_HOST", "TESSERA_DB_USER") if not env.get(k)]
    if missing:
        raise UserError(
            f"no database configured: set TESSERA_DB_URL (e.g. postgresql://user:pass@host/db), or "
            f"{' and '.join(missing)} with TESSERA_DB_PORT and TESSERA_DB_NAME as the platform does"
        )
    return make_conninfo(
        host=env["TESSERA_DB_HOST"],
        port=env.get("TESSERA_DB_PORT", "5432"),
        dbname=env.get("TESSERA_DB_NAME", "tessera"),
        user=env["TESSERA_DB_USER"],
        sslmode="require",
    )


def configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment names a database (``TESSERA_DB_URL``, or ``TESSERA_DB_HOST`` as the platform
    sets it)."""
    env = os.environ if env is None else env
    return bool(env.get("TESSERA_DB_URL") or env.get("TESSERA_DB_HOST"))


def uses_iam_authentication(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a platform service: ``TESSERA_DB_USER`` is set (only the platform sets it).

    Such a process logs in as that user with IAM tokens and never applies migrations: the database
    bootstrap did, and the user may not change the schema.
    """
    env = os.environ if env is None else env
    return bool(env.get("TESSERA_DB_USER"))


def _needs_token(conninfo: str, env: Mapping[str, str]) -> bool:
    # The service's own user without a password: the platform's connection string, whether it came from
    # TESSERA_DB_HOST/USER or was handed on as TESSERA_DB_URL (the trainer's training processes).
    params = conninfo_to_dict(conninfo)
    return (
        uses_iam_authentication(env)
        and "password" not in params
        and params.get("user") == env["TESSERA_DB_USER"]
    )


def iam_auth_token(conninfo: str, env: Mapping[str, str] | None = None, *, rds_client: Any = None) -> str:
    """A fresh IAM authentication token (valid 15 minutes) for the host, port and user of ``conninfo``."""
    env = os.environ if env is None else env
    params = conninfo_to_dict(conninfo)
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if rds_client is None:
        import boto3

        rds_client = boto3.client("rds", region_name=region)
    token: str = rds_client.generate_db_auth_token(
        DBHostname=params["host"],
        Port=int(params.get("port") or 5432),
        DBUsername=params["user"],
        Region=region or rds_client.meta.region_name,
    )
    return token


def connect(
    url: str | None = None,
    *,
    autocommit: bool = True,
    env: Mapping[str, str] | None = None,
    rds_client: Any = None,
) -> psycopg.Connection[Any]:
    """A connection (autocommit by default: multi-statement work opens ``conn.transaction()`` itself).

    A platform service's connection string carries no password: each connection gets a new IAM token.
    """
    env = os.environ if env is None else env
    url = url or database_url(env)
    if _needs_token(url, env):
        token = iam_auth_token(url, env, rds_client=rds_client)
        return psycopg.connect(url, autocommit=autocommit, password=token)
    return psycopg.connect(url, autocommit=autocommit)


@dataclass(frozen=True)
class Migration:
    """One migration file: ``name`` (``service/NNN_x.sql``) is what ``schema_migrations`` records."""

    name: str
    path: Path

    @property
    def package(self) -> str:
        """The service package whose tables it creates (the schema the bootstrap applies it in)."""
        return self.name.split("/", 1)[0]


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
    """Apply the migrations not applied yet, each once, in its own transaction; returns the names applied.

    A platform service (:func:`uses_iam_authentication`) applies nothing: the database bootstrap applies the
    migrations, and a service's user may not change the schema.
    """
    if uses_iam_authentication():
        log.info("migrations are the database bootstrap's on the platform; applying none")
        return []
    return migrate(conn, files)


def migrate(
    conn: psycopg.Connection[Any], files: list[Migration] | None = None, *, schemas: bool = False
) -> list[str]:
    """Apply the migrations not applied yet, unconditionally (see :func:`apply_migrations`).

    With ``schemas``, each migration runs in the schema named after its package (created when missing), so
    that a service's tables can be granted schema by schema; otherwise every table lands in ``public``.
    """
    files = migrations() if files is None else files
    applied: list[str] = []
    with conn.transaction():
        # Workers that start together would race on CREATE TABLE IF NOT EXISTS without the lock.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATIONS_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS public.schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
    for migration in files:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATIONS_LOCK,))
            done = conn.execute(
                "SELECT 1 FROM public.schema_migrations WHERE name = %s", (migration.name,)
            ).fetchone()
            if done:
                continue
            if schemas:
                schema = sql.Identifier(migration.package)
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
                conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(schema))
            conn.execute(migration.path.read_bytes())
            conn.execute("INSERT INTO public.schema_migrations (name) VALUES (%s)", (migration.name,))
            applied.append(migration.name)
    return applied
