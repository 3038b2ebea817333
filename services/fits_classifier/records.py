"""Verdicts in PostgreSQL (``migrations/001_fits_verdicts.sql``), once per frame checksum and model version.

:func:`record` inserts a verdict unless the same frame (checksum) was already judged by the same model
(name and version); it says which happened, so a redelivered event or a restarted watcher adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from services.fits_classifier.verdicts import Verdict


@dataclass(frozen=True)
class Recorded:
    """What :func:`record` did: ``new`` is False when the frame already had a verdict from this model, which
    is then the verdict returned (``verdict``, ``score``, ``annotated``)."""

    new: bool
    id: int
    verdict: str
    score: float | None
    annotated: str | None


def record(conn: psycopg.Connection[Any], verdict: Verdict, *, annotated: str | None = None) -> Recorded:
    """Store ``verdict`` (with where its annotated copy was written) unless one exists; see the module."""
    row = conn.execute(
        "INSERT INTO fits_verdicts (checksum, model_name, model_version, source, size_bytes, status, verdict,"
        " score, probabilities, reason, hdu, annotated, seconds, classified_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (checksum, model_name, model_version) DO NOTHING RETURNING id",
        (
            verdict.checksum,
            verdict.model_name,
            verdict.model_version,
            verdict.source,
            verdict.size_bytes,
            verdict.status,
            verdict.verdict,
            verdict.score,
            None if verdict.probabilities is None else Jsonb(verdict.probabilities),
            verdict.reason,
            verdict.hdu,
            annotated,
            verdict.seconds,
            verdict.classified_at,
        ),
    ).fetchone()
    if row is not None:
        return Recorded(True, int(row[0]), verdict.verdict, verdict.score, annotated)
    existing = find(conn, verdict.checksum, verdict.model_name, verdict.model_version)
    if existing is None:  # deleted between the two statements: record it again
        return record(conn, verdict, annotated=annotated)
    return existing


def find(
    conn: psycopg.Connection[Any], checksum: str, model_name: str, model_version: str
) -> Recorded | None:
    """The verdict this model gave the frame with ``checksum``, or None."""
    row = conn.execute(
        "SELECT id, verdict, score, annotated FROM fits_verdicts"
        " WHERE checksum = %s AND model_name = %s AND model_version = %s",
        (checksum, model_name, model_version),
    ).fetchone()
    if row is None:
        return None
    return Recorded(False, int(row[0]), str(row[1]), None if row[2] is None else float(row[2]), row[3])


def counts(conn: psycopg.Connection[Any], *, model_name: str | None = None) -> dict[str, int]:
    """How many frames have each verdict (optionally for one model)."""
    rows = conn.execute(
        "SELECT verdict, count(*) FROM fits_verdicts"
        " WHERE %s::text IS NULL OR model_name = %s GROUP BY verdict",
        (model_name, model_name),
    ).fetchall()
    return {str(verdict): int(n) for verdict, n in rows}
