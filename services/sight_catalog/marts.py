"""The catalog's data marts (``sight_city_mart``, ``sight_label_mart``): materialised views of the cities
and their sights' labels, refreshed without blocking their readers."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import psycopg

from services.sight_catalog.paging import MAX_PAGE, Page, page_of, page_size


@dataclass(frozen=True)
class CityMart:
    """A city in ``sight_city_mart`` (as of ``refreshed_at``)."""

    city_id: int
    name: str
    slug: str
    sights: int
    images: int
    labelled_images: int
    unlabelled_images: int
    labels: int
    last_labelled_at: dt.datetime | None
    model_version: int | None
    training: bool
    refreshed_at: dt.datetime


@dataclass(frozen=True)
class LabelMart:
    """A sight in ``sight_label_mart``: labelled training images and boxes, and held-out images."""

    sight_id: int
    city_id: int
    name: str
    training_images: int
    training_labels: int
    held_out_images: int


def refresh_marts(conn: psycopg.Connection[Any]) -> None:
    """Refresh both marts (CONCURRENTLY, through ``sight_refresh_marts()``: readers are never blocked and
    see the old rows until the refresh commits)."""
    conn.execute("SELECT sight_refresh_marts()")


def city_mart(conn: psycopg.Connection[Any], *, limit: int = 100, after: int | None = None) -> Page[CityMart]:
    """Cities as the city mart last saw them, by city id, ``limit`` at a time."""
    limit = page_size(limit)
    rows = conn.execute(
        "SELECT city_id, name, slug, sights, images, labelled_images, unlabelled_images, labels,"
        " last_labelled_at, model_version, training, refreshed_at FROM sight_city_mart"
        " WHERE city_id > %s ORDER BY city_id LIMIT %s",
        (after or 0, limit + 1),
    ).fetchall()
    return page_of([CityMart(*row) for row in rows], limit, key=lambda c: c.city_id)


def city_mart_row(conn: psycopg.Connection[Any], city_id: int) -> CityMart | None:
    """One city as the city mart last saw it, or None (unknown, or newer than the last refresh)."""
    row = conn.execute(
        "SELECT city_id, name, slug, sights, images, labelled_images, unlabelled_images, labels,"
        " last_labelled_at, model_version, training, refreshed_at FROM sight_city_mart WHERE city_id = %s",
        (city_id,),
    ).fetchone()
    return None if row is None else CityMart(*row)


def label_mart(conn: psycopg.Connection[Any], city_id: int) -> list[LabelMart]:
    """The city's sights as the label mart last saw them, by name."""
    rows = conn.execute(
        "SELECT sight_id, city_id, name, training_images, training_labels, held_out_images"
        " FROM sight_label_mart WHERE city_id = %s ORDER BY name, sight_id",
        (city_id,),
    ).fetchall()
    return [LabelMart(*row) for row in rows]


def all_city_marts(conn: psycopg.Connection[Any]) -> list[CityMart]:
    """Every city as the city mart last saw it, by city id (all pages of :func:`city_mart`)."""
    found: list[CityMart] = []
    after: int | None = None
    while True:
        page = city_mart(conn, limit=MAX_PAGE, after=after)
        found.extend(page.items)
        if page.next_after is None:
            return found
        after = page.next_after
