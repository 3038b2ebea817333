"""Sky jobs and shards in PostgreSQL (``migrations/001_sky_jobs_and_shards.sql``).

A job is recorded once (its id is the key; a redelivered job message finds it); its shards are rows
added once each. A shard is claimed by one worker at a time under a lease (PENDING, or RUNNING under an
expired lease: its worker died), extended while the worker renders, and closed DONE or FAILED by an UPDATE
guarded by its status, so a shard delivered twice is recorded once. A job is closed by an UPDATE guarded by
"no shard open", so exactly one worker closes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

FINAL = ("SUCCESS", "PARTIAL", "FAILED")


@dataclass(frozen=True)
class SkyJobRecord:
    """A job's row."""

    id: str
    job: dict[str, Any]
    status: str
    reason: str | None
    output: str
    shards_total: int
    frames_total: int
    frames_done: int
    manifest: str | None


@dataclass(frozen=True)
class ShardRecord:
    """A shard's row (what reports need)."""

    shard: int
    frames: int
    status: str
    attempts: int
    worker: str | None
    error: str | None
    median_px: float | None
    worst_px: float | None


@dataclass(frozen=True)
class Claim:
    """What claiming a shard found: ``claimed``, ``leased`` (another live worker has it; for
    ``lease_left_s``), ``finished`` or ``missing``."""

    state: str
    lease_left_s: float = 0.0


def create_job(
    conn: psycopg.Connection[Any], job: dict[str, Any], *, output: str, shard_frames: list[int]
) -> bool:
    """Record a job (STARTED) and its shards (PENDING) in one transaction; False when the id exists."""
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO sky_jobs (id, job, status, output, shards_total, frames_total)"
            " VALUES (%s, %s, 'STARTED', %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
            (job["job_id"], Jsonb(job), output, len(shard_frames), sum(shard_frames)),
        ).fetchone()
        if row is None:
            return False
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO sky_shards (job_id, shard, frames) VALUES (%s, %s, %s)",
                [(job["job_id"], shard, frames) for shard, frames in enumerate(shard_frames)],
            )
    return True


def get_job(conn: psycopg.Connection[Any], job_id: str) -> SkyJobRecord | None:
    """The job's row, or None."""
    row = conn.execute(
        "SELECT id, job, status, reason, output, shards_total, frames_total, frames_done, manifest"
        " FROM sky_jobs WHERE id = %s",
        (job_id,),
    ).fetchone()
    return None if row is None else SkyJobRecord(*row)


def shards(conn: psycopg.Connection[Any], job_id: str) -> list[ShardRecord]:
    """The job's shards, in order."""
    rows = conn.execute(
        "SELECT shard, frames, status, attempts, worker, error, median_px, worst_px FROM sky_shards"
        " WHERE job_id = %s ORDER BY shard",
        (job_id,),
    ).fetchall()
    return [ShardRecord(*row) for row in rows]


def open_shards(conn: psycopg.Connection[Any], job_id: str) -> list[int]:
    """The shards not DONE or FAILED yet."""
    rows = conn.execute(
        "SELECT shard FROM sky_shards WHERE job_id = %s AND status IN ('PENDING', 'RUNNING') ORDER BY shard",
        (job_id,),
    ).fetchall()
    return [int(r[0]) for r in rows]


def mark_in_progress(conn: psycopg.Connection[Any], job_id: str) -> None:
    """STARTED -> IN_PROGRESS (the shards are on the queue)."""
    conn.execute(
        "UPDATE sky_jobs SET status = 'IN_PROGRESS', updated_at = now() WHERE id = %s AND status = 'STARTED'",
        (job_id,),
    )


def claim_shard(conn: psycopg.Connection[Any], job_id: str, shard: int, worker: str, lease_s: float) -> Claim:
    """Take a shard that is PENDING, or RUNNING under an expired lease (its worker died)."""
    row = conn.execute(
        "UPDATE sky_shards SET status = 'RUNNING', worker = %s, attempts = attempts + 1,"
        "  lease_until = now() + make_interval(secs => %s), started_at = now(), error = NULL"
        " WHERE job_id = %s AND shard = %s"
        "  AND (status = 'PENDING' OR (status = 'RUNNING' AND lease_until < now())) RETURNING 1",
        (worker, float(lease_s), job_id, shard),
    ).fetchone()
    if row is not None:
        return Claim("claimed")
    row = conn.execute(
        "SELECT status, GREATEST(EXTRACT(EPOCH FROM lease_until - now()), 0) FROM sky_shards"
        " WHERE job_id = %s AND shard = %s",
        (job_id, shard),
    ).fetchone()
    if row is None:
        return Claim("missing")
    if row[0] in ("DONE", "FAILED"):
        return Claim("finished")
    return Claim("leased", lease_left_s=float(row[1] or 0.0))


def extend_lease(conn: psycopg.Connection[Any], job_id: str, shard: int, worker: str, lease_s: float) -> bool:
    """Push a held shard's lease ``lease_s`` seconds from now; False when ``worker`` no longer holds it."""
    row = conn.execute(
        "UPDATE sky_shards SET lease_until = now() + make_interval(secs => %s)"
        " WHERE job_id = %s AND shard = %s AND status = 'RUNNING' AND worker = %s RETURNING 1",
        (float(lease_s), job_id, shard, worker),
    ).fetchone()
    return row is not None


def complete_shard(  # noqa: PLR0917 - one shard's outcome
    conn: psycopg.Connection[Any],
    job_id: str,
    shard: int,
    worker: str,
    seconds: float,
    proven: int,
    median_px: float | None,
    worst_px: float | None,
) -> bool:
    """Mark a shard DONE (once: False when it was closed already) and count its frames into the job."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE sky_shards SET status = 'DONE', worker = %s, seconds = %s, proven = %s, median_px = %s,"
            "  worst_px = %s, lease_until = NULL, finished_at = now(), error = NULL"
            " WHERE job_id = %s AND shard = %s AND status = 'RUNNING' RETURNING frames",
            (worker, float(seconds), proven, median_px, worst_px, job_id, shard),
        ).fetchone()
        if row is None:
            return False
        conn.execute(
            "UPDATE sky_jobs SET frames_done = frames_done + %s, updated_at = now() WHERE id = %s",
            (int(row[0]), job_id),
        )
    return True


def fail_shard(conn: psycopg.Connection[Any], job_id: str, shard: int, error: str) -> bool:
    """Mark an open shard FAILED with ``error``; False when it was closed already."""
    row = conn.execute(
        "UPDATE sky_shards SET status = 'FAILED', error = %s, lease_until = NULL, finished_at = now()"
        " WHERE job_id = %s AND shard = %s AND status IN ('PENDING', 'RUNNING') RETURNING 1",
        (error, job_id, shard),
    ).fetchone()
    return row is not None


def release_shard(conn: psycopg.Connection[Any], job_id: str, shard: int, worker: str, error: str) -> bool:
    """Hand a shard back (PENDING) so its next delivery claims it at once."""
    row = conn.execute(
        "UPDATE sky_shards SET status = 'PENDING', error = %s, lease_until = NULL"
        " WHERE job_id = %s AND shard = %s AND status = 'RUNNING' AND worker = %s RETURNING 1",
        (error, job_id, shard, worker),
    ).fetchone()
    return row is not None


def finish_job(conn: psycopg.Connection[Any], job_id: str, *, manifest: str | None) -> str | None:
    """Close the job when no shard is open: SUCCESS (every shard DONE), PARTIAL (some FAILED) or FAILED
    (none DONE), with the failed shards' reasons. Returns the status set, or None when a shard is still
    open or another worker closed it first."""
    row = conn.execute(
        "WITH counts AS (SELECT count(*) FILTER (WHERE status = 'DONE') AS done,"
        "   count(*) FILTER (WHERE status = 'FAILED') AS failed,"
        "   count(*) FILTER (WHERE status IN ('PENDING', 'RUNNING')) AS open,"
        "   string_agg(CASE WHEN status = 'FAILED'"
        "              THEN 'shard ' || shard || ': ' || coalesce(error, '?') END,"
        "              '; ' ORDER BY shard) AS reasons"
        "   FROM sky_shards WHERE job_id = %(id)s)"
        " UPDATE sky_jobs SET"
        "   status = CASE WHEN counts.failed = 0 THEN 'SUCCESS' WHEN counts.done = 0 THEN 'FAILED'"
        "                 ELSE 'PARTIAL' END,"
        "   reason = CASE WHEN counts.failed = 0 THEN NULL ELSE left(counts.reasons, 4000) END,"
        "   manifest = CASE WHEN counts.done = 0 THEN NULL ELSE %(manifest)s END,"
        "   finished_at = now(), updated_at = now()"
        " FROM counts WHERE sky_jobs.id = %(id)s AND counts.open = 0"
        "   AND sky_jobs.status NOT IN ('SUCCESS', 'PARTIAL', 'FAILED')"
        " RETURNING sky_jobs.status",
        {"id": job_id, "manifest": manifest},
    ).fetchone()
    return None if row is None else str(row[0])


def fail_job(conn: psycopg.Connection[Any], job_id: str, reason: str) -> None:
    """Fail a job and its open shards (it cannot go on: a nightless time range, a refused output)."""
    with conn.transaction():
        conn.execute(
            "UPDATE sky_shards SET status = 'FAILED', error = %s, lease_until = NULL, finished_at = now()"
            " WHERE job_id = %s AND status IN ('PENDING', 'RUNNING')",
            (reason, job_id),
        )
        conn.execute(
            "UPDATE sky_jobs SET status = 'FAILED', reason = %s, finished_at = now(), updated_at = now()"
            " WHERE id = %s AND status NOT IN ('SUCCESS', 'PARTIAL', 'FAILED')",
            (reason, job_id),
        )
