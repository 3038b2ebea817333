"""Rows and images for the labelling tests: a city with sights, images in the warehouse and in S3, written
with plain SQL (the warehouse's own functions are tested on their own)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from typing import Any

import psycopg
from PIL import Image

PARIS_SIGHTS = ("Eiffel Tower", "Louvre Pyramid", "Arc de Triomphe")
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def encoded(width: int, height: int, *, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A ``width`` x ``height`` image whose bytes differ by ``seed``."""
    picture = Image.new("RGB", (width, height), (seed % 256, (seed // 256) % 256, 128))
    picture.putpixel((0, 0), (255, 255, seed % 7))
    out = io.BytesIO()
    picture.save(out, format=fmt)
    return out.getvalue()


def add_city(
    conn: psycopg.Connection[Any],
    slug: str = "paris",
    *,
    sights: Sequence[str] = PARIS_SIGHTS,
    budget: int = 0,
) -> int:
    """A city with ``sights`` and a labelling budget; its id."""
    row = conn.execute(
        "INSERT INTO sight_cities (name, slug, label_budget) VALUES (%s, %s, %s) RETURNING id",
        (slug.title(), slug, budget),
    ).fetchone()
    assert row is not None
    city_id = int(row[0])
    for name in sights:
        conn.execute("INSERT INTO sight_sights (city_id, name) VALUES (%s, %s)", (city_id, name))
    return city_id


def add_image(
    conn: psycopg.Connection[Any],
    city_id: int,
    data: bytes,
    *,
    width: int,
    height: int,
    fmt: str = "PNG",
    s3: Any = None,
    bucket: str | None = None,
) -> int:
    """An image row (and its bytes in ``bucket`` when ``s3`` is given); its id."""
    md5 = hashlib.md5(data).hexdigest()
    key = f"sights/{city_id}/{md5}.{fmt.lower()}"
    if s3 is not None:
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    row = conn.execute(
        "INSERT INTO sight_images (city_id, md5, s3_key, source, media_type, width, height, size_bytes)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (city_id, md5, key, "test", MEDIA_TYPES.get(fmt, "image/png"), width, height, len(data)),
    ).fetchone()
    assert row is not None
    return int(row[0])


def labellings(conn: psycopg.Connection[Any], labeller: str) -> dict[int, int]:
    """Image id -> boxes, of every labelling by ``labeller``."""
    rows = conn.execute(
        "SELECT image_id, boxes FROM sight_labellings WHERE labeller = %s", (labeller,)
    ).fetchall()
    return {int(image_id): int(boxes) for image_id, boxes in rows}
