"""Job and region records in PostgreSQL (tables in ``migrations/``), and the guarded updates that make
queued work safe to redeliver.

- A region is claimed by one guarded UPDATE (PENDING, or RUNNING under an expired lease: its worker died),
  and done at most once: the UPDATE that stores its result is the one that marks it DONE, and it only
  matches a RUNNING row, so a second completion of the same region changes nothing.
- Whoever completes (or fails) a region then asks, in a new statement, whether the job has any open region
  left; the later of two racing workers always sees both regions closed, and the finalisation claim is one
  guarded UPDATE on the job row, so exactly one worker wins it (a claim that is not kept — its worker died
  — expires like a region lease and is taken over by the next delivery of any of the job's messages).

Every function takes an autocommit connection; multi-statement steps open their own transaction.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from services.inference.detections import Detections
from services.tiling.windows import Window

#: A job's ``status`` column, as stored (the database holds these strings; psycopg reads them back as such).
JobStatus = Literal["STARTED", "IN_PROGRESS", "SUCCESS", "PARTIAL", "FAILED"]
#: The statuses of a closed job.
FinalStatus = Literal["SUCCESS", "PARTIAL", "FAILED"]
#: A region's ``status`` column, as stored.
RegionStatus = Literal["PENDING", "RUNNING", "DONE", "FAILED"]

FINAL: tuple[FinalStatus, ...] = ("SUCCESS", "PARTIAL", "FAILED")


class ClaimState(StrEnum):
    """What asking for a region found (never stored: see :class:`Claim`)."""

    CLAIMED = "claimed"
    FINISHED = "finished"
    LEASED = "leased"
    MISSING = "missing"


@dataclass(frozen=True)
class Job:
    """A job record."""

    id: str
    status: JobStatus
    reason: str | None
    request: dict[str, Any] | None
    regions_total: int | None
    tiles_total: int | None
    tiles: int | None
    detections: int | None
    output_uris: list[str]


@dataclass(frozen=True)
class Claim:
    """The outcome of asking for a region.

    ``state`` is ``CLAIMED`` (it is yours: ``window``, ``attempts``), ``FINISHED`` (DONE or FAILED
    already: nothing to do), ``LEASED`` (another live worker holds it for ``lease_left_s`` more seconds)
    or ``MISSING`` (no such region).
    """

    state: ClaimState
    window: Window | None = None
    attempts: int = 0
    lease_left_s: float = 0.0


@dataclass(frozen=True)
class RegionResult:
    """A finished region as the finaliser reads it."""

    index: int
    window: Window
    status: RegionStatus
    detections: Detections
    tiles: int
    error: str | None


def detections_to_bytes(detections: Detections) -> bytes:
    """A region's detections as an ``.npz`` (what ``regions.result`` holds)."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        boxes=np.asarray(detections.boxes, dtype=np.float32).reshape(-1, 4),
        scores=np.asarray(detections.scores, dtype=np.float32),
        labels=np.asarray(detections.labels, dtype=np.int32),
    )
    return buffer.getvalue()


def detections_from_bytes(data: bytes) -> Detections:
    """The detections stored by :func:`detections_to_bytes`."""
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return Detections(
            boxes=arrays["boxes"].astype(np.float32).reshape(-1, 4),
            scores=arrays["scores"].astype(np.float32),
            labels=arrays["labels"].astype(np.int32),
        )


def create_job(conn: psycopg.Connection[Any], job_id: str, request: dict[str, Any]) -> bool:
    """Record a new job as STARTED; False when a job with this id exists already (a redelivered request)."""
    row = conn.execute(
        "INSERT INTO jobs (id, request, status, image, model) VALUES (%s, %s, 'STARTED', %s, %s)"
        " ON CONFLICT (id) DO NOTHING RETURNING id",
        (
            job_id,
            Jsonb(request),
            request.get("image"),
            request.get("model") or (request.get("endpoint") or {}).get("url"),
        ),
    ).fetchone()
    return row is not None


def get_job(conn: psycopg.Connection[Any], job_id: str) -> Job | None:
    """The job with this id, or None."""
    row = conn.execute(
        "SELECT id, status, reason, request, regions_total, tiles_total, tiles, detections, output_uris"
        " FROM jobs WHERE id = %s",
        (job_id,),
    ).fetchone()
    if row is None:
        return None
    return Job(
        id=row[0],
        status=row[1],
        reason=row[2],
        request=row[3],
        regions_total=row[4],
        tiles_total=row[5],
        tiles=row[6],
        detections=row[7],
        output_uris=list(row[8] or []),
    )


def record_rejected(
    conn: psycopg.Connection[Any], job_id: str, reason: str, request: dict[str, Any] | None = None
) -> bool:
    """Record a request that was refused before its job started, as a FAILED job with ``reason``.

    False, and nothing written, when the id belongs to a job already (a bad request never touches it).
    """
    row = conn.execute(
        "INSERT INTO jobs (id, request, status, reason, finished_at) VALUES (%s, %s, 'FAILED', %s, now())"
        " ON CONFLICT (id) DO NOTHING RETURNING id",
        (job_id, Jsonb(request) if request is not None else None, reason),
    ).fetchone()
    return row is not None


def fail_job(
    conn: psycopg.Connection[Any], job_id: str, reason: str, request: dict[str, Any] | None = None
) -> bool:
    """Mark a job FAILED with ``reason`` (recording it first if it is new); a finished job is left alone.

    Returns whether this call failed it.
    """
    row = conn.execute(
        "INSERT INTO jobs (id, request, status, reason, finished_at) VALUES (%s, %s, 'FAILED', %s, now())"
        " ON CONFLICT (id) DO UPDATE SET status = 'FAILED', reason = EXCLUDED.reason,"
        "  finished_at = now(), updated_at = now()"
        " WHERE jobs.status NOT IN ('SUCCESS', 'PARTIAL', 'FAILED')"
        " RETURNING id",
        (job_id, Jsonb(request) if request is not None else None, reason),
    ).fetchone()
    return row is not None


def add_regions(
    conn: psycopg.Connection[Any], job_id: str, regions: Sequence[Window], tiles_per_region: Sequence[int]
) -> bool:
    """Record a STARTED job's regions and move it to IN_PROGRESS, in one transaction.

    False (and nothing written) when the job has its regions already: a redelivered request adds none.
    """
    with conn.transaction():
        moved = conn.execute(
            "UPDATE jobs SET status = 'IN_PROGRESS', regions_total = %s, tiles_total = %s, updated_at = now()"
            " WHERE id = %s AND status = 'STARTED' RETURNING 1",
            (len(regions), int(sum(tiles_per_region)), job_id),
        ).fetchone()
        if moved is None:
            return False
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO regions (job_id, region_index, col_off, row_off, width, height, tiles_total)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [
                    (job_id, i, w.col_off, w.row_off, w.width, w.height, int(n))
                    for i, (w, n) in enumerate(zip(regions, tiles_per_region, strict=True))
                ],
            )
    return True


def open_regions(conn: psycopg.Connection[Any], job_id: str) -> list[int]:
    """The indices of the job's regions not DONE or FAILED yet."""
    rows = conn.execute(
        "SELECT region_index FROM regions WHERE job_id = %s AND status IN ('PENDING', 'RUNNING')"
        " ORDER BY region_index",
        (job_id,),
    ).fetchall()
    return [int(r[0]) for r in rows]


def claim_region(
    conn: psycopg.Connection[Any], job_id: str, index: int, worker: str, lease_s: float
) -> Claim:
    """Take a region that is PENDING, or RUNNING under an expired lease (its worker died)."""
    row = conn.execute(
        "UPDATE regions SET status = 'RUNNING', worker = %s, attempts = attempts + 1,"
        "  lease_until = now() + make_interval(secs => %s), started_at = now(), error = NULL"
        " WHERE job_id = %s AND region_index = %s"
        "  AND (status = 'PENDING' OR (status = 'RUNNING' AND lease_until < now()))"
        " RETURNING col_off, row_off, width, height, attempts",
        (worker, float(lease_s), job_id, index),
    ).fetchone()
    if row is not None:
        return Claim(ClaimState.CLAIMED, Window(*row[:4]), attempts=int(row[4]))
    row = conn.execute(
        "SELECT status, GREATEST(EXTRACT(EPOCH FROM lease_until - now()), 0)"
        " FROM regions WHERE job_id = %s AND region_index = %s",
        (job_id, index),
    ).fetchone()
    if row is None:
        return Claim(ClaimState.MISSING)
    if row[0] in ("DONE", "FAILED"):
        return Claim(ClaimState.FINISHED)
    # RUNNING under a live lease (a PENDING row would have been claimed above, barring a race just now).
    return Claim(ClaimState.LEASED, lease_left_s=float(row[1] or 0.0))


def extend_region_lease(
    conn: psycopg.Connection[Any], job_id: str, index: int, worker: str, lease_s: float
) -> bool:
    """Push a held region's lease ``lease_s`` seconds from now; False when ``worker`` no longer holds it."""
    row = conn.execute(
        "UPDATE regions SET lease_until = now() + make_interval(secs => %s)"
        " WHERE job_id = %s AND region_index = %s AND status = 'RUNNING' AND worker = %s RETURNING 1",
        (float(lease_s), job_id, index, worker),
    ).fetchone()
    return row is not None


def complete_region(
    conn: psycopg.Connection[Any],
    job_id: str,
    index: int,
    detections: Detections,
    *,
    tiles: int,
    seconds: float,
    worker: str,
) -> bool:
    """Store a region's result and mark it DONE, in one UPDATE guarded by its status.

    True when this call completed it; False when it was already DONE (or FAILED): the region's result is
    then the one stored first, and this one is dropped, so a region is done at most once.
    """
    row = conn.execute(
        "UPDATE regions SET status = 'DONE', result = %s, tiles = %s, detections = %s, seconds = %s,"
        "  worker = %s, lease_until = NULL, finished_at = now(), error = NULL"
        " WHERE job_id = %s AND region_index = %s AND status = 'RUNNING' RETURNING 1",
        (detections_to_bytes(detections), int(tiles), len(detections), float(seconds), worker, job_id, index),
    ).fetchone()
    return row is not None


def fail_region(conn: psycopg.Connection[Any], job_id: str, index: int, error: str) -> bool:
    """Mark an open region FAILED with ``error``; False when it was closed already."""
    row = conn.execute(
        "UPDATE regions SET status = 'FAILED', error = %s, lease_until = NULL, finished_at = now()"
        " WHERE job_id = %s AND region_index = %s AND status IN ('PENDING', 'RUNNING') RETURNING 1",
        (error, job_id, index),
    ).fetchone()
    return row is not None


def fail_open_regions(conn: psycopg.Connection[Any], job_id: str, error: str) -> int:
    """Mark every open region of a job FAILED (the job failed as a whole); returns how many."""
    return conn.execute(
        "UPDATE regions SET status = 'FAILED', error = %s, lease_until = NULL, finished_at = now()"
        " WHERE job_id = %s AND status IN ('PENDING', 'RUNNING')",
        (error, job_id),
    ).rowcount


def release_region(conn: psycopg.Connection[Any], job_id: str, index: int, worker: str, error: str) -> bool:
    """Hand a region back after an unexpected error, so its next delivery claims it at once."""
    row = conn.execute(
        "UPDATE regions SET status = 'PENDING', error = %s, lease_until = NULL"
        " WHERE job_id = %s AND region_index = %s AND status = 'RUNNING' AND worker = %s RETURNING 1",
        (error, job_id, index, worker),
    ).fetchone()
    return row is not None


def claim_finalisation(conn: psycopg.Connection[Any], job_id: str, worker: str, lease_s: float) -> bool:
    """Claim the job's finalisation: True for exactly one caller once every region is DONE or FAILED.

    Run it in its own statement after the region's completion has committed (never in the same
    transaction): of two workers closing the last two regions at once, the later statement sees both.
    """
    row = conn.execute(
        "UPDATE jobs SET finaliser = %s, finalise_until = now() + make_interval(secs => %s),"
        "  updated_at = now()"
        " WHERE id = %s AND status = 'IN_PROGRESS'"
        "  AND (finaliser IS NULL OR finalise_until < now())"
        "  AND NOT EXISTS (SELECT 1 FROM regions r WHERE r.job_id = jobs.id"
        "                  AND r.status IN ('PENDING', 'RUNNING'))"
        " RETURNING 1",
        (worker, float(lease_s), job_id),
    ).fetchone()
    return row is not None


def finalisation_held_s(conn: psycopg.Connection[Any], job_id: str) -> float | None:
    """Seconds left on the finalisation claim another worker holds on an IN_PROGRESS job whose regions are
    all closed; None when nobody holds one, a region is open, or the job is closed (or missing)."""
    row = conn.execute(
        "SELECT status, finaliser, GREATEST(EXTRACT(EPOCH FROM finalise_until - now()), 0)"
        " FROM jobs WHERE id = %s",
        (job_id,),
    ).fetchone()
    if row and row[0] == "IN_PROGRESS" and row[1] is not None and not open_regions(conn, job_id):
        return float(row[2] or 0.0)
    return None


def release_finalisation(conn: psycopg.Connection[Any], job_id: str, worker: str) -> bool:
    """Drop ``worker``'s finalisation claim (its finalisation failed), so the job's next delivery claims it
    at once rather than after the lease; False when ``worker`` did not hold it."""
    cursor = conn.execute(
        "UPDATE jobs SET finaliser = NULL, finalise_until = NULL WHERE id = %s AND finaliser = %s",
        (job_id, worker),
    )
    return cursor.rowcount > 0


def extend_finalisation(conn: psycopg.Connection[Any], job_id: str, worker: str, lease_s: float) -> bool:
    """Keep a finalisation claim alive while the output is written."""
    row = conn.execute(
        "UPDATE jobs SET finalise_until = now() + make_interval(secs => %s)"
        " WHERE id = %s AND status = 'IN_PROGRESS' AND finaliser = %s RETURNING 1",
        (float(lease_s), job_id, worker),
    ).fetchone()
    return row is not None


def region_results(conn: psycopg.Connection[Any], job_id: str) -> list[RegionResult]:
    """Every closed region of a job with its detections (empty for FAILED ones), by index."""
    rows = conn.execute(
        "SELECT region_index, col_off, row_off, width, height, status, result, COALESCE(tiles, 0), error"
        " FROM regions WHERE job_id = %s AND status IN ('DONE', 'FAILED') ORDER BY region_index",
        (job_id,),
    ).fetchall()
    return [
        RegionResult(
            index=int(r[0]),
            window=Window(*r[1:5]),
            status=r[5],
            detections=detections_from_bytes(bytes(r[6])) if r[6] is not None else Detections.empty(),
            tiles=int(r[7]),
            error=r[8],
        )
        for r in rows
    ]


def finish_job(
    conn: psycopg.Connection[Any],
    job_id: str,
    worker: str,
    *,
    status: FinalStatus,
    reason: str | None,
    tiles: int,
    detections: int,
    output_uris: Sequence[str],
) -> bool:
    """Close a job the caller is finalising (SUCCESS, PARTIAL or FAILED); False if it does not hold it."""
    assert status in FINAL
    row = conn.execute(
        "UPDATE jobs SET status = %s, reason = %s, tiles = %s, detections = %s, output_uris = %s,"
        "  finished_at = now(), updated_at = now(), finalise_until = NULL"
        " WHERE id = %s AND status = 'IN_PROGRESS' AND finaliser = %s RETURNING 1",
        (status, reason, int(tiles), int(detections), list(output_uris), job_id, worker),
    ).fetchone()
    return row is not None


@dataclass(frozen=True)
class Progress:
    """How far a job has got."""

    status: JobStatus
    reason: str | None
    regions_total: int
    regions_closed: int
    tiles_total: int
    tiles_done: int
    regions_by_worker: dict[str, int]


def job_progress(conn: psycopg.Connection[Any], job_id: str) -> Progress | None:
    """Status, closed regions and tiles done so far, and DONE regions per worker."""
    job = get_job(conn, job_id)
    if job is None:
        return None
    rows = conn.execute(
        "SELECT worker, status, COALESCE(tiles, 0) FROM regions WHERE job_id = %s", (job_id,)
    ).fetchall()
    by_worker: dict[str, int] = {}
    for worker, status, _ in rows:
        if status == "DONE":
            by_worker[worker] = by_worker.get(worker, 0) + 1
    return Progress(
        status=job.status,
        reason=job.reason,
        regions_total=job.regions_total or 0,
        regions_closed=sum(1 for r in rows if r[1] in ("DONE", "FAILED")),
        tiles_total=job.tiles_total or 0,
        tiles_done=sum(int(r[2]) for r in rows if r[1] == "DONE"),
        regions_by_worker=by_worker,
    )
