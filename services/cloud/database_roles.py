"""The database bootstrap: one login per service, every migration applied, and exactly the grants each needs.

This is the only code that connects as the RDS master user. On the platform it runs as a Lambda function
(:func:`handler`, invoked by `pulumi up` with the users and grants of ``stacks/services.py`` as its input);
locally and in tests :func:`bootstrap` runs over any psycopg connection with the right to create roles.

What it leaves behind:

- each service package's migrations applied in a schema named after the package (``model_runner``,
  ``registry``, ``sight_catalog``...), owned by the master user, so no service may create, alter or drop
  anything;
- one role per service user, ``LOGIN`` and a member of ``rds_iam`` (RDS then accepts only IAM tokens for
  it; where that role does not exist, as on a local server, the grant is skipped);
- on the schemas a user ``writes``: USAGE, and SELECT/INSERT/UPDATE/DELETE on their tables and use of
  their sequences; on the schemas it ``reads``: USAGE and SELECT; on every other schema: nothing (grants
  from an earlier run that the table no longer lists are revoked);
- the user's ``search_path`` in this database set to its schemas, so services keep unqualified table names.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from services.cloud.database import Migration, migrate, migrations

log = logging.getLogger(__name__)

#: The RDS role whose members log in with IAM authentication tokens instead of passwords.
IAM_ROLE = "rds_iam"
#: The environment variable naming the Secrets Manager secret RDS keeps the master user's password in.
MASTER_SECRET_ENV = "TESSERA_DB_MASTER_SECRET_ARN"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
WRITE_TABLE_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"


@dataclass(frozen=True)
class DatabaseUser:
    """One service's login and the schemas it may use."""

    user: str
    writes: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (self.user, *self.writes, *self.reads):
            if not _NAME.match(name):
                raise ValueError(
                    f"database user {self.user!r}: {name!r} is not a plain name; use lowercase letters, "
                    "digits and underscores, starting with a letter"
                )
        if self.user == "public" or "public" in self.writes + self.reads:
            raise ValueError(f"database user {self.user!r}: the public schema is not granted to services")

    @property
    def schemas(self) -> tuple[str, ...]:
        """Every schema the user may see: its own first, then the ones it reads."""
        return (*self.writes, *self.reads)


def users_from_input(document: Mapping[str, Any]) -> list[DatabaseUser]:
    """The users of the bootstrap's input, ``{"users": [{"user", "writes", "reads"}, ...]}``."""
    raw = document.get("users")
    if not isinstance(raw, list):
        raise ValueError('the bootstrap input needs "users": a list of {"user", "writes", "reads"}')
    users = [
        DatabaseUser(str(u["user"]), tuple(u.get("writes") or ()), tuple(u.get("reads") or ())) for u in raw
    ]
    names = [u.user for u in users]
    if len(set(names)) != len(names):
        raise ValueError(f"the bootstrap input names a user twice: {names}")
    return users


def _role_exists(conn: psycopg.Connection[Any], role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def ensure_role(conn: psycopg.Connection[Any], user: str, iam_role: str = IAM_ROLE) -> None:
    """Create ``user`` as a plain login (no superuser, database or role creation), in ``iam_role`` if any.

    On a second run the role exists: only a superuser may even name SUPERUSER, REPLICATION or BYPASSRLS in
    ``ALTER ROLE``, and the RDS master is not one, so those are checked instead of set.
    """
    role = sql.Identifier(user)
    row = conn.execute(
        "SELECT rolsuper, rolreplication, rolbypassrls, rolcanlogin, rolcreatedb, rolcreaterole"
        " FROM pg_roles WHERE rolname = %s",
        (user,),
    ).fetchone()
    if row is None:
        attributes = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
        conn.execute(sql.SQL("CREATE ROLE {} " + attributes).format(role))
    else:
        superuser, replication, bypassrls, can_login, createdb, createrole = row
        if superuser or replication or bypassrls:
            raise ValueError(
                f"database role {user!r} exists with SUPERUSER, REPLICATION or BYPASSRLS; a service "
                f"login must have none: have a superuser run ALTER ROLE {user} NOSUPERUSER NOREPLICATION "
                "NOBYPASSRLS"
            )
        # Name only what must change: each attribute named needs that attribute of the one who alters.
        changes = [
            name
            for name, wrong in (
                ("LOGIN", not can_login),
                ("NOCREATEDB", createdb),
                ("NOCREATEROLE", createrole),
            )
            if wrong
        ]
        if changes:
            conn.execute(sql.SQL("ALTER ROLE {} " + " ".join(changes)).format(role))
    if _role_exists(conn, iam_role):
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(iam_role), role))


def grant(conn: psycopg.Connection[Any], user: DatabaseUser, managed_schemas: Iterable[str]) -> None:
    """Make ``user``'s privileges on ``managed_schemas`` exactly what it lists (revoke, then grant)."""
    role = sql.Identifier(user.user)
    for schema in managed_schemas:
        s = sql.Identifier(schema)
        conn.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(s, role))
        conn.execute(sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(s, role))
        conn.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM {}").format(s, role))
    database = sql.Identifier(conn.info.dbname)
    conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(database, role))
    for schema in user.writes:
        s = sql.Identifier(schema)
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, role))
        conn.execute(
            sql.SQL("GRANT " + WRITE_TABLE_PRIVILEGES + " ON ALL TABLES IN SCHEMA {} TO {}").format(s, role)
        )
        conn.execute(
            sql.SQL("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA {} TO {}").format(s, role)
        )
    for schema in user.reads:
        s = sql.Identifier(schema)
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, role))
        conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, role))
        conn.execute(sql.SQL("GRANT SELECT ON ALL SEQUENCES IN SCHEMA {} TO {}").format(s, role))
    path = sql.SQL(", ").join(sql.Identifier(s) for s in user.schemas) if user.schemas else sql.SQL("''")
    conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} SET search_path TO ").format(role, database) + path)


_CREATED_TABLE = re.compile(r"\bCREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?([a-z_][a-z0-9_]*)\s*\(", re.I)


def adopt_public_tables(conn: psycopg.Connection[Any], files: Sequence[Migration]) -> list[str]:
    """Move the tables that deployments before per-service schemas created in ``public`` into their
    package's schema (with their indexes and owned sequences), so that recorded migrations stay true.

    A package qualifies when its schema does not exist yet and ``public.schema_migrations`` already records
    one of its migrations. Returns ``schema.table`` for every table moved.
    """
    recorded = conn.execute("SELECT to_regclass('public.schema_migrations') IS NOT NULL").fetchone()
    if not recorded or not recorded[0]:
        return []
    done = {r[0] for r in conn.execute("SELECT name FROM public.schema_migrations")}
    moved: list[str] = []
    with conn.transaction():
        for package in sorted({m.package for m in files}):
            ours = [m for m in files if m.package == package]
            exists = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (package,)).fetchone()
            if exists or not any(m.name in done for m in ours):
                continue
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(package)))
            for migration in ours:
                for table in _CREATED_TABLE.findall(migration.path.read_text(encoding="utf-8")):
                    found = conn.execute("SELECT to_regclass(%s)", (f"public.{table}",)).fetchone()
                    if found and found[0] is not None:
                        conn.execute(
                            sql.SQL("ALTER TABLE public.{} SET SCHEMA {}").format(
                                sql.Identifier(table.lower()), sql.Identifier(package)
                            )
                        )
                        moved.append(f"{package}.{table.lower()}")
    return moved


def bootstrap(
    conn: psycopg.Connection[Any],
    users: Sequence[DatabaseUser],
    files: list[Migration] | None = None,
    *,
    iam_role: str = IAM_ROLE,
) -> dict[str, list[str]]:
    """Apply the migrations (each package's in its own schema), then create every user and grant it exactly
    its schemas. Idempotent: run it after every change of the users or the migrations.

    ``conn`` must be autocommit and may create roles (the RDS master user). Returns the migrations applied
    and the users set up.
    """
    files = migrations() if files is None else files
    moved = adopt_public_tables(conn, files)
    applied = migrate(conn, files, schemas=True)
    wanted = {s for u in users for s in u.schemas}
    managed = sorted(wanted | {m.package for m in files} | {"public"})
    with conn.transaction():
        # Before PostgreSQL 15 every role could create tables in public; nobody but the owner may.
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        for schema in sorted(wanted):
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        for user in users:
            ensure_role(conn, user.user, iam_role)
            grant(conn, user, managed)
    log.info(
        "database bootstrap: moved %s; applied %s; users %s",
        moved or "nothing",
        applied or "nothing",
        [u.user for u in users],
    )
    return {"moved": moved, "applied": applied, "users": [u.user for u in users]}


def master_url(env: Mapping[str, str] | None = None, *, secrets_client: Any = None) -> str:
    """The master user's connection string: host, port and name from ``TESSERA_DB_HOST/PORT/NAME``, user
    and password from the RDS-managed secret ``TESSERA_DB_MASTER_SECRET_ARN`` names; TLS required."""
    env = os.environ if env is None else env
    missing = [k for k in ("TESSERA_DB_HOST", MASTER_SECRET_ENV) if not env.get(k)]
    if missing:
        raise ValueError(f"the database bootstrap needs {' and '.join(missing)} in its environment")
    if secrets_client is None:
        import boto3

        secrets_client = boto3.client("secretsmanager")
    secret = json.loads(secrets_client.get_secret_value(SecretId=env[MASTER_SECRET_ENV])["SecretString"])
    return make_conninfo(
        host=env["TESSERA_DB_HOST"],
        port=env.get("TESSERA_DB_PORT", "5432"),
        dbname=env.get("TESSERA_DB_NAME", "tessera"),
        user=secret["username"],
        password=secret["password"],
        sslmode="require",
    )


def handler(event: Mapping[str, Any], context: Any = None) -> dict[str, list[str]]:
    """The Lambda entry point: bootstrap the database for the users in ``event`` (see :func:`bootstrap`)."""
    logging.getLogger().setLevel(logging.INFO)
    users = users_from_input(event)
    with psycopg.connect(master_url(), autocommit=True) as conn:
        return bootstrap(conn, users)
