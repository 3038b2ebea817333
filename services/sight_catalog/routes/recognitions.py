"""The catalog API's recognitions: the sights a city's newest READY model finds on an uploaded photo
(nothing is stored)."""

from __future__ import annotations

from typing import Annotated, Any

import psycopg
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from services.sight_catalog import warehouse
from services.sight_catalog.callers import Writer, spend
from services.sight_catalog.problems import ERRORS, Problem
from services.sight_catalog.recognition import (
    DEFAULT_SCORE_THRESHOLD,
    ModelUnavailableError,
    NoModelError,
    UnreadableImageError,
)
from services.sight_catalog.routes.common import Catalog, find, jsonable, log, with_conn
from services.sight_catalog.schemas import RecognitionOut, city_status
from services.sight_catalog.uploads import check_upload, read_upload, upload_body


def add_routes(app: FastAPI, catalog: Catalog) -> None:
    """``POST /api/cities/{city}/recognitions``."""
    pool, settings, recogniser = catalog.pool, catalog.settings, catalog.recogniser
    recognition_limits, recognising = catalog.recognition_limits, catalog.recognising

    @app.post(
        "/api/cities/{city}/recognitions",
        response_model=RecognitionOut,
        tags=["recognition"],
        summary="Recognise the sights on a photo",
        responses=ERRORS,
        openapi_extra=upload_body("the photo to look at (it is not stored)"),
    )
    async def recognise(
        request: Request,
        city: str,
        who: Writer,
        min_score: Annotated[
            float, Query(ge=0.0, le=1.0, description="leave out sights scoring under this")
        ] = DEFAULT_SCORE_THRESHOLD,
    ) -> JSONResponse:
        """The sights the city's newest READY model finds on the photo: boxes in the photo's pixels (EXIF
        orientation applied), names, scores, best first. 409 while the city has no READY model."""
        spend(recognition_limits, who, "recognitions")

        def model_of(conn: psycopg.Connection[Any]) -> tuple[warehouse.City, warehouse.Model]:
            found = find(conn, city)
            try:
                return found, recogniser.model_for(conn, found)
            except NoModelError as exc:
                raise Problem(
                    "no-model",
                    str(exc),
                    city=found.slug,
                    city_status=city_status(conn, found),
                ) from None

        found, model = await run_in_threadpool(with_conn, pool, model_of)
        upload = await read_upload(request, settings.max_upload_bytes)
        check_upload(upload.data, settings.max_pixels)

        def run() -> dict[str, Any]:
            if not recognising.acquire(timeout=30):
                raise Problem(
                    "busy",
                    f"{settings.recognitions_at_once} recognitions are running; try again",
                    headers={"Retry-After": "2"},
                )
            try:
                return recogniser.recognise_with(model, found, upload.data, min_score=min_score).as_json()
            except UnreadableImageError as exc:
                raise Problem("unreadable-image", str(exc)) from None
            except ModelUnavailableError as exc:
                log.warning("%s", exc)
                raise Problem("model-unavailable", str(exc), headers={"Retry-After": "30"}) from None
            finally:
                recognising.release()

        return JSONResponse(jsonable(await run_in_threadpool(run)))
