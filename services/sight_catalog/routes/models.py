"""The catalog API's models: a city's model versions, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse

from services.sight_catalog import warehouse
from services.sight_catalog.callers import Reader
from services.sight_catalog.problems import ERRORS
from services.sight_catalog.routes.common import Catalog, Limit, find, paged
from services.sight_catalog.schemas import ModelOut, Page, model_out


def add_routes(app: FastAPI, catalog: Catalog) -> None:
    """``GET /api/cities/{city}/models``."""
    pool = catalog.pool

    @app.get(
        "/api/cities/{city}/models",
        response_model=Page[ModelOut],
        tags=["models"],
        summary="A city's models",
        responses={401: ERRORS[401], 404: ERRORS[404]},
    )
    def list_models(
        request: Request,
        city: str,
        who: Reader,
        limit: Limit = 100,
        after: Annotated[
            int | None, Query(ge=0, description="versions older than this (the `next` link)")
        ] = None,
    ) -> JSONResponse:
        """The city's model versions, newest first (READY ones serve recognitions; the newest wins)."""
        with pool.connection() as conn:
            found = find(conn, city)
            models = warehouse.list_models(conn, found.id)
        rest = [m for m in models if after is None or m.version < after]
        items = rest[:limit]
        more = items[-1].version if len(rest) > limit else None
        return paged(request, {"items": [model_out(m) for m in items]}, more)
