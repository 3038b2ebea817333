"""The per-city budget of external labelling calls under a burst of concurrent workers: never passed, every
call sent is counted once, no image is sent twice, and nobody waits on anybody."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from labelling_fixtures import add_city, add_image, encoded, labellings
from rekognition_stub import ARN, RekognitionStub

from services.cloud.database import apply_migrations, connect, migrations
from services.sight_catalog import labels
from services.sight_catalog.labelling import LabelRun, label_city
from services.sight_catalog.rekognition import RekognitionLabeller, rekognition_client

WORKERS = 8
IMAGES = 50
#: Every worker must be done by then; a deadlock would hold them past it.
JOIN_TIMEOUT_S = 60.0


class Memory:
    """An image store in memory (the bytes' home is not what these tests are about)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def read(self, key: str) -> bytes:
        return self.objects[key]


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to a fresh database holding the sight catalog's tables."""
    conn = connect(database_url)
    apply_migrations(conn, [m for m in migrations() if m.package == "sight_catalog"])
    yield conn
    conn.close()


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[RekognitionStub]:
    """The Rekognition stand-in, answering after 20 ms so that the workers' calls overlap."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    server = RekognitionStub("no_custom_labels", latency_s=0.02).start()
    yield server
    server.stop()


def city_with_images(db: psycopg.Connection[Any], budget: int) -> tuple[int, Memory]:
    city = add_city(db, budget=budget)
    objects = {}
    for i in range(IMAGES):
        data = encoded(96, 64, seed=i)
        image = add_image(db, city, data, width=96, height=64)
        row = db.execute("SELECT s3_key FROM sight_images WHERE id = %s", (image,)).fetchone()
        assert row is not None
        objects[str(row[0])] = data
    return city, Memory(objects)


def race(workers: int, prepare: Callable[[], Callable[[], Any]]) -> list[Any]:
    """On each of ``workers`` threads: ``prepare()`` (connections, clients), then, all released together, the
    work it returned; their results (every thread must finish)."""
    start = threading.Barrier(workers)
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            work = prepare()
            start.wait()
            result = work()
            with lock:
                results.append(result)
        except BaseException as exc:  # handed to the test
            start.abort()
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a worker is stuck"
    assert errors == []
    return results


def labelling_workers(database_url: str, stub: RekognitionStub, city: int, store: Memory) -> list[LabelRun]:
    """WORKERS workers, each with its own connection and client, labelling the city at once."""
    connections: list[psycopg.Connection[Any]] = []

    def prepare() -> Callable[[], LabelRun]:
        conn = connect(database_url)
        connections.append(conn)
        labeller = RekognitionLabeller(
            ARN, client=rekognition_client(stub.endpoint, region="us-east-1"), sleep=lambda _: None
        )
        return lambda: label_city(conn, city, labeller, store, limit=IMAGES)

    try:
        return race(WORKERS, prepare)
    finally:
        for conn in connections:
            conn.close()


def test_a_burst_of_workers_makes_exactly_the_budgeted_calls(
    db: psycopg.Connection[Any], database_url: str, stub: RekognitionStub
) -> None:
    city, store = city_with_images(db, budget=20)
    runs = labelling_workers(database_url, stub, city, store)

    assert len(stub.received) == 20
    assert labels.budget_of(db, city).used == 20
    assert sum(r.calls for r in runs) == 20
    done = labellings(db, "rekognition")
    assert len(done) == 20 == sum(r.labelled for r in runs)  # 20 different images: none sent twice
    assert len({sent.image for sent in stub.received}) == 20
    assert sum(1 for r in runs if r.labelled) >= 2  # the workers did share the images out
    assert any(r.stopped and "used up (20 of 20" in r.stopped for r in runs)
    assert len(labels.images_to_label(db, city, "rekognition", limit=IMAGES)) == IMAGES - 20


def test_throttled_retries_count_against_the_budget_too(
    db: psycopg.Connection[Any], database_url: str, stub: RekognitionStub
) -> None:
    city, store = city_with_images(db, budget=20)
    stub.answer(["throttling_exception", "provisioned_throughput_exceeded"] * 3)
    runs = labelling_workers(database_url, stub, city, store)

    assert len(stub.received) == 20 == labels.budget_of(db, city).used
    assert sum(r.calls for r in runs) == 20
    # Six calls were throttled; every other call labelled an image of its own.
    assert len(labellings(db, "rekognition")) == 14 == sum(r.labelled for r in runs)


def test_a_budget_of_zero_makes_no_call_at_all(
    db: psycopg.Connection[Any], database_url: str, stub: RekognitionStub
) -> None:
    city, store = city_with_images(db, budget=0)
    runs = labelling_workers(database_url, stub, city, store)

    assert stub.received == []
    assert labels.budget_of(db, city).used == 0
    assert labellings(db, "rekognition") == {}
    assert all(r.calls == 0 and r.skipped_for_budget == IMAGES for r in runs)
    assert all(r.stopped and "used up (0 of 0" in r.stopped for r in runs)


def test_raising_the_budget_lets_the_next_round_go_on(
    db: psycopg.Connection[Any], database_url: str, stub: RekognitionStub
) -> None:
    city, store = city_with_images(db, budget=5)
    labelling_workers(database_url, stub, city, store)
    labels.set_budget(db, city, 12)
    labelling_workers(database_url, stub, city, store)
    assert len(stub.received) == 12 == len(labellings(db, "rekognition"))


def test_spend_is_atomic_under_contention(db: psycopg.Connection[Any], database_url: str) -> None:
    city = add_city(db, budget=100)

    connections: list[psycopg.Connection[Any]] = []

    def prepare() -> Callable[[], int]:
        conn = connect(database_url)
        connections.append(conn)
        return lambda: sum(labels.spend(conn, city) for _ in range(20))

    try:
        granted = race(16, prepare)
    finally:
        for conn in connections:
            conn.close()
    assert sum(granted) == 100  # 320 asked for
    assert labels.budget_of(db, city).used == 100
