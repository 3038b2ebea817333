"""The model registry on a real PostgreSQL: versions count per name, references resolve, unknown ones are
UserErrors, paths and URIs pass through."""

from __future__ import annotations

import pytest

from services.cloud.database import apply_migrations, connect
from services.errors import UserError
from services.registry import is_registry_ref, latest, parse_ref, register, resolve, resolve_model_uri


def test_versions_increment_per_name_and_references_resolve(database_url: str) -> None:
    with connect(database_url) as conn:
        apply_migrations(conn)
        first = register(conn, "ships", task="detector", uri="s3://m/ships/1.onnx", metrics={"recall": 0.5})
        other = register(conn, "planes", task="detector", uri="s3://m/planes/1.onnx")
        second = register(conn, "ships", task="detector", uri="s3://m/ships/2.onnx", job_id="j2")
        assert (first.version, other.version, second.version) == (1, 1, 2)
        assert latest(conn, "ships").uri == "s3://m/ships/2.onnx"
        assert resolve(conn, "ships:1").metrics == {"recall": 0.5}
        assert resolve_model_uri(conn, "ships") == "s3://m/ships/2.onnx"
        assert resolve_model_uri(conn, "ships:1") == "s3://m/ships/1.onnx"
        for passthrough in ("s3://m/x.onnx", "models/x.onnx", "x.onnx", "file:///x.onnx"):
            assert resolve_model_uri(conn, passthrough) == passthrough
        with pytest.raises(UserError, match="registered models: planes, ships"):
            resolve(conn, "boats")
        with pytest.raises(UserError, match="has no version 9; its versions are 1, 2"):
            resolve(conn, "ships:9")
        with pytest.raises(UserError, match="not valid"):
            register(conn, "bad name", task="detector", uri="x")


def test_reference_syntax() -> None:
    assert parse_ref("ships") == ("ships", None)
    assert parse_ref("ships:12") == ("ships", 12)
    assert is_registry_ref("ships:3") and is_registry_ref("demo-detector")
    assert not is_registry_ref("ships.onnx") and not is_registry_ref("dir/ships")
    with pytest.raises(UserError, match="NAME:VERSION"):
        parse_ref("ships:latest")
