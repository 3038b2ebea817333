"""The square detector (a real ONNX model) built once, and a worker's environment on the embedded default
(the moto, PostgreSQL and per-test resource fixtures are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from square_world import build_square_detector

from services.cloud.database import apply_migrations, connect
from services.cloud.embedded import (
    Resources,
    worker_environment,
)


@pytest.fixture(scope="session")
def square_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exact square detector (64 px tiles)."""
    return build_square_detector(tmp_path_factory.mktemp("models") / "squares.onnx")


@pytest.fixture(scope="session")
def slow_square_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The square detector with extra work per tile, so a region takes a few seconds."""
    return build_square_detector(tmp_path_factory.mktemp("models") / "squares-slow.onnx", slow=64)


@pytest.fixture
def runner_env(
    resources: Resources, database_url: str, aws: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The worker environment of this test's queues, buckets and database, also set in this process."""
    env = worker_environment(aws, resources, database_url)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with connect(database_url) as conn:
        apply_migrations(conn)
    return env
