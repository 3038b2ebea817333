"""Where the database is (environment, Secrets Manager) and migrations applied exactly once."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import boto3
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from services.cloud.database import apply_migrations, connect, database_url, migrations
from services.errors import UserError


def _migrations_tree(root: Path) -> Path:
    (root / "alpha" / "migrations").mkdir(parents=True)
    (root / "beta" / "migrations").mkdir(parents=True)
    (root / "alpha" / "migrations" / "001_things.sql").write_text(
        "CREATE TABLE things (id integer PRIMARY KEY);\nINSERT INTO things VALUES (1);\n"
    )
    (root / "alpha" / "migrations" / "002_more.sql").write_text("ALTER TABLE things ADD COLUMN name text;")
    (root / "beta" / "migrations" / "001_counter.sql").write_text(
        "CREATE TABLE counter (n integer); INSERT INTO counter VALUES (0);"
    )
    return root


def test_url_from_the_environment_wins() -> None:
    assert (
        database_url({"TESSERA_DB_URL": "postgresql://u:p@h/db", "TESSERA_DB_HOST": "x"})
        == "postgresql://u:p@h/db"
    )


def test_url_from_host_and_the_rds_managed_secret(aws: str) -> None:
    secrets = boto3.client("secretsmanager", endpoint_url=aws)
    arn = secrets.create_secret(
        Name="rds-master-test", SecretString=json.dumps({"username": "tessera", "password": "s3cr=t pass"})
    )["ARN"]
    url = database_url(
        {
            "TESSERA_DB_HOST": "db.example.internal",
            "TESSERA_DB_PORT": "5433",
            "TESSERA_DB_NAME": "tessera",
            "TESSERA_DB_SECRET_ARN": arn,
        },
        secrets_client=secrets,
    )
    assert conninfo_to_dict(url) == {
        "host": "db.example.internal",
        "port": "5433",
        "dbname": "tessera",
        "user": "tessera",
        "password": "s3cr=t pass",
        "sslmode": "require",
    }


def test_no_database_configured_says_what_to_set() -> None:
    with pytest.raises(UserError, match="TESSERA_DB_URL"):
        database_url({"TESSERA_DB_HOST": "h"})


def test_migrations_are_found_by_service_and_number(tmp_path: Path) -> None:
    found = migrations(_migrations_tree(tmp_path))
    assert [m.name for m in found] == ["alpha/001_things.sql", "alpha/002_more.sql", "beta/001_counter.sql"]


def test_a_misnamed_migration_is_refused(tmp_path: Path) -> None:
    _migrations_tree(tmp_path)
    (tmp_path / "alpha" / "migrations" / "3_oops.sql").write_text("SELECT 1")
    with pytest.raises(ValueError, match=r"3_oops\.sql"):
        migrations(tmp_path)


def test_migrations_apply_once(tmp_path: Path, database_url: str) -> None:
    files = migrations(_migrations_tree(tmp_path))
    with connect(database_url) as conn:
        assert apply_migrations(conn, files) == [m.name for m in files]
        assert apply_migrations(conn, files) == []
        # A second run would have failed on CREATE TABLE or inserted a second row.
        assert conn.execute("SELECT count(*) FROM things").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (3,)
        columns = {
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'things'"
            )
        }
        assert columns == {"id", "name"}


def test_a_new_migration_is_applied_after_the_old_ones(tmp_path: Path, database_url: str) -> None:
    root = _migrations_tree(tmp_path)
    with connect(database_url) as conn:
        apply_migrations(conn, migrations(root))
        (root / "beta" / "migrations" / "002_bump.sql").write_text("UPDATE counter SET n = n + 1;")
        assert apply_migrations(conn, migrations(root)) == ["beta/002_bump.sql"]
        assert apply_migrations(conn, migrations(root)) == []
        assert conn.execute("SELECT n FROM counter").fetchone() == (1,)


def test_workers_starting_together_apply_each_migration_once(tmp_path: Path, database_url: str) -> None:
    root = _migrations_tree(tmp_path)
    (root / "beta" / "migrations" / "002_bump.sql").write_text(
        "SELECT pg_sleep(0.2); UPDATE counter SET n = n + 1;"
    )
    files = migrations(root)
    applied: list[list[str]] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            with connect(database_url) as conn:
                applied.append(apply_migrations(conn, files))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(name for names in applied for name in names) == sorted(m.name for m in files)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT n FROM counter").fetchone() == (1,)


def test_the_model_runner_migrations_apply(database_url: str) -> None:
    with connect(database_url) as conn:
        applied = apply_migrations(conn)
        assert "model_runner/001_jobs_and_regions.sql" in applied
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"jobs", "regions", "schema_migrations"} <= tables
