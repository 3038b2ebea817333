"""The database bootstrap against a real PostgreSQL: after it, each service's own login can do its work on its
tables and nothing else (no other service's tables, no writes to what it only reads, no DDL)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from services.cloud import database_roles
from services.cloud.database import connect, migrate, migrations
from services.cloud.database_roles import DatabaseUser, bootstrap, master_url, users_from_input
from services.model_runner import jobs
from services.registry import models
from stacks.services import SERVICES, database_users

USERS = users_from_input({"users": database_users()})


def _as(url: str, user: str) -> str:
    params = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    params["user"] = user
    return make_conninfo(**params)


@pytest.fixture(scope="module", autouse=True)
def rds_iam_stand_in(postgres_admin_url: str) -> None:
    """Local servers have no ``rds_iam``: a stand-in with the same name shows the bootstrap grants it."""
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'rds_iam'").fetchone():
            conn.execute("CREATE ROLE rds_iam NOLOGIN")


@pytest.fixture
def bootstrapped(database_url: str) -> str:
    with connect(database_url) as conn:
        bootstrap(conn, USERS)
    return database_url


@pytest.fixture
def as_user(bootstrapped: str) -> Iterator[Any]:
    opened: list[psycopg.Connection[Any]] = []

    def open_as(user: str) -> psycopg.Connection[Any]:
        conn = psycopg.connect(_as(bootstrapped, user), autocommit=True)
        opened.append(conn)
        return conn

    yield open_as
    for conn in opened:
        conn.close()


def test_the_table_of_services_names_a_user_per_database_service() -> None:
    assert {u.user for u in USERS} == {
        "model_runner",
        "trainer",
        "sky_generator",
        "fits_classifier",
        "sight_catalog",
    }
    assert all(s.database is None or s.database.user == s.name.replace("-", "_") for s in SERVICES)


def test_migrations_land_in_their_package_schema(bootstrapped: str) -> None:
    with psycopg.connect(bootstrapped) as conn:
        tables = set(
            conn.execute("SELECT schemaname, tablename FROM pg_tables WHERE schemaname <> 'pg_catalog'")
        )
    assert {("model_runner", "jobs"), ("model_runner", "regions"), ("trainer", "training_jobs")} <= tables
    assert ("registry", "models") in tables
    assert {t for s, t in tables if s == "public"} == {"schema_migrations"}


def test_every_service_user_is_an_iam_login_without_privileges(bootstrapped: str) -> None:
    with psycopg.connect(bootstrapped) as conn:
        for user in USERS:
            row = conn.execute(
                "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole,"
                " pg_has_role(rolname, 'rds_iam', 'MEMBER') FROM pg_roles WHERE rolname = %s",
                (user.user,),
            ).fetchone()
            assert row == (True, False, False, False, True), user.user


def test_the_model_runner_works_on_its_jobs_and_reads_the_registry(as_user: Any) -> None:
    trainer, runner = as_user("trainer"), as_user("model_runner")
    models.register(trainer, "detector", task="detector", uri="s3://models/detector/1.onnx")
    assert jobs.create_job(runner, "job-1", {"image": "s3://imagery/a.tif", "model": "detector"})
    assert jobs.get_job(runner, "job-1") is not None
    assert runner.execute("UPDATE jobs SET status = 'IN_PROGRESS' WHERE id = 'job-1'").rowcount == 1
    assert models.resolve_model_uri(runner, "detector") == "s3://models/detector/1.onnx"
    with pytest.raises(errors.InsufficientPrivilege):
        models.register(runner, "detector", task="detector", uri="s3://models/evil.onnx")
    with pytest.raises(errors.InsufficientPrivilege):
        runner.execute("DELETE FROM registry.models")
    with pytest.raises(errors.InsufficientPrivilege):
        runner.execute("SELECT * FROM trainer.training_jobs")
    with pytest.raises(errors.InsufficientPrivilege):
        runner.execute("SELECT * FROM public.schema_migrations")


def test_the_trainer_works_on_its_jobs_and_the_registry_only(as_user: Any) -> None:
    trainer = as_user("trainer")
    trainer.execute("INSERT INTO training_jobs (id, status) VALUES ('t-1', 'QUEUED')")
    assert trainer.execute("UPDATE training_jobs SET status = 'RUNNING'").rowcount == 1
    assert models.register(trainer, "sky", task="sky-position", uri="s3://models/sky/1.onnx").version == 1
    for statement in ("SELECT * FROM model_runner.jobs", "INSERT INTO model_runner.regions DEFAULT VALUES"):
        with pytest.raises(errors.InsufficientPrivilege):
            trainer.execute(statement)


@pytest.mark.parametrize("user", [u.user for u in USERS])
def test_no_service_can_change_the_schema(as_user: Any, user: str) -> None:
    conn = as_user(user)
    own = next(u for u in USERS if u.user == user).writes[0]
    for statement in (
        f"CREATE TABLE {own}.mine (id int)",
        "CREATE TABLE public.mine (id int)",
        "CREATE SCHEMA mine",
        "DROP TABLE IF EXISTS registry.models",
        "ALTER TABLE registry.models ADD COLUMN x int",
    ):
        with pytest.raises((errors.InsufficientPrivilege, errors.InvalidSchemaName)):
            conn.execute(statement)


@pytest.mark.parametrize(
    ("user", "tables", "reads"), [("fits_classifier", 1, ()), ("sight_catalog", 6, ("registry",))]
)
def test_newer_services_see_only_their_own_schema(
    as_user: Any, user: str, tables: int, reads: tuple[str, ...]
) -> None:
    conn = as_user(user)
    assert conn.execute("SHOW search_path").fetchone() == (", ".join((user, *reads)),)
    assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = %s", (user,)).fetchone() == (
        tables,
    )
    for table in ("model_runner.jobs", "trainer.training_jobs", "registry.models"):
        if table.split(".")[0] in reads:
            conn.execute(f"SELECT * FROM {table}")
            continue
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(f"SELECT * FROM {table}")


def test_the_sight_catalog_refreshes_its_marts_without_owning_them(as_user: Any) -> None:
    conn = as_user("sight_catalog")
    with pytest.raises(errors.InsufficientPrivilege):
        conn.execute("REFRESH MATERIALIZED VIEW sight_city_mart")
    conn.rollback()
    conn.execute("SELECT sight_refresh_marts()")
    assert conn.execute("SELECT count(*) FROM sight_city_mart").fetchone() == (0,)


def test_a_second_run_applies_nothing_and_a_dropped_grant_is_revoked(bootstrapped: str, as_user: Any) -> None:
    narrowed = [
        DatabaseUser("model_runner", writes=("model_runner",)) if u.user == "model_runner" else u
        for u in USERS
    ]
    with connect(bootstrapped) as conn:
        assert bootstrap(conn, narrowed)["applied"] == []
    runner = as_user("model_runner")
    with pytest.raises(errors.InsufficientPrivilege):
        runner.execute("SELECT * FROM registry.models")
    assert runner.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="users"):
        users_from_input({})
    with pytest.raises(ValueError, match="plain name"):
        users_from_input({"users": [{"user": "x; DROP TABLE jobs", "writes": []}]})
    with pytest.raises(ValueError, match="public"):
        DatabaseUser("x", reads=("public",))
    with pytest.raises(ValueError, match="twice"):
        users_from_input({"users": [{"user": "a"}, {"user": "a"}]})


def test_the_master_password_comes_from_the_rds_secret(aws: str) -> None:
    secrets = boto3.client("secretsmanager", endpoint_url=aws)
    arn = secrets.create_secret(
        Name="rds-master-bootstrap", SecretString=json.dumps({"username": "tessera", "password": "s3cr=t"})
    )["ARN"]
    env = {
        "TESSERA_DB_HOST": "db.internal",
        "TESSERA_DB_NAME": "tessera",
        "TESSERA_DB_MASTER_SECRET_ARN": arn,
    }
    assert conninfo_to_dict(master_url(env, secrets_client=secrets)) == {
        "host": "db.internal",
        "port": "5432",
        "dbname": "tessera",
        "user": "tessera",
        "password": "s3cr=t",
        "sslmode": "require",
    }
    with pytest.raises(ValueError, match="TESSERA_DB_MASTER_SECRET_ARN"):
        master_url({"TESSERA_DB_HOST": "h"})


def test_the_lambda_handler_bootstraps_from_its_input(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database_roles, "master_url", lambda: database_url)
    result = database_roles.handler({"users": database_users()})
    assert result["users"] == [u.user for u in USERS]
    assert sorted(result["applied"]) == sorted(m.name for m in migrations())
    assert database_roles.handler({"users": database_users()})["applied"] == []


def test_an_rds_shaped_master_bootstraps_again_and_again(postgres_admin_url: str) -> None:
    # On RDS the master is no superuser (rds_superuser: LOGIN CREATEDB CREATEROLE) and owns the database.
    # Only a superuser may name SUPERUSER, REPLICATION or BYPASSRLS in ALTER ROLE: a second run must not.
    suffix = uuid.uuid4().hex[:8]
    master, database = f"master_{suffix}", f"rds_{suffix}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB CREATEROLE").format(sql.Identifier(master)))
        admin.execute(sql.SQL("GRANT rds_iam TO {} WITH ADMIN OPTION").format(sql.Identifier(master)))
        admin.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(master))
        )
    url = make_conninfo(**{**_params(postgres_admin_url), "dbname": database, "user": master})
    users = [DatabaseUser(f"runner_{suffix}", writes=("model_runner",), reads=("registry",))]
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (
            False,
        )
        first = bootstrap(conn, users)
        second = bootstrap(conn, users)
    assert first["applied"] and second["applied"] == []
    with psycopg.connect(_as(url, f"runner_{suffix}"), autocommit=True) as runner:
        assert runner.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


def test_a_service_role_made_superuser_by_hand_is_refused(database_url: str, postgres_admin_url: str) -> None:
    name = f"tainted_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER").format(sql.Identifier(name)))
    with connect(database_url) as conn, pytest.raises(ValueError, match=f"{name}.*SUPERUSER"):
        bootstrap(conn, [DatabaseUser(name, writes=("model_runner",))])


def test_tables_a_deployment_made_in_public_move_into_their_schemas(database_url: str) -> None:
    # Before per-service schemas, the services migrated into public themselves; their rows must survive.
    with connect(database_url) as conn:
        migrate(conn)
        jobs.create_job(conn, "job-before", {"image": "s3://imagery/a.tif"})
    with connect(database_url) as conn:
        result = bootstrap(conn, USERS)
    assert {"model_runner.jobs", "model_runner.regions", "trainer.training_jobs", "registry.models"} <= set(
        result["moved"]
    )
    with psycopg.connect(database_url) as conn:
        in_public = {
            r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    assert in_public == {"schema_migrations"}
    runner = psycopg.connect(_as(database_url, "model_runner"), autocommit=True)
    try:
        assert jobs.get_job(runner, "job-before") is not None
    finally:
        runner.close()


def _params(url: str) -> dict[str, str]:
    return {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
