"""The catalog API's health: the process is up (``/health``), the database answers (``/ready``)."""

from __future__ import annotations

import psycopg
from fastapi import FastAPI

from services.sight_catalog.problems import ERRORS, Problem
from services.sight_catalog.routes.common import Catalog, log
from services.sight_catalog.schemas import Health


def add_routes(app: FastAPI, catalog: Catalog) -> None:
    """``GET /health`` and ``GET /ready``."""
    pool = catalog.pool

    @app.get("/health", response_model=Health, tags=["health"], summary="The process is up")
    def health() -> dict[str, str]:
        """Answers while the process serves; it never asks the database (the load balancer's check)."""
        return {"status": "ok"}

    @app.get(
        "/ready",
        response_model=Health,
        tags=["health"],
        summary="The database answers",
        responses={503: ERRORS[503]},
    )
    def ready() -> dict[str, str]:
        """200 when the warehouse answers and holds the catalog's tables, else 503."""
        try:
            with pool.connection() as conn:
                conn.execute("SELECT 1 FROM sight_cities LIMIT 1").fetchall()
        except psycopg.Error as exc:
            log.warning("not ready: %s", exc)
            raise Problem(
                "database-unavailable",
                f"the warehouse is not usable: {type(exc).__name__}",
                headers={"Retry-After": "5"},
            ) from None
        return {"status": "ready"}
