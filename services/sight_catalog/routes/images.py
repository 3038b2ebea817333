"""The catalog API's images: a city's images listed, and photos uploaded into it (stored through
:func:`~services.sight_catalog.ingest.ingest`)."""

from __future__ import annotations

import os
from typing import Annotated, Any
from urllib.parse import urlencode

import psycopg
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from services.errors import UserError
from services.sight_catalog import ingest, warehouse
from services.sight_catalog.callers import Reader, Writer, spend
from services.sight_catalog.problems import ERRORS, Problem
from services.sight_catalog.routes.common import After, Catalog, Limit, find, jsonable, paged, with_conn
from services.sight_catalog.schemas import ImageOut, Page, UploadOut, image_out
from services.sight_catalog.uploads import check_upload, read_upload, upload_body


def add_routes(app: FastAPI, catalog: Catalog) -> None:
    """``GET`` and ``POST /api/cities/{city}/images``."""
    pool, settings = catalog.pool, catalog.settings
    clients, upload_limits = catalog.clients, catalog.upload_limits

    @app.get(
        "/api/cities/{city}/images",
        response_model=Page[ImageOut],
        tags=["images"],
        summary="A city's images",
        responses={401: ERRORS[401], 404: ERRORS[404]},
    )
    def list_images(
        request: Request, city: str, who: Reader, limit: Limit = 100, after: After = None
    ) -> JSONResponse:
        """The city's images by id, ``limit`` at a time."""
        with pool.connection() as conn:
            found = find(conn, city)
            page = warehouse.list_images(conn, found.id, limit=limit, after=after)
        return paged(request, {"items": [image_out(i) for i in page.items]}, page.next_after)

    @app.post(
        "/api/cities/{city}/images",
        response_model=UploadOut,
        status_code=201,
        tags=["images"],
        summary="Upload a photo to a city",
        responses={200: {"model": UploadOut, "description": "the city held this photo already"}, **ERRORS},
        openapi_extra=upload_body("the photo, and optionally `sight`: the sight it shows"),
    )
    async def upload_image(
        request: Request,
        city: str,
        who: Writer,
        sight: Annotated[
            str | None, Query(description="the sight the photo shows (or a `sight` field)")
        ] = None,
    ) -> JSONResponse:
        """Store a photo in the city (checked, turned upright, once per city by MD5): 201 with the new image,
        or 200 with ``duplicate: true`` and the image the city held already."""
        spend(upload_limits, who, "uploads")
        found = await run_in_threadpool(with_conn, pool, lambda conn: find(conn, city))
        upload = await read_upload(request, settings.max_upload_bytes)
        chosen = upload.fields.get("sight") or sight
        if chosen is not None:
            try:
                chosen = warehouse.clean_name(chosen, "sight")
            except UserError as exc:
                raise Problem("invalid-name", str(exc)) from None
        check_upload(upload.data, settings.max_pixels)
        bucket = settings.bucket or os.environ.get(ingest.BUCKET_VARIABLE)
        if not bucket:
            raise Problem(
                "storage-unavailable",
                f"the server has no datasets bucket to store photos in ({ingest.BUCKET_VARIABLE} is not set)",
            )
        source = f"upload:{(upload.filename or 'photo')[:200]}"

        def store(conn: psycopg.Connection[Any]) -> tuple[ingest.Outcome, warehouse.Image | None]:
            if clients["s3"] is None:
                from services.cloud.objects import s3_client as make_client

                clients["s3"] = make_client()
            item = ingest.Item(source, None, len(upload.data), lambda _: ingest.Fetched(upload.data, None))
            try:
                report = ingest.ingest(
                    conn,
                    found,
                    [item],
                    bucket=bucket,
                    s3_client=clients["s3"],
                    sight=chosen,
                    limits=ingest.Limits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels),
                )
            except UserError as exc:
                raise Problem("storage-unavailable", str(exc)) from None
            outcome = report.outcomes[0]
            image = None if outcome.image_id is None else warehouse.get_image(conn, outcome.image_id)
            return outcome, image

        outcome, image = await run_in_threadpool(with_conn, pool, store)
        if outcome.status == "rejected" or image is None:
            reason = outcome.reason or "the photo was not stored"
            if reason.startswith("could not store it"):
                raise Problem("storage-unavailable", reason, headers={"Retry-After": "5"})
            raise Problem("unreadable-image", reason)
        duplicate = outcome.status == "duplicate"
        body = {"duplicate": duplicate, "image": image_out(image)}
        location = f"/api/cities/{found.slug}/images?{urlencode({'after': image.id - 1, 'limit': 1})}"
        return JSONResponse(
            jsonable(body), status_code=200 if duplicate else 201, headers={"Location": location}
        )
