"""Where the database is (environment), how a platform service logs in (its own user, an IAM token per
connection) and migrations applied exactly once (by the bootstrap, on the platform)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from services.cloud.database import (
    apply_migrations,
    connect,
    database_url,
    migrate,
    migrations,
    uses_iam_authentication,
)
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


PLATFORM_ENV = {
    "TESSERA_DB_HOST": "tessera-dev-db.c0ffee.us-east-1.rds.amazonaws.com",
    "TESSERA_DB_PORT": "5433",
    "TESSERA_DB_NAME": "tessera",
    "TESSERA_DB_USER": "model_runner",
    "AWS_REGION": "us-east-1",
}


def test_on_the_platform_a_service_logs_in_as_its_own_user_without_a_password() -> None:
    assert conninfo_to_dict(database_url(PLATFORM_ENV)) == {
        "host": PLATFORM_ENV["TESSERA_DB_HOST"],
        "port": "5433",
        "dbname": "tessera",
        "user": "model_runner",
        "sslmode": "require",
    }
    assert uses_iam_authentication(PLATFORM_ENV)
    assert not uses_iam_authentication({"TESSERA_DB_URL": "postgresql://u@h/db"})


def test_every_connection_gets_a_fresh_iam_token(mocked_aws: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    def fake_connect(url: str, **kwargs: Any) -> str:
        seen.append({"url": url, **kwargs})
        return "connection"

    monkeypatch.setattr(psycopg, "connect", fake_connect)
    rds = mocked_aws.client("rds")
    assert connect(env=PLATFORM_ENV, rds_client=rds) == "connection"
    assert connect(env=PLATFORM_ENV, rds_client=rds) == "connection"
    tokens = [call["password"] for call in seen]
    for token in tokens:
        assert token.startswith(
            f"{PLATFORM_ENV['TESSERA_DB_HOST']}:5433/?Action=connect&DBUser=model_runner&"
        )
        assert "X-Amz-Signature=" in token
    assert "password" not in conninfo_to_dict(seen[0]["url"])
    assert conninfo_to_dict(seen[0]["url"])["sslmode"] == "require"
    # A training process gets the platform's string as TESSERA_DB_URL: still a token of its own.
    connect(env={**PLATFORM_ENV, "TESSERA_DB_URL": seen[0]["url"]}, rds_client=rds)
    assert seen[-1]["password"].startswith(PLATFORM_ENV["TESSERA_DB_HOST"])
    # Locally the URL is used as it is: no token.
    connect(env={"TESSERA_DB_URL": "postgresql://u:p@h/db"})
    connect(env={"TESSERA_DB_URL": "postgresql://postgres@/db?host=/tmp"})
    assert "password" not in seen[-1] and "password" not in seen[-2]


def test_a_platform_service_applies_no_migrations(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with connect(database_url) as conn:
        monkeypatch.delenv("TESSERA_DB_URL", raising=False)
        monkeypatch.setenv("TESSERA_DB_USER", "model_runner")
        assert apply_migrations(conn) == []
        assert conn.execute("SELECT to_regclass('public.schema_migrations')").fetchone() == (None,)
        monkeypatch.delenv("TESSERA_DB_USER")
        assert apply_migrations(conn)


def test_migrations_can_go_into_a_schema_per_package(tmp_path: Path, database_url: str) -> None:
    files = migrations(_migrations_tree(tmp_path))
    with connect(database_url) as conn:
        assert migrate(conn, files, schemas=True) == [m.name for m in files]
        tables = set(
            conn.execute(
                "SELECT schemaname, tablename FROM pg_tables WHERE schemaname IN ('alpha', 'beta', 'public')"
            )
        )
        assert tables == {("alpha", "things"), ("beta", "counter"), ("public", "schema_migrations")}
        assert migrate(conn, files, schemas=True) == []


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
