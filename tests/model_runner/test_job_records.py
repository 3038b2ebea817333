"""Job and region records on a real PostgreSQL: claims, leases, at-most-once completion, one finaliser."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import psycopg
import pytest

from services.cloud.database import apply_migrations, connect
from services.inference.detections import Detections
from services.model_runner import jobs
from services.tiling.windows import Window


@pytest.fixture
def conn(database_url: str) -> Any:
    with connect(database_url) as connection:
        apply_migrations(connection)
        yield connection


def _job(conn: psycopg.Connection[Any], job_id: str = "job-1", regions: int = 3) -> list[Window]:
    windows = [Window(100 * i, 0, 100, 100) for i in range(regions)]
    assert jobs.create_job(conn, job_id, {"image": "a.tif", "model": "m.onnx"})
    assert jobs.add_regions(conn, job_id, windows, [4] * regions)
    return windows


def _detections(n: int, offset: float = 0.0) -> Detections:
    boxes = np.array([[offset + i, 0, offset + i + 5, 5] for i in range(n)], np.float32)
    return Detections(boxes, np.full(n, 0.9, np.float32), np.zeros(n, np.int32))


def test_a_job_is_recorded_once_and_moves_to_in_progress(conn: psycopg.Connection[Any]) -> None:
    _job(conn)
    assert not jobs.create_job(conn, "job-1", {"image": "other.tif"})
    job = jobs.get_job(conn, "job-1")
    assert job is not None
    assert (job.status, job.regions_total, job.tiles_total, job.request) == (
        "IN_PROGRESS",
        3,
        12,
        {"image": "a.tif", "model": "m.onnx"},
    )
    # A redelivered request adds no second set of regions.
    assert not jobs.add_regions(conn, "job-1", [Window(0, 0, 1, 1)] * 5, [1] * 5)
    assert conn.execute("SELECT count(*) FROM regions").fetchone() == (3,)
    assert jobs.open_regions(conn, "job-1") == [0, 1, 2]


def test_claims_leases_and_takeover(conn: psycopg.Connection[Any]) -> None:
    windows = _job(conn)
    first = jobs.claim_region(conn, "job-1", 1, "worker-a", lease_s=30)
    assert (first.state, first.window, first.attempts) == ("claimed", windows[1], 1)
    held = jobs.claim_region(conn, "job-1", 1, "worker-b", lease_s=30)
    assert held.state == "leased" and 25 < held.lease_left_s <= 30
    assert jobs.claim_region(conn, "job-1", 7, "worker-b", lease_s=30).state == "missing"
    # worker-a dies: its lease runs out and worker-b takes the region over.
    conn.execute("UPDATE regions SET lease_until = now() - interval '1 second' WHERE region_index = 1")
    taken = jobs.claim_region(conn, "job-1", 1, "worker-b", lease_s=30)
    assert (taken.state, taken.attempts) == ("claimed", 2)
    assert not jobs.extend_region_lease(conn, "job-1", 1, "worker-a", 30)
    assert jobs.extend_region_lease(conn, "job-1", 1, "worker-b", 30)


def test_a_region_is_done_at_most_once(conn: psycopg.Connection[Any]) -> None:
    _job(conn)
    jobs.claim_region(conn, "job-1", 0, "a", 30)
    assert jobs.complete_region(conn, "job-1", 0, _detections(3), tiles=4, seconds=1.0, worker="a")
    # A duplicate delivery that got through before the first finished: its result is dropped.
    assert not jobs.complete_region(conn, "job-1", 0, _detections(5, 50), tiles=4, seconds=1.0, worker="b")
    assert jobs.claim_region(conn, "job-1", 0, "b", 30).state == "finished"
    (result,) = [r for r in jobs.region_results(conn, "job-1") if r.index == 0]
    assert len(result.detections) == 3
    np.testing.assert_array_equal(result.detections.boxes, _detections(3).boxes)
    assert conn.execute("SELECT worker, attempts FROM regions WHERE region_index = 0").fetchone() == ("a", 1)


def test_a_failed_region_is_closed_and_not_retried(conn: psycopg.Connection[Any]) -> None:
    _job(conn)
    jobs.claim_region(conn, "job-1", 2, "a", 30)
    assert jobs.fail_region(conn, "job-1", 2, "image unreadable")
    assert not jobs.complete_region(conn, "job-1", 2, _detections(1), tiles=4, seconds=1.0, worker="a")
    assert jobs.claim_region(conn, "job-1", 2, "b", 30).state == "finished"


def test_a_released_region_is_claimed_again_at_once(conn: psycopg.Connection[Any]) -> None:
    _job(conn)
    jobs.claim_region(conn, "job-1", 0, "a", 300)
    assert jobs.release_region(conn, "job-1", 0, "a", "boom")
    again = jobs.claim_region(conn, "job-1", 0, "b", 300)
    assert (again.state, again.attempts) == ("claimed", 2)


def test_finalisation_waits_for_every_region_and_is_claimed_once(conn: psycopg.Connection[Any]) -> None:
    _job(conn, regions=2)
    jobs.claim_region(conn, "job-1", 0, "a", 30)
    jobs.complete_region(conn, "job-1", 0, _detections(1), tiles=4, seconds=1.0, worker="a")
    assert not jobs.claim_finalisation(conn, "job-1", "a", 30)  # region 1 is still open
    jobs.claim_region(conn, "job-1", 1, "b", 30)
    jobs.complete_region(conn, "job-1", 1, _detections(2, 100), tiles=4, seconds=1.0, worker="b")
    assert jobs.claim_finalisation(conn, "job-1", "b", 30)
    assert not jobs.claim_finalisation(conn, "job-1", "a", 30)
    assert not jobs.finish_job(
        conn, "job-1", "a", status="SUCCESS", reason=None, tiles=8, detections=3, output_uris=[]
    )
    assert jobs.finish_job(
        conn,
        "job-1",
        "b",
        status="SUCCESS",
        reason=None,
        tiles=8,
        detections=3,
        output_uris=["s3://r/job-1.geojson"],
    )
    job = jobs.get_job(conn, "job-1")
    assert job is not None and (job.status, job.tiles, job.detections, job.output_uris) == (
        "SUCCESS",
        8,
        3,
        ["s3://r/job-1.geojson"],
    )
    assert not jobs.claim_finalisation(conn, "job-1", "c", 30)


def test_an_abandoned_finalisation_is_taken_over(conn: psycopg.Connection[Any]) -> None:
    _job(conn, regions=1)
    jobs.claim_region(conn, "job-1", 0, "a", 30)
    jobs.complete_region(conn, "job-1", 0, _detections(1), tiles=4, seconds=1.0, worker="a")
    assert jobs.claim_finalisation(conn, "job-1", "a", 0.2)
    assert not jobs.claim_finalisation(conn, "job-1", "b", 30)
    time.sleep(0.3)
    assert jobs.claim_finalisation(conn, "job-1", "b", 30)


def test_a_held_finalisation_says_how_long_and_is_released(conn: psycopg.Connection[Any]) -> None:
    _job(conn, regions=1)
    jobs.claim_region(conn, "job-1", 0, "a", 30)
    assert jobs.finalisation_held_s(conn, "job-1") is None  # a region is open
    jobs.complete_region(conn, "job-1", 0, _detections(1), tiles=4, seconds=1.0, worker="a")
    assert jobs.finalisation_held_s(conn, "job-1") is None  # nobody holds it yet
    assert jobs.claim_finalisation(conn, "job-1", "a", 30)
    held = jobs.finalisation_held_s(conn, "job-1")
    assert held is not None and 20 < held <= 30
    assert not jobs.release_finalisation(conn, "job-1", "b")  # not b's to release
    assert jobs.finalisation_held_s(conn, "job-1") is not None
    assert jobs.release_finalisation(conn, "job-1", "a")
    assert jobs.finalisation_held_s(conn, "job-1") is None
    assert jobs.claim_finalisation(conn, "job-1", "b", 30)  # at once, not after a's lease
    assert jobs.finish_job(
        conn, "job-1", "b", status="SUCCESS", reason=None, tiles=4, detections=1, output_uris=[]
    )
    assert jobs.finalisation_held_s(conn, "job-1") is None  # the job is closed
    assert jobs.finalisation_held_s(conn, "no-such-job") is None


def test_racing_workers_finalise_exactly_once(database_url: str, conn: psycopg.Connection[Any]) -> None:
    """Many workers complete the last regions of many jobs at the same moment: one finaliser per job."""
    workers, rounds = 6, 8
    for r in range(rounds):
        _job(conn, f"race-{r}", regions=workers)
    connections = [connect(database_url) for _ in range(workers)]
    claims: list[tuple[str, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(workers)

    def work(w: int) -> None:
        c = connections[w]
        for r in range(rounds):
            job_id = f"race-{r}"
            assert jobs.claim_region(c, job_id, w, f"w{w}", 30).state == "claimed"
            barrier.wait()  # every worker completes its region at once
            jobs.complete_region(c, job_id, w, _detections(1, w * 10), tiles=1, seconds=0.1, worker=f"w{w}")
            if jobs.claim_finalisation(c, job_id, f"w{w}", 30):
                with lock:
                    claims.append((job_id, w))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for c in connections:
        c.close()
    assert sorted(job for job, _ in claims) == sorted(f"race-{r}" for r in range(rounds))


def test_failing_a_job_records_it_even_when_new(conn: psycopg.Connection[Any]) -> None:
    assert jobs.fail_job(conn, "bad-1", "the image request is not JSON", None)
    job = jobs.get_job(conn, "bad-1")
    assert job is not None and (job.status, job.reason) == ("FAILED", "the image request is not JSON")
    _job(conn, "ok-1", regions=1)
    jobs.claim_region(conn, "ok-1", 0, "a", 30)
    jobs.complete_region(conn, "ok-1", 0, _detections(1), tiles=1, seconds=0.1, worker="a")
    jobs.claim_finalisation(conn, "ok-1", "a", 30)
    jobs.finish_job(conn, "ok-1", "a", status="SUCCESS", reason=None, tiles=1, detections=1, output_uris=[])
    assert not jobs.fail_job(conn, "ok-1", "late failure")  # a finished job keeps its status
    assert jobs.get_job(conn, "ok-1").status == "SUCCESS"  # type: ignore[union-attr]


def test_progress_counts_regions_tiles_and_workers(conn: psycopg.Connection[Any]) -> None:
    _job(conn, regions=3)
    for index, worker in [(0, "a"), (1, "b")]:
        jobs.claim_region(conn, "job-1", index, worker, 30)
        jobs.complete_region(conn, "job-1", index, _detections(1), tiles=4, seconds=0.1, worker=worker)
    progress = jobs.job_progress(conn, "job-1")
    assert progress is not None
    assert (progress.regions_total, progress.regions_closed, progress.tiles_total, progress.tiles_done) == (
        3,
        2,
        12,
        8,
    )
    assert progress.regions_by_worker == {"a": 1, "b": 1}


def test_a_refused_request_never_touches_an_existing_job(conn: psycopg.Connection[Any]) -> None:
    _job(conn, "running", regions=1)
    assert not jobs.record_rejected(conn, "running", "$.colour: unknown field")
    job = jobs.get_job(conn, "running")
    assert job is not None and (job.status, job.reason) == ("IN_PROGRESS", None)
    assert jobs.record_rejected(conn, "fresh", "$.colour: unknown field", {"colour": "red"})
    fresh = jobs.get_job(conn, "fresh")
    assert fresh is not None and (fresh.status, fresh.request) == ("FAILED", {"colour": "red"})
