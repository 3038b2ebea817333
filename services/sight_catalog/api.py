"""The sight catalog over HTTP (FastAPI): cities, sights, images and models, recognition, and the web UI.

Endpoints (``{city}`` is a city's slug or its name, any case; ``auth``: see below):

======  =====================================  =======  ===================================================
GET     ``/health``                            none     the process is up (no database check)
GET     ``/ready``                             none     the database answers and holds the catalog's tables
GET     ``/api/cities?limit=&after=``          read     cities by id, a page at a time (``next`` link)
POST    ``/api/cities``                        write    request a city (``{"name": ...}``): 201 new, 200 known
GET     ``/api/cities/{city}``                 read     the city and its status: sights, images, labels,
                                                        model version, training
GET     ``/api/cities/{city}/sights``          read     the city's sights by id, paged
GET     ``/api/cities/{city}/images``          read     the city's images by id, paged
POST    ``/api/cities/{city}/images``          write    upload a photo (rate-limited): 201 stored, 200 when
                                                        the city holds it already (``duplicate``)
GET     ``/api/cities/{city}/models``          read     the city's models, newest version first, paged
POST    ``/api/cities/{city}/recognitions``    write    upload a photo, get the sights on it (boxes, names,
                                                        scores) from the city's newest READY model
                                                        (rate-limited; nothing is stored)
GET     ``/``, ``/static/...``                 none     the web UI (no data in it: it calls the API)
GET     ``/openapi.json``, ``/docs``           none     the OpenAPI document, and a page that lists it offline
GET     ``/problems/{type}``                   none     what an error type means
======  =====================================  =======  ===================================================

**Who may call what** (the policy of the FITS endpoint, :mod:`services.fits_classifier.endpoint`): the
token (``TESSERA_CATALOG_TOKEN``, a file named by ``TESSERA_CATALOG_TOKEN_FILE``, or a Secrets Manager secret
named by ``TESSERA_CATALOG_TOKEN_SECRET_ARN``) travels as ``Authorization: Bearer <token>`` and is compared in
constant time. Without a token the server binds loopback only and everything is open to this machine. With
one, every *write* (requesting a city, uploading) and every recognition needs it; *reads* need it too once
the server is bound beyond loopback. ``/health``, ``/ready``, the UI's files and the API's description are
always open.

**Uploads** are a ``multipart/form-data`` body with one file part (and optionally a ``sight`` field), or the
photo's bytes as the body (``Content-Type: image/jpeg|png|webp``). The size cap
(:attr:`Settings.max_upload_bytes`) is enforced while the body streams in: a ``Content-Length`` over it is
refused before a byte is read, and a body that grows past it is cut off there, so nothing larger is ever
held. Stored photos go through :func:`~services.sight_catalog.ingest.ingest` into the datasets bucket
(``TESSERA_BUCKET_DATASETS``): checked, turned upright, stored once per city by MD5.

**Rate limits**: uploads and recognitions each have a token bucket per caller (the token's fingerprint and the
client's address); an empty bucket answers 429 with ``Retry-After``.

**Errors** are ``application/problem+json`` (RFC 9457): ``type`` (``/problems/<name>``, see :data:`PROBLEMS`),
``title``, ``status``, ``detail`` saying what to change, ``instance`` (the path), and extension members where
they help (``retry_after_s``, ``city``, ``errors``...). A failed request changes nothing.

**Where it is**: this module makes the app (:func:`create_app`, with its settings and error handlers) and
serves it; the routes are in :mod:`services.sight_catalog.routes`, by resource, and beside them the errors
(:mod:`~services.sight_catalog.problems`), the token (:mod:`~services.sight_catalog.tokens`), callers and
rate limits (:mod:`~services.sight_catalog.callers`), database connections
(:mod:`~services.sight_catalog.pool`), uploads (:mod:`~services.sight_catalog.uploads`) and the response
bodies (:mod:`~services.sight_catalog.schemas`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.errors import UserError
from services.inference.endpoint import is_loopback
from services.sight_catalog import ingest
from services.sight_catalog.callers import Rate, RateLimiter
from services.sight_catalog.pool import Pool
from services.sight_catalog.problems import PROBLEM_TYPE, PROBLEMS, Problem
from services.sight_catalog.recognition import Recogniser
from services.sight_catalog.routes import cities, health, images, models, recognitions, ui
from services.sight_catalog.routes.common import Catalog
from services.sight_catalog.schemas import city_status
from services.sight_catalog.tokens import (
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    TOKEN_SECRET_ENV,
    catalog_token,
    check_token,
)
from services.sight_catalog.uploads import Upload, read_upload

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_PORT",
    "PROBLEMS",
    "PROBLEM_TYPE",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "TOKEN_SECRET_ENV",
    "Pool",
    "Problem",
    "Rate",
    "RateLimiter",
    "RunningServer",
    "Settings",
    "Upload",
    "catalog_token",
    "check_token",
    "city_status",
    "create_app",
    "read_upload",
    "serve",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080
#: Largest photo accepted, in bytes (the ingest limit).
DEFAULT_MAX_UPLOAD_BYTES = ingest.MAX_BYTES


@dataclass(frozen=True)
class Settings:
    """What the app serves with.

    ``host`` is the address the server binds: beyond loopback, reads need the token too (and a token is
    required). ``bucket`` (else ``TESSERA_BUCKET_DATASETS``) receives uploads; without one uploads answer
    503. ``upload_rate`` and ``recognition_rate`` are per caller. ``pool_size`` database connections are
    shared by the requests; ``recognitions_at_once`` photos are decoded and run through a model at once.
    """

    database_url: str
    token: str | None = None
    host: str = "127.0.0.1"
    bucket: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = ingest.MAX_PIXELS
    upload_rate: Rate = field(default_factory=lambda: Rate(20, 1.0))
    recognition_rate: Rate = field(default_factory=lambda: Rate(10, 1.0))
    pool_size: int = 4
    recognitions_at_once: int = 2
    providers: str = "auto"
    models_kept: int = 4

    def __post_init__(self) -> None:
        if self.token is None and not is_loopback(self.host):
            raise UserError(
                f"refusing to serve the catalog on {self.host or 'every interface'} without a token: anyone "
                f"who can reach it could add cities and photos; set {TOKEN_ENV} (or {TOKEN_FILE_ENV}, "
                f"{TOKEN_SECRET_ENV}; clients send 'Authorization: Bearer <token>') or bind 127.0.0.1"
            )
        if self.token is not None:
            check_token(self.token)
        for name in ("max_upload_bytes", "max_pixels", "pool_size", "recognitions_at_once", "models_kept"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a whole number, at least 1; got {value!r}")

    @property
    def reads_need_token(self) -> bool:
        """Whether reads need the token: bound beyond loopback."""
        return self.token is not None and not is_loopback(self.host)


class _SecurityHeaders:
    """Adds headers that keep the UI's pages to their own files (no inline script, no other origin)."""

    HEADERS = (
        (
            b"content-security-policy",
            b"default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
            b"script-src 'self'; style-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
            b"base-uri 'none'",
        ),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"permissions-policy", b"camera=(self), microphone=()"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, receive, add_headers)


def create_app(settings: Settings, *, recogniser: Recogniser | None = None, s3_client: Any = None) -> FastAPI:
    """The catalog's ASGI app (see the module docstring). The app owns a connection pool (closed at its
    shutdown) and a :class:`Recogniser` (``recogniser``, else one of its own)."""
    pool = Pool(settings.database_url, settings.pool_size)
    recogniser = recogniser or Recogniser(
        capacity=settings.models_kept, providers=settings.providers, max_pixels=settings.max_pixels
    )
    catalog = Catalog(
        settings=settings,
        pool=pool,
        recogniser=recogniser,
        upload_limits=RateLimiter(settings.upload_rate),
        recognition_limits=RateLimiter(settings.recognition_rate),
        recognising=threading.BoundedSemaphore(settings.recognitions_at_once),
        clients={"s3": s3_client},
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        pool.close()

    app = FastAPI(
        title="tessera sight catalog",
        version="1",
        description=(__doc__ or "").split("\n\n", 1)[0]
        + " Errors are application/problem+json (RFC 9457); GET /problems/{type} explains each type.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.token = settings.token.encode("ascii") if settings.token else b""
    app.state.pool = pool
    app.state.recogniser = recogniser
    app.add_middleware(_SecurityHeaders)

    # --- errors --------------------------------------------------------------------------------------------

    @app.exception_handler(Problem)
    async def problem(request: Request, exc: Problem) -> Response:
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"where": ".".join(str(p) for p in e.get("loc", ())), "message": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        said = "; ".join(f"{e['where']}: {e['message']}" for e in errors)
        return Problem("invalid-request", f"the request is not valid: {said}", errors=errors).response(
            request.url.path
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            return Problem(
                "method-not-allowed",
                f"{request.method} is not allowed on {request.url.path}",
                headers=headers,
            ).response(request.url.path)
        if exc.status_code == 404:
            return Problem("not-found", f"nothing at {request.url.path}; see /openapi.json").response(
                request.url.path
            )
        body = {"type": "about:blank", "title": str(exc.detail), "status": exc.status_code,
                "detail": str(exc.detail), "instance": request.url.path}  # fmt: skip
        return JSONResponse(body, status_code=exc.status_code, headers=headers, media_type=PROBLEM_TYPE)

    @app.exception_handler(psycopg.OperationalError)
    async def database_down(request: Request, exc: psycopg.OperationalError) -> Response:
        log.warning("database unavailable: %s", exc)
        return Problem(
            "database-unavailable",
            "the warehouse did not answer; nothing was changed, try again shortly",
            headers={"Retry-After": "5"},
        ).response(request.url.path)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path)
        return Problem("internal-error", "an unexpected error; the server's log has the details").response(
            request.url.path
        )

    for routes in (health, cities, images, models, recognitions, ui):
        routes.add_routes(app, catalog)
    return app


# --- serving ------------------------------------------------------------------------------------------------


class RunningServer:
    """A uvicorn server on a thread (tests, demos): ``url``, and :meth:`stop`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as exc:
            self.socket.close()
            raise UserError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
        self.port = int(self.socket.getsockname()[1])
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="catalog-api", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise UserError("the catalog's server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.socket.close()


def serve(
    settings: Settings,
    *,
    port: int = DEFAULT_PORT,
    forwarded_allow_ips: str | None = None,
    log_level: str = "info",
) -> int:
    """Serve the catalog until SIGTERM or Ctrl-C (uvicorn); 0 when it stopped cleanly.

    ``forwarded_allow_ips``: the proxies whose ``X-Forwarded-For`` names the client (rate limits go by it);
    default uvicorn's (loopback) or ``FORWARDED_ALLOW_IPS``.
    """
    import uvicorn

    app = create_app(settings)
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((settings.host, port))
    except OSError as exc:
        listener.close()
        raise UserError(f"cannot serve on {settings.host}:{port}: {exc.strerror or exc}") from None
    config = uvicorn.Config(
        app,
        log_level=log_level,
        proxy_headers=True,
        forwarded_allow_ips=forwarded_allow_ips,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    log.info(
        "serving the sight catalog on http://%s:%d (token %s; reads %s)",
        settings.host,
        listener.getsockname()[1],
        "set" if settings.token else "not set",
        "need the token" if settings.reads_need_token else "open",
    )
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        listener.close()
    return 0
