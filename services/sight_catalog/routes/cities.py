"""The catalog API's cities: listing and requesting them, one city with its status, and its sights."""

from __future__ import annotations

from typing import Annotated

from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse

from services.errors import UserError
from services.sight_catalog import warehouse
from services.sight_catalog.callers import Reader, Writer
from services.sight_catalog.problems import ERRORS, Problem
from services.sight_catalog.routes.common import After, Catalog, Limit, find, jsonable, paged
from services.sight_catalog.schemas import (
    CityDetail,
    CityOut,
    CityRequest,
    Page,
    SightOut,
    city_out,
    city_status,
)


def add_routes(app: FastAPI, catalog: Catalog) -> None:
    """``/api/cities``, ``/api/cities/{city}`` and ``/api/cities/{city}/sights``."""
    pool = catalog.pool

    @app.get(
        "/api/cities",
        response_model=Page[CityOut],
        tags=["cities"],
        summary="List cities",
        responses={401: ERRORS[401], 422: ERRORS[422]},
    )
    def list_cities(request: Request, who: Reader, limit: Limit = 100, after: After = None) -> JSONResponse:
        """Cities in the order they were requested, ``limit`` at a time; follow ``next``."""
        with pool.connection() as conn:
            page = warehouse.list_cities(conn, limit=limit, after=after)
        return paged(request, {"items": [city_out(c) for c in page.items]}, page.next_after)

    @app.post(
        "/api/cities",
        response_model=CityDetail,
        status_code=201,
        tags=["cities"],
        summary="Request a city",
        responses={200: {"model": CityDetail, "description": "the city existed"}, **ERRORS},
    )
    def request_city(request: Request, who: Writer, wanted: Annotated[CityRequest, Body()]) -> JSONResponse:
        """Start collecting a city (201), or find it when it exists under that name in any case (200)."""
        try:
            name = warehouse.clean_name(wanted.name)
        except UserError as exc:
            raise Problem("invalid-name", str(exc)) from None
        with pool.connection() as conn:
            city, created = warehouse.request_city(conn, name, requested_by=f"api:{who.key}")
            body = {**city_out(city), "status": city_status(conn, city)}
        headers = {"Location": body["url"]}
        return JSONResponse(jsonable(body), status_code=201 if created else 200, headers=headers)

    @app.get(
        "/api/cities/{city}",
        response_model=CityDetail,
        tags=["cities"],
        summary="A city and its status",
        responses={401: ERRORS[401], 404: ERRORS[404]},
    )
    def get_city(city: str, who: Reader) -> JSONResponse:
        """The city (by slug or name) with its live status: sights, images, labels, model, training."""
        with pool.connection() as conn:
            found = find(conn, city)
            body = {**city_out(found), "status": city_status(conn, found)}
        return JSONResponse(jsonable(body))

    @app.get(
        "/api/cities/{city}/sights",
        response_model=Page[SightOut],
        tags=["cities"],
        summary="A city's sights",
        responses={401: ERRORS[401], 404: ERRORS[404]},
    )
    def list_sights(
        request: Request, city: str, who: Reader, limit: Limit = 100, after: After = None
    ) -> JSONResponse:
        """The city's sights by id (their names are its models' class names)."""
        with pool.connection() as conn:
            found = find(conn, city)
            sights = sorted(warehouse.list_sights(conn, found.id), key=lambda s: s.id)
        rest = [s for s in sights if s.id > (after or 0)]
        items = rest[:limit]
        more = items[-1].id if len(rest) > limit else None
        body = {"items": [{"id": s.id, "name": s.name, "created_at": s.created_at} for s in items]}
        return paged(request, body, more)
