"""The sight catalog's warehouse (``migrations/001_sight_catalog.sql``): cities, their sights, images, models
and the data marts. Labels and the labelling budget are :mod:`services.sight_catalog.labels`'.

A city's name is text and nothing else: stored as given (surrounding blanks dropped, Unicode composed),
compared case-insensitively, never parsed or evaluated, so a city called ``True``, ``null`` or
``'; DROP TABLE x; --`` is just that name. Its slug (:func:`slugify`: ASCII letters, digits and dashes)
names it in S3 keys and model names; a slug already taken gets a suffix (``paris-2``).

Images are recorded once per city and MD5 (:func:`add_image` says whether the row is new), models get the
next version of their city and start TRAINING (at most one at a time: a unique index), and end READY or
FAILED, once. Listings are pages in a stable order (by id), continued with :attr:`Page.next_after`.

Its parts: a city's models are :mod:`services.sight_catalog.model_versions`', the data marts
:mod:`services.sight_catalog.marts`' and the pages :mod:`services.sight_catalog.paging`'; every name is
importable from here as well.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from services.errors import UserError
from services.sight_catalog.marts import (
    CityMart,
    LabelMart,
    all_city_marts,
    city_mart,
    city_mart_row,
    label_mart,
    refresh_marts,
)
from services.sight_catalog.model_versions import (
    Model,
    get_model,
    list_models,
    mark_model_failed,
    mark_model_ready,
    model_for_job,
    next_model_version,
    ready_model,
    start_model,
    training_model,
    training_models,
)
from services.sight_catalog.paging import MAX_PAGE, Page, page_of, page_size

__all__ = [
    "KEY_PREFIX",
    "MAX_NAME",
    "MAX_PAGE",
    "MAX_SLUG",
    "MEDIA_TYPES",
    "City",
    "CityMart",
    "Image",
    "LabelMart",
    "Model",
    "Page",
    "Sight",
    "add_image",
    "add_sight",
    "all_city_marts",
    "city_by_id",
    "city_by_slug",
    "city_mart",
    "city_mart_row",
    "clean_name",
    "count_images",
    "create_city",
    "find_city",
    "find_image",
    "find_sight",
    "get_city",
    "get_image",
    "get_model",
    "get_sight",
    "image_key",
    "label_mart",
    "list_cities",
    "list_images",
    "list_models",
    "list_sights",
    "mark_model_failed",
    "mark_model_ready",
    "model_for_job",
    "next_model_version",
    "ready_model",
    "refresh_marts",
    "request_city",
    "set_held_out",
    "slugify",
    "start_model",
    "training_model",
    "training_models",
]

#: Longest city or sight name (the tables' CHECK).
MAX_NAME = 100
#: Longest slug (the table's CHECK: ``^[a-z0-9][a-z0-9-]{0,62}$``).
MAX_SLUG = 63
#: The key prefix the catalog may write under in the datasets bucket.
KEY_PREFIX = "catalog/"
MEDIA_TYPES = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_MD5 = re.compile(r"^[0-9a-f]{32}$")
#: Letters NFKD does not take apart into an ASCII letter and marks.
_LETTERS = str.maketrans(
    {"ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "đ": "d", "Đ": "D",
     "ł": "l", "Ł": "L", "þ": "th", "Þ": "TH", "ð": "d", "Ð": "D", "\u0131": "i"}
)  # fmt: skip


@dataclass(frozen=True)
class City:
    """A city's row (``label_budget`` and ``label_calls_used`` are read here, spent by ``labels``)."""

    id: int
    name: str
    slug: str
    label_budget: int
    label_calls_used: int
    requested_by: str | None
    created_at: dt.datetime


@dataclass(frozen=True)
class Sight:
    """A landmark of a city; its name is the detector's class name."""

    id: int
    city_id: int
    name: str
    created_at: dt.datetime


@dataclass(frozen=True)
class Image:
    """An image's row; its bytes are at ``s3_key`` in the datasets bucket."""

    id: int
    city_id: int
    sight_id: int | None
    md5: str
    s3_key: str
    source: str
    media_type: str
    width: int
    height: int
    size_bytes: int
    held_out: bool
    created_at: dt.datetime


# --- names --------------------------------------------------------------------------------------------------


def clean_name(name: object, what: str = "city") -> str:
    """``name`` as stored: composed (NFC), surrounding blanks dropped; UserError unless it is text of 1 to
    100 characters without control characters. Nothing else about it matters: it is never interpreted."""
    if not isinstance(name, str):
        raise UserError(f"a {what} name is text, not {type(name).__name__}")
    text = unicodedata.normalize("NFC", name).strip()
    if not text:
        raise UserError(f"a {what} name cannot be empty")
    if len(text) > MAX_NAME:
        raise UserError(f"a {what} name has at most {MAX_NAME} characters; {text[:20]!r}... has {len(text)}")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text):
        raise UserError(f"a {what} name cannot hold control characters: {text!r}")
    return text


def slugify(name: str) -> str:
    """An ASCII slug for ``name``: ``São Paulo`` -> ``sao-paulo``, ``Zürich`` -> ``zurich``; ``city`` when
    nothing of the name is ASCII. At most :data:`MAX_SLUG` characters."""
    ascii_text = (
        unicodedata.normalize("NFKD", name.translate(_LETTERS)).encode("ascii", "ignore").decode("ascii")
    )
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:MAX_SLUG].rstrip("-") or "city"


def _free_slug(conn: psycopg.Connection[Any], base: str) -> str:
    """``base``, or the first of ``base-2``, ``base-3``... that no city has (at the time of asking)."""
    for start in range(1, 100_000, 20):
        candidates = [_with_suffix(base, n) for n in range(start, start + 20)]
        taken = {
            str(r[0])
            for r in conn.execute(
                "SELECT slug FROM sight_cities WHERE slug = ANY(%s)", (candidates,)
            ).fetchall()
        }
        free = [c for c in candidates if c not in taken]
        if free:
            return free[0]
    raise UserError(f"every slug like {base!r} is taken")


def _with_suffix(base: str, n: int) -> str:
    if n == 1:
        return base
    suffix = f"-{n}"
    return base[: MAX_SLUG - len(suffix)].rstrip("-") + suffix


# --- cities -------------------------------------------------------------------------------------------------


def request_city(
    conn: psycopg.Connection[Any], name: str, *, requested_by: str | None = None
) -> tuple[City, bool]:
    """The city called ``name`` (any case), created when missing; True when it was created. Asking twice,
    or from two workers at once, makes one city."""
    name = clean_name(name)
    base = slugify(name)
    for _ in range(100):
        existing = find_city(conn, name)
        if existing is not None:
            return existing, False
        slug = _free_slug(conn, base)
        row = conn.execute(
            "INSERT INTO sight_cities (name, slug, requested_by) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING"
            " RETURNING id, name, slug, label_budget, label_calls_used, requested_by, created_at",
            (name, slug, requested_by),
        ).fetchone()
        if row is not None:
            return City(*row), True
        # The name arrived meanwhile (found on the next turn) or the slug was taken: try again.
    raise UserError(f"could not record the city {name!r}: its slug {base!r} stays taken; try again")


def create_city(conn: psycopg.Connection[Any], name: str, *, requested_by: str | None = None) -> City:
    """A new city called ``name``; UserError when a city of that name (any case) exists."""
    city, new = request_city(conn, name, requested_by=requested_by)
    if not new:
        raise UserError(f"the city {city.name!r} exists already (slug {city.slug})")
    return city


def find_city(conn: psycopg.Connection[Any], name: str) -> City | None:
    """The city called ``name`` (case-insensitively), or None."""
    row = conn.execute(
        "SELECT id, name, slug, label_budget, label_calls_used, requested_by, created_at"
        " FROM sight_cities WHERE lower(name) = lower(%s)",
        (unicodedata.normalize("NFC", name).strip(),),
    ).fetchone()
    return None if row is None else City(*row)


def city_by_slug(conn: psycopg.Connection[Any], slug: str) -> City | None:
    """The city whose slug is ``slug``, or None."""
    row = conn.execute(
        "SELECT id, name, slug, label_budget, label_calls_used, requested_by, created_at"
        " FROM sight_cities WHERE slug = %s",
        (slug,),
    ).fetchone()
    return None if row is None else City(*row)


def city_by_id(conn: psycopg.Connection[Any], city_id: int) -> City:
    """The city with id ``city_id``; UserError when there is none."""
    row = conn.execute(
        "SELECT id, name, slug, label_budget, label_calls_used, requested_by, created_at"
        " FROM sight_cities WHERE id = %s",
        (city_id,),
    ).fetchone()
    if row is None:
        raise UserError(f"no city with id {city_id}")
    return City(*row)


def get_city(conn: psycopg.Connection[Any], name_or_slug: str) -> City:
    """The city called ``name_or_slug`` (any case), else the one with that slug; UserError when neither."""
    city = find_city(conn, name_or_slug) or city_by_slug(conn, name_or_slug)
    if city is None:
        raise UserError(f"no city called {name_or_slug!r}; request it first")
    return city


def list_cities(conn: psycopg.Connection[Any], *, limit: int = 100, after: int | None = None) -> Page[City]:
    """Cities in the order they were created (by id), ``limit`` at a time, from after id ``after``."""
    limit = page_size(limit)
    rows = conn.execute(
        "SELECT id, name, slug, label_budget, label_calls_used, requested_by, created_at"
        " FROM sight_cities WHERE id > %s ORDER BY id LIMIT %s",
        (after or 0, limit + 1),
    ).fetchall()
    return page_of([City(*row) for row in rows], limit)


# --- sights -------------------------------------------------------------------------------------------------


def add_sight(conn: psycopg.Connection[Any], city_id: int, name: str) -> tuple[Sight, bool]:
    """The city's sight called ``name`` (exactly: it is a class name), created when missing; True when it
    was created. UserError when the city does not exist."""
    name = clean_name(name, "sight")
    try:
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO sight_sights (city_id, name) VALUES (%s, %s)"
                " ON CONFLICT (city_id, name) DO NOTHING RETURNING id, city_id, name, created_at",
                (city_id, name),
            ).fetchone()
    except psycopg.errors.ForeignKeyViolation:
        raise UserError(f"no city with id {city_id}") from None
    if row is not None:
        return Sight(*row), True
    existing = find_sight(conn, city_id, name)
    if existing is None:  # deleted between the two statements
        return add_sight(conn, city_id, name)
    return existing, False


def find_sight(conn: psycopg.Connection[Any], city_id: int, name: str) -> Sight | None:
    """The city's sight called exactly ``name``, or None."""
    row = conn.execute(
        "SELECT id, city_id, name, created_at FROM sight_sights WHERE city_id = %s AND name = %s",
        (city_id, unicodedata.normalize("NFC", name).strip()),
    ).fetchone()
    return None if row is None else Sight(*row)


def get_sight(conn: psycopg.Connection[Any], city: City, name: str) -> Sight:
    """The city's sight called ``name``; UserError naming the city's sights when there is none."""
    sight = find_sight(conn, city.id, name)
    if sight is None:
        known = ", ".join(s.name for s in list_sights(conn, city.id)) or "none yet"
        raise UserError(f"{city.name} has no sight called {name!r} (its sights: {known})")
    return sight


def list_sights(conn: psycopg.Connection[Any], city_id: int) -> list[Sight]:
    """The city's sights by name (a city has tens, not thousands)."""
    rows = conn.execute(
        "SELECT id, city_id, name, created_at FROM sight_sights WHERE city_id = %s ORDER BY name, id",
        (city_id,),
    ).fetchall()
    return [Sight(*row) for row in rows]


# --- images -------------------------------------------------------------------------------------------------


def image_key(slug: str, md5: str, media_type: str) -> str:
    """Where an image's bytes live in the datasets bucket: ``catalog/<slug>/images/<md5>.<ext>``."""
    if not _SLUG.match(slug) or not _MD5.match(md5) or media_type not in MEDIA_TYPES:
        raise ValueError(f"no image key for slug {slug!r}, md5 {md5!r}, {media_type!r}")
    return f"{KEY_PREFIX}{slug}/images/{md5}.{MEDIA_TYPES[media_type]}"


def add_image(
    conn: psycopg.Connection[Any],
    city_id: int,
    *,
    md5: str,
    s3_key: str,
    source: str,
    media_type: str,
    width: int,
    height: int,
    size_bytes: int,
    sight_id: int | None = None,
    held_out: bool = False,
) -> tuple[Image, bool]:
    """Record an image once per (city, MD5); True when new, else the image recorded first is returned."""
    if not s3_key.startswith(KEY_PREFIX):
        raise ValueError(f"image keys lie under {KEY_PREFIX}, not {s3_key!r}")
    row = conn.execute(
        "INSERT INTO sight_images (city_id, sight_id, md5, s3_key, source, media_type, width, height,"
        " size_bytes, held_out) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (city_id, md5) DO NOTHING"
        " RETURNING id, city_id, sight_id, md5, s3_key, source, media_type, width, height, size_bytes,"
        " held_out, created_at",
        (city_id, sight_id, md5, s3_key, source, media_type, width, height, size_bytes, held_out),
    ).fetchone()
    if row is not None:
        return Image(*row), True
    existing = find_image(conn, city_id, md5)
    if existing is None:  # deleted between the two statements
        return add_image(
            conn,
            city_id,
            md5=md5,
            s3_key=s3_key,
            source=source,
            media_type=media_type,
            width=width,
            height=height,
            size_bytes=size_bytes,
            sight_id=sight_id,
            held_out=held_out,
        )
    return existing, False


def find_image(conn: psycopg.Connection[Any], city_id: int, md5: str) -> Image | None:
    """The city's image with this MD5, or None."""
    row = conn.execute(
        "SELECT id, city_id, sight_id, md5, s3_key, source, media_type, width, height, size_bytes,"
        " held_out, created_at FROM sight_images WHERE city_id = %s AND md5 = %s",
        (city_id, md5),
    ).fetchone()
    return None if row is None else Image(*row)


def get_image(conn: psycopg.Connection[Any], image_id: int) -> Image:
    """The image with id ``image_id``; UserError when there is none."""
    row = conn.execute(
        "SELECT id, city_id, sight_id, md5, s3_key, source, media_type, width, height, size_bytes,"
        " held_out, created_at FROM sight_images WHERE id = %s",
        (image_id,),
    ).fetchone()
    if row is None:
        raise UserError(f"no image with id {image_id}")
    return Image(*row)


def list_images(
    conn: psycopg.Connection[Any],
    city_id: int,
    *,
    sight_id: int | None = None,
    held_out: bool | None = None,
    limit: int = 100,
    after: int | None = None,
) -> Page[Image]:
    """The city's images by id (optionally of one sight, or only held-out / only training ones)."""
    limit = page_size(limit)
    rows = conn.execute(
        "SELECT id, city_id, sight_id, md5, s3_key, source, media_type, width, height, size_bytes,"
        " held_out, created_at FROM sight_images"
        " WHERE city_id = %s AND id > %s AND (%s::bigint IS NULL OR sight_id = %s)"
        " AND (%s::boolean IS NULL OR held_out = %s) ORDER BY id LIMIT %s",
        (city_id, after or 0, sight_id, sight_id, held_out, held_out, limit + 1),
    ).fetchall()
    return page_of([Image(*row) for row in rows], limit)


def count_images(conn: psycopg.Connection[Any], city_id: int, *, sight_id: int | None = None) -> int:
    """How many images the city has (of one sight, when ``sight_id`` is given)."""
    row = conn.execute(
        "SELECT count(*) FROM sight_images WHERE city_id = %s AND (%s::bigint IS NULL OR sight_id = %s)",
        (city_id, sight_id, sight_id),
    ).fetchone()
    return int(row[0]) if row else 0


def set_held_out(conn: psycopg.Connection[Any], image_ids: Sequence[int], held_out: bool = True) -> int:
    """Hold images out of training (or put them back); returns how many rows changed."""
    cursor = conn.execute(
        "UPDATE sight_images SET held_out = %s WHERE id = ANY(%s) AND held_out <> %s",
        (held_out, list(image_ids), held_out),
    )
    return cursor.rowcount
