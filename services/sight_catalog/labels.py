"""Labels in the warehouse: who looked at an image (``sight_labellings``), the boxes found (``sight_labels``),
and each city's budget of calls to an external labeller.

A labelling is recorded once per (image, labeller), with its boxes, in one transaction
(:func:`record_labelling`): a second labelling by the same labeller changes nothing and returns the first.
Boxes are clipped to the image; boxes left empty, inverted or with a coordinate that is not a number are
dropped. A labelling that found nothing is recorded too (``boxes = 0``), so the image is not sent to the
same labeller again.

The budget (``sight_cities.label_budget``, ``label_calls_used``) caps the calls to a paid labeller. It is
spent before each call by :func:`spend`, one conditional ``UPDATE`` that adds the calls only where they
still fit: concurrent workers cannot pass the budget between a read and a write, because there is no read.
Run it on an autocommit connection, so the city's row is locked for that one statement only.

Workers labelling the same city share the images out with :func:`claim` (a session advisory lock per image
and labeller, never waited on), so no image is sent to a paid labeller twice.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from services.errors import UserError

#: The largest budget the warehouse holds (``integer`` columns).
MAX_BUDGET = 2**31 - 1


@dataclass(frozen=True)
class Box:
    """A box a labeller drew: ``sight`` by name, corners in pixels of the stored image (x0 < x1, y0 < y1),
    ``score`` in [0, 1] (None: a person drew it)."""

    sight: str
    x0: float
    y0: float
    x1: float
    y1: float
    score: float | None = None


@dataclass(frozen=True)
class Label:
    """A stored box (``sight_labels``) with its sight's name."""

    id: int
    image_id: int
    sight_id: int
    sight: str
    labeller: str
    x0: float
    y0: float
    x1: float
    y1: float
    score: float | None


@dataclass(frozen=True)
class Labelling:
    """What :func:`record_labelling` did: ``new`` is False when the labeller had labelled the image already,
    and the labelling returned is that first one. ``dropped`` counts the boxes left out (empty once clipped
    to the image, or not numbers)."""

    new: bool
    image_id: int
    labeller: str
    boxes: int
    labelled_at: dt.datetime
    dropped: int = 0


@dataclass(frozen=True)
class ImageToLabel:
    """An image waiting for a labeller: its bytes (at ``s3_key`` in the datasets bucket) and its size."""

    id: int
    city_id: int
    s3_key: str
    media_type: str
    width: int
    height: int


@dataclass(frozen=True)
class Budget:
    """A city's budget of external labelling calls and how much of it is used."""

    city_id: int
    budget: int
    used: int

    @property
    def remaining(self) -> int:
        """Calls still allowed."""
        return self.budget - self.used


def sight_names(conn: psycopg.Connection[Any], city_id: int) -> list[str]:
    """The names of the city's sights, in the order they were added; UserError for an unknown city."""
    _check_city(conn, city_id)
    rows = conn.execute("SELECT name FROM sight_sights WHERE city_id = %s ORDER BY id", (city_id,)).fetchall()
    return [str(name) for (name,) in rows]


def clip_boxes(boxes: Sequence[Box], width: int, height: int) -> tuple[list[Box], int]:
    """``boxes`` clipped to a ``width`` x ``height`` image, and how many were dropped: empty or inverted
    once clipped, or with a coordinate that is not a finite number. Scores are clamped to [0, 1] (a NaN
    score becomes None)."""
    kept: list[Box] = []
    for box in boxes:
        corners = (box.x0, box.y0, box.x1, box.y1)
        if not all(math.isfinite(v) for v in corners):
            continue
        x0, x1 = min(max(box.x0, 0.0), width), min(max(box.x1, 0.0), width)
        y0, y1 = min(max(box.y0, 0.0), height), min(max(box.y1, 0.0), height)
        if not (x1 > x0 and y1 > y0):
            continue
        score = box.score
        if score is not None:
            score = None if math.isnan(score) else min(max(float(score), 0.0), 1.0)
        kept.append(Box(box.sight, float(x0), float(y0), float(x1), float(y1), score))
    return kept, len(boxes) - len(kept)


def record_labelling(
    conn: psycopg.Connection[Any],
    image_id: int,
    labeller: str,
    boxes: Sequence[Box],
    *,
    rejected: str | None = None,
) -> Labelling:
    """Record that ``labeller`` looked at the image and found ``boxes`` (maybe none), in one transaction;
    with ``rejected`` (the reason), that it refused the image (REJECTED, no boxes).

    Sight names are the image's city's (exact, else the one sight whose name matches ignoring case); a
    name the city lacks is a UserError and nothing is recorded. Boxes are clipped (:func:`clip_boxes`). A
    labeller that labelled the image already records nothing: its first labelling is returned.
    """
    labeller = _checked_labeller(labeller)
    with conn.transaction():
        image = conn.execute(
            "SELECT city_id, width, height FROM sight_images WHERE id = %s", (image_id,)
        ).fetchone()
        if image is None:
            raise UserError(f"no image {image_id} in the sight catalog")
        city_id, width, height = int(image[0]), int(image[1]), int(image[2])
        kept, dropped = clip_boxes(boxes, width, height) if rejected is None else ([], len(boxes))
        sight_ids = _sight_ids(conn, city_id, {box.sight for box in kept})
        row = conn.execute(
            "INSERT INTO sight_labellings (image_id, labeller, boxes, status, reason)"
            " VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (image_id, labeller) DO NOTHING RETURNING labelled_at",
            (image_id, labeller, len(kept), "DONE" if rejected is None else "REJECTED", rejected),
        ).fetchone()
        if row is None:
            existing = find_labelling(conn, image_id, labeller)
            if existing is None:  # deleted between the two statements: not possible inside one transaction
                raise RuntimeError(f"labelling of image {image_id} by {labeller} vanished")
            return existing
        if kept:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO sight_labels (image_id, sight_id, labeller, x0, y0, x1, y1, score)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    [(image_id, sight_ids[b.sight], labeller, b.x0, b.y0, b.x1, b.y1, b.score) for b in kept],
                )
        return Labelling(True, image_id, labeller, len(kept), row[0], dropped)


def find_labelling(conn: psycopg.Connection[Any], image_id: int, labeller: str) -> Labelling | None:
    """The labeller's labelling of the image, or None when it has not labelled it."""
    row = conn.execute(
        "SELECT boxes, labelled_at FROM sight_labellings WHERE image_id = %s AND labeller = %s",
        (image_id, labeller),
    ).fetchone()
    if row is None:
        return None
    return Labelling(False, image_id, labeller, int(row[0]), row[1])


def images_to_label(
    conn: psycopg.Connection[Any],
    city_id: int,
    labeller: str,
    *,
    limit: int = 100,
    unlabelled_only: bool = False,
) -> list[ImageToLabel]:
    """Up to ``limit`` of the city's images the labeller has not labelled, oldest first; with
    ``unlabelled_only``, only images no labeller has looked at (so a new model version does not relabel,
    ahead of the new images, what a person or Rekognition labelled already)."""
    if limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    rows = conn.execute(
        "SELECT i.id, i.city_id, i.s3_key, i.media_type, i.width, i.height FROM sight_images i"
        " WHERE i.city_id = %s AND NOT EXISTS"
        " (SELECT 1 FROM sight_labellings l WHERE l.image_id = i.id AND (l.labeller = %s OR %s))"
        " ORDER BY i.id LIMIT %s",
        (city_id, labeller, unlabelled_only, limit),
    ).fetchall()
    return [ImageToLabel(int(r[0]), int(r[1]), str(r[2]), str(r[3]), int(r[4]), int(r[5])) for r in rows]


def labels_of(conn: psycopg.Connection[Any], image_id: int, *, labeller: str | None = None) -> list[Label]:
    """The boxes on an image (optionally one labeller's), in the order they were recorded."""
    rows = conn.execute(
        "SELECT b.id, b.image_id, b.sight_id, s.name, b.labeller, b.x0, b.y0, b.x1, b.y1, b.score"
        " FROM sight_labels b JOIN sight_sights s ON s.id = b.sight_id"
        " WHERE b.image_id = %s AND (%s::text IS NULL OR b.labeller = %s) ORDER BY b.id",
        (image_id, labeller, labeller),
    ).fetchall()
    return [_label(r) for r in rows]


def claim(conn: psycopg.Connection[Any], image_id: int, labeller: str) -> bool:
    """Take the image for this labeller, for this connection's session, unless another worker has it
    (never waits). Release it with :func:`release`; a worker that dies releases it with its connection."""
    row = conn.execute(
        "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (_claim_key(image_id, labeller),)
    ).fetchone()
    return bool(row and row[0])


def release(conn: psycopg.Connection[Any], image_id: int, labeller: str) -> None:
    """Give back an image taken with :func:`claim`."""
    conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (_claim_key(image_id, labeller),))


def spend(conn: psycopg.Connection[Any], city_id: int, calls: int = 1) -> bool:
    """Spend ``calls`` of the city's budget before making them: True when they fit and are now counted,
    False when the budget cannot cover them (nothing is counted). One conditional UPDATE, so it holds under
    any number of concurrent workers. UserError for an unknown city."""
    if calls < 1:
        raise UserError(f"calls must be at least 1, got {calls}")
    row = conn.execute(
        "UPDATE sight_cities SET label_calls_used = label_calls_used + %s"
        " WHERE id = %s AND label_calls_used + %s <= label_budget RETURNING label_calls_used",
        (calls, city_id, calls),
    ).fetchone()
    if row is None:
        _check_city(conn, city_id)
        return False
    return True


def refund(conn: psycopg.Connection[Any], city_id: int, calls: int = 1) -> None:
    """Give back ``calls`` spent on calls that were never made (the request never left: no connection)."""
    if calls < 1:
        raise UserError(f"calls must be at least 1, got {calls}")
    conn.execute(
        "UPDATE sight_cities SET label_calls_used = greatest(label_calls_used - %s, 0) WHERE id = %s",
        (calls, city_id),
    )


def set_budget(conn: psycopg.Connection[Any], city_id: int, budget: int) -> Budget:
    """Set the city's budget of external calls (in all, not per period). It cannot go below the calls
    already made: that is a UserError saying how many were."""
    if not 0 <= budget <= MAX_BUDGET:
        raise UserError(f"a labelling budget is between 0 and {MAX_BUDGET} calls, got {budget}")
    row = conn.execute(
        "UPDATE sight_cities SET label_budget = %s WHERE id = %s AND label_calls_used <= %s"
        " RETURNING label_budget, label_calls_used",
        (budget, city_id, budget),
    ).fetchone()
    if row is None:
        used = budget_of(conn, city_id).used
        raise UserError(
            f"city {city_id} has made {used} labelling calls already; its budget cannot be less ({budget})"
        )
    return Budget(city_id, int(row[0]), int(row[1]))


def budget_of(conn: psycopg.Connection[Any], city_id: int) -> Budget:
    """The city's budget and the calls made; UserError for an unknown city."""
    row = conn.execute(
        "SELECT label_budget, label_calls_used FROM sight_cities WHERE id = %s", (city_id,)
    ).fetchone()
    if row is None:
        raise UserError(f"no city {city_id} in the sight catalog")
    return Budget(city_id, int(row[0]), int(row[1]))


def remaining(conn: psycopg.Connection[Any], city_id: int) -> int:
    """External calls the city may still make."""
    return budget_of(conn, city_id).remaining


def _label(row: Any) -> Label:
    score = None if row[9] is None else float(row[9])
    x0, y0, x1, y1 = (float(v) for v in row[5:9])
    return Label(int(row[0]), int(row[1]), int(row[2]), str(row[3]), str(row[4]), x0, y0, x1, y1, score)


def _check_city(conn: psycopg.Connection[Any], city_id: int) -> None:
    if conn.execute("SELECT 1 FROM sight_cities WHERE id = %s", (city_id,)).fetchone() is None:
        raise UserError(f"no city {city_id} in the sight catalog")


def _sight_ids(conn: psycopg.Connection[Any], city_id: int, names: set[str]) -> dict[str, int]:
    """Each name's sight id in the city: the exact name, else the one sight equal to it ignoring case."""
    if not names:
        return {}
    rows = conn.execute("SELECT id, name FROM sight_sights WHERE city_id = %s", (city_id,)).fetchall()
    exact = {str(name): int(sid) for sid, name in rows}
    folded: dict[str, list[int]] = {}
    for sid, name in rows:
        folded.setdefault(str(name).casefold(), []).append(int(sid))
    found: dict[str, int] = {}
    for name in names:
        if name in exact:
            found[name] = exact[name]
        elif len(folded.get(name.casefold(), [])) == 1:
            found[name] = folded[name.casefold()][0]
        else:
            raise UserError(f"city {city_id} has no sight {name!r}; add it first, or fix the label")
    return found


def _checked_labeller(labeller: str) -> str:
    if not 1 <= len(labeller) <= 200 or labeller != labeller.strip():
        raise UserError(f"a labeller is 1 to 200 characters without spaces around them, got {labeller!r}")
    return labeller


def _claim_key(image_id: int, labeller: str) -> str:
    return f"sight-labelling:{labeller}:{image_id}"
