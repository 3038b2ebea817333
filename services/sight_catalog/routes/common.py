"""What the catalog API's routes share: the :class:`Catalog` they serve from, finding a city, pages with a
``next`` link, and JSON for what psycopg returns."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypeVar
from urllib.parse import urlencode

import psycopg
from fastapi import Query, Request
from fastapi.responses import JSONResponse

from services.sight_catalog import warehouse
from services.sight_catalog.callers import RateLimiter
from services.sight_catalog.pool import Pool
from services.sight_catalog.problems import Problem
from services.sight_catalog.recognition import Recogniser

if TYPE_CHECKING:
    from services.sight_catalog.api import Settings

#: The API's log: its lines keep the one name, whichever module of it writes them.
log = logging.getLogger("services.sight_catalog.api")

T = TypeVar("T")

Limit = Annotated[int, Query(ge=1, le=warehouse.MAX_PAGE, description="items per page")]
After = Annotated[int | None, Query(ge=0, description="the cursor: the `next` link carries it")]


@dataclass(frozen=True)
class Catalog:
    """What the routes serve from: the settings, the connection pool, the recogniser, the callers' rate
    limits, the slots of recognitions running at once, and the S3 client (``clients["s3"]``, made on the
    first upload when none was given)."""

    settings: Settings
    pool: Pool
    recogniser: Recogniser
    upload_limits: RateLimiter
    recognition_limits: RateLimiter
    recognising: threading.BoundedSemaphore
    clients: dict[str, Any]


def find(conn: psycopg.Connection[Any], ref: str) -> warehouse.City:
    """The city called ``ref`` (any case), else the one with that slug; 404 ``unknown-city``."""
    city = None
    if ref.strip():
        city = warehouse.find_city(conn, ref) or warehouse.city_by_slug(conn, ref)
    if city is None:
        raise Problem(
            "unknown-city",
            f"no city called {ref!r}: request it first (POST /api/cities) or use its slug",
            city=ref,
        )
    return city


def next_link(request: Request, after: int | None) -> str | None:
    """The URL of the page after ``after`` (the request's other parameters kept), or None."""
    if after is None:
        return None
    params = {k: v for k, v in request.query_params.items() if k != "after"}
    params["after"] = str(after)
    return f"{request.url.path}?{urlencode(params)}"


def paged(request: Request, body: dict[str, Any], after: int | None) -> JSONResponse:
    """``body`` with its ``next`` link, also as a ``Link`` header."""
    link = next_link(request, after)
    body["next"] = link
    headers = {"Link": f'<{link}>; rel="next"'} if link else {}
    return JSONResponse(jsonable(body), headers=headers)


def with_conn(pool: Pool, work: Callable[[psycopg.Connection[Any]], T]) -> T:
    """``work`` done on a connection of ``pool``."""
    with pool.connection() as conn:
        return work(conn)


def jsonable(value: Any) -> Any:
    """``value`` with its datetimes as ISO 8601 text."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value
