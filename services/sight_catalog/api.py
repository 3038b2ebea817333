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
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import math
import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar
from urllib.parse import urlencode

import psycopg
from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from psycopg.conninfo import make_conninfo
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.cloud import database as databases
from services.errors import UserError
from services.inference.endpoint import is_loopback
from services.sight_catalog import ingest, warehouse
from services.sight_catalog.recognition import (
    DEFAULT_SCORE_THRESHOLD,
    ModelUnavailableError,
    NoModelError,
    Recogniser,
    UnreadableImageError,
    check_photo,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

TOKEN_ENV = "TESSERA_CATALOG_TOKEN"
TOKEN_FILE_ENV = "TESSERA_CATALOG_TOKEN_FILE"
TOKEN_SECRET_ENV = "TESSERA_CATALOG_TOKEN_SECRET_ARN"
#: The shortest token accepted (a guessable token is no protection).
MIN_TOKEN_CHARS = 16
DEFAULT_PORT = 8080
#: Largest photo accepted, in bytes (the ingest limit).
DEFAULT_MAX_UPLOAD_BYTES = ingest.MAX_BYTES
#: Room for a multipart body's boundaries, part headers and small fields beyond the photo itself.
MULTIPART_OVERHEAD = 64 * 1024
#: Largest text field of a multipart upload.
MAX_FIELD_BYTES = 4096
#: Where the web UI's files are.
WEB = Path(__file__).resolve().parent / "web"
PROBLEM_TYPE = "application/problem+json"

#: Every error type: name -> (HTTP status, title, what it means).
PROBLEMS: dict[str, tuple[int, str, str]] = {
    "unauthorized": (
        401,
        "Missing or wrong token",
        "Send 'Authorization: Bearer <token>' with the server's token.",
    ),
    "unknown-city": (404, "No such city", "Request the city first (POST /api/cities), or check its slug."),
    "not-found": (404, "Not found", "The path names nothing here; see /openapi.json."),
    "method-not-allowed": (405, "Method not allowed", "The path exists; the Allow header lists its methods."),
    "invalid-request": (422, "Invalid request", "A parameter or the JSON body is malformed; see 'errors'."),
    "invalid-name": (400, "Invalid name", "A city or sight name is 1 to 100 characters of text."),
    "empty-upload": (400, "Empty upload", "The file holds no bytes; send a JPEG, PNG or WebP photo."),
    "bad-upload": (
        400,
        "Malformed upload",
        "Send multipart/form-data with one file part, or the photo's bytes.",
    ),
    "upload-too-large": (413, "Upload too large", "The photo is over the size limit; send a smaller one."),
    "unsupported-media-type": (415, "Not an image", "Only JPEG, PNG and WebP photos are accepted."),
    "unreadable-image": (422, "Unreadable image", "The file claims to be a photo but cannot be decoded."),
    "rate-limited": (429, "Too many requests", "Wait for Retry-After seconds before trying again."),
    "no-model": (409, "No model yet", "The city has no READY model; its status says what it has."),
    "model-unavailable": (503, "Model unavailable", "The city's model could not be opened; try again later."),
    "database-unavailable": (503, "Database unavailable", "The warehouse did not answer; try again later."),
    "storage-unavailable": (
        503,
        "Storage unavailable",
        "The datasets bucket could not be written; try again.",
    ),
    "busy": (503, "Busy", "Every slot is taken; try again after Retry-After seconds."),
    "internal-error": (
        500,
        "Internal error",
        "Something unexpected failed; the server's log has the details.",
    ),
}


class Problem(Exception):  # noqa: N818 - RFC 9457's name for it
    """An error answered as ``application/problem+json``; ``kind`` is a key of :data:`PROBLEMS`."""

    def __init__(
        self,
        kind: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.status, self.title, _ = PROBLEMS[kind]
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra

    def response(self, instance: str) -> JSONResponse:
        """The problem as a response to the request for ``instance``."""
        body = {
            "type": f"/problems/{self.kind}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
            **self.extra,
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers, media_type=PROBLEM_TYPE)


# --- settings and the token ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    """A token bucket: ``burst`` requests at once, refilled at ``per_second``."""

    burst: int
    per_second: float

    def __post_init__(self) -> None:
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise UserError(f"a rate limit allows a burst of at least 1 request, not {self.burst!r}")
        if not self.per_second > 0:
            raise UserError(f"a rate limit refills at more than 0 requests a second, not {self.per_second!r}")


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


def check_token(token: str) -> str:
    """``token`` when it is usable: printable ASCII without spaces, at least :data:`MIN_TOKEN_CHARS` long."""
    if not all("!" <= c <= "~" for c in token):
        raise UserError(f"the catalog's token ({TOKEN_ENV}) must be printable ASCII without spaces")
    if len(token) < MIN_TOKEN_CHARS:
        raise UserError(
            f"the catalog's token ({TOKEN_ENV}) has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return token


def catalog_token(
    token: str | None = None,
    *,
    token_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    secrets_client: Any = None,
) -> str | None:
    """The bearer token: ``token``, else ``token_file``'s first line, else ``TESSERA_CATALOG_TOKEN``, else
    the file named by ``TESSERA_CATALOG_TOKEN_FILE``, else the Secrets Manager secret named by
    ``TESSERA_CATALOG_TOKEN_SECRET_ARN``; None when none is set. UserError for an unusable token or an
    unreadable file or secret."""
    env = os.environ if env is None else env
    if token:
        return check_token(token)
    path = token_file or env.get(TOKEN_FILE_ENV)
    if not path and env.get(TOKEN_ENV):
        return check_token(env[TOKEN_ENV])
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
        lines = text.strip().splitlines()
        if not lines:
            raise UserError(f"the token file {path} is empty")
        return check_token(lines[0].strip())
    arn = env.get(TOKEN_SECRET_ENV)
    if arn:
        return check_token(_secret(arn, env, secrets_client))
    return None


#: The version id of the token the catalog makes itself: the same on every instance, so when several start
#: at once Secrets Manager keeps the first one stored and every instance reads that one.
FIRST_TOKEN_VERSION = "tessera-catalog-first-token-0000000000000000"


def _secret(arn: str, env: Mapping[str, str], client: Any) -> str:
    """The token in the secret at ``arn``; a secret that holds none yet (the platform creates it empty, so
    the token never passes through Pulumi) gets a fresh one, stored once whoever stores it first."""
    import secrets

    from botocore.exceptions import BotoCoreError, ClientError

    if client is None:
        import boto3

        client = boto3.client(
            "secretsmanager",
            region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            endpoint_url=env.get("AWS_ENDPOINT_URL") or None,
        )

    def read() -> str | None:
        try:
            return str(client.get_secret_value(SecretId=arn).get("SecretString") or "").strip() or None
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                return None  # the secret exists with no value yet (or does not exist: put says which)
            raise

    try:
        value = read()
        if value is None:
            try:
                client.put_secret_value(
                    SecretId=arn,
                    SecretString=secrets.token_urlsafe(32),
                    ClientRequestToken=FIRST_TOKEN_VERSION,
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "ResourceExistsException":
                    raise  # another instance stored its token first: read that one below
            value = read()
    except (ClientError, BotoCoreError) as exc:
        raise UserError(f"cannot read the catalog's token from {arn}: {exc}") from None
    if not value:
        raise UserError(f"the secret {arn} holds no token")
    return value


# --- rate limits --------------------------------------------------------------------------------------------


class RateLimiter:
    """Token buckets by caller: :meth:`take` spends one request, or says how long to wait. At most
    ``max_callers`` buckets are kept (the least recently used go first: a new bucket is full anyway)."""

    def __init__(self, rate: Rate, *, clock: Callable[[], float] = time.monotonic, max_callers: int = 10_000):
        self.rate = rate
        self.clock = clock
        self.max_callers = max_callers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, caller: str) -> float:
        """0 when ``caller`` may go ahead (one request spent), else the seconds until it may."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(caller, (float(self.rate.burst), now))
            tokens = min(float(self.rate.burst), tokens + (now - last) * self.rate.per_second)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate.per_second
            self._buckets[caller] = (tokens, now)
            while len(self._buckets) > self.max_callers:
                self._buckets.popitem(last=False)
            return wait


# --- database connections -----------------------------------------------------------------------------------


class Pool:
    """Up to ``size`` autocommit connections shared by the request threads; a broken one is dropped and the
    next borrower connects afresh. Connecting gives up after ``connect_timeout_s``."""

    def __init__(self, url: str, size: int = 4, *, connect_timeout_s: int = 5, wait_s: float = 10.0) -> None:
        self.url = make_conninfo(url, connect_timeout=connect_timeout_s)
        self.size = size
        self.wait_s = wait_s
        self._idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection for the duration of the block (503 ``busy`` when none frees up in time)."""
        if not self._slots.acquire(timeout=self.wait_s):
            raise Problem(
                "busy",
                f"all {self.size} database connections stayed busy for {self.wait_s:g} s; try again",
                headers={"Retry-After": "1"},
            )
        conn: psycopg.Connection[Any] | None = None
        try:
            while conn is None:
                try:
                    candidate = self._idle.get_nowait()
                except queue.Empty:
                    conn = databases.connect(self.url)
                    break
                if candidate.closed or candidate.broken:
                    candidate.close()
                else:
                    conn = candidate
            yield conn
        except psycopg.OperationalError:
            if conn is not None:
                conn.close()
                conn = None
            raise
        finally:
            if conn is not None:
                if conn.closed or conn.broken or self._closed:
                    conn.close()
                else:
                    self._idle.put(conn)
            self._slots.release()

    def close(self) -> None:
        """Close the idle connections (and the busy ones as they come back)."""
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


# --- what the API answers -----------------------------------------------------------------------------------


class CityOut(BaseModel):
    """A city."""

    id: int
    name: str
    slug: str
    url: str = Field(description="this city's resource (by slug)")
    requested_by: str | None
    label_budget: int = Field(description="external labelling calls the city may spend")
    label_calls_used: int
    created_at: dt.datetime


class CityStatus(BaseModel):
    """Where a city stands (live counts)."""

    state: str = Field(description="no-images | collecting | training | ready")
    sights: int
    images: int
    labelled_images: int = Field(description="images some labeller has looked at")
    labels: int = Field(description="boxes drawn on its images")
    model_version: int | None = Field(description="the newest READY model's version (what recognitions use)")
    training: bool = Field(description="a model version is training now")
    training_version: int | None


class CityDetail(CityOut):
    """A city and its status."""

    status: CityStatus


class SightOut(BaseModel):
    """A sight of a city (a class name of its models)."""

    id: int
    name: str
    created_at: dt.datetime


class ImageOut(BaseModel):
    """An image of a city, stored once by MD5 in the datasets bucket."""

    id: int
    sight_id: int | None
    md5: str
    media_type: str
    width: int
    height: int
    size_bytes: int
    held_out: bool
    source: str
    created_at: dt.datetime


class UploadOut(BaseModel):
    """An uploaded photo: the image stored (or the one the city held already, ``duplicate``)."""

    duplicate: bool
    image: ImageOut


class ModelOut(BaseModel):
    """A city's model version."""

    version: int
    status: str = Field(description="TRAINING | READY | FAILED")
    registry_name: str
    registry_version: int | None
    classes: list[str] = Field(description="the sight names it finds")
    images: int = Field(description="images it was trained on")
    metrics: dict[str, Any]
    reason: str | None = Field(description="why it failed")
    training_job_id: str
    created_at: dt.datetime
    updated_at: dt.datetime


class Page(BaseModel, Generic[T]):
    """A page of a listing; ``next`` (null on the last page) is the URL of the next one."""

    items: list[T]
    next: str | None


class BoxOut(BaseModel):
    """A box in the photo's pixels (EXIF orientation applied): x0 < x1, y0 < y1."""

    x0: float
    y0: float
    x1: float
    y1: float


class FoundOut(BaseModel):
    """A sight on the photo."""

    sight: str
    score: float
    box: BoxOut


class ModelRef(BaseModel):
    """The model version that looked."""

    version: int
    registry_name: str
    registry_version: int | None


class CityRef(BaseModel):
    """Which city."""

    id: int
    name: str
    slug: str


class RecognitionOut(BaseModel):
    """The sights found on a photo, best first."""

    city: CityRef
    model: ModelRef
    width: int
    height: int
    sights: list[FoundOut]


class ProblemOut(BaseModel):
    """An error (RFC 9457 problem details)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str


class CityRequest(BaseModel):
    """A city to collect."""

    name: StrictStr = Field(description="the city's name, 1 to 100 characters (any text: it is never parsed)")


class Health(BaseModel):
    """The process is up / the database answers."""

    status: str


def _city_out(city: warehouse.City) -> dict[str, Any]:
    return {
        "id": city.id,
        "name": city.name,
        "slug": city.slug,
        "url": f"/api/cities/{city.slug}",
        "requested_by": city.requested_by,
        "label_budget": city.label_budget,
        "label_calls_used": city.label_calls_used,
        "created_at": city.created_at,
    }


def _image_out(image: warehouse.Image) -> dict[str, Any]:
    return {
        "id": image.id,
        "sight_id": image.sight_id,
        "md5": image.md5,
        "media_type": image.media_type,
        "width": image.width,
        "height": image.height,
        "size_bytes": image.size_bytes,
        "held_out": image.held_out,
        "source": image.source,
        "created_at": image.created_at,
    }


def _model_out(model: warehouse.Model) -> dict[str, Any]:
    return {
        "version": model.version,
        "status": model.status,
        "registry_name": model.registry_name,
        "registry_version": model.registry_version,
        "classes": [str(c) for c in model.classes],
        "images": model.images,
        "metrics": model.metrics,
        "reason": model.reason,
        "training_job_id": model.training_job_id,
        "created_at": model.created_at,
        "updated_at": model.updated_at,
    }


def city_status(conn: psycopg.Connection[Any], city: warehouse.City) -> dict[str, Any]:
    """The city's live status (see :class:`CityStatus`)."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM sight_sights WHERE city_id = %(city)s),"
        " (SELECT count(*) FROM sight_images WHERE city_id = %(city)s),"
        " (SELECT count(*) FROM sight_images i WHERE i.city_id = %(city)s"
        "   AND EXISTS (SELECT 1 FROM sight_labellings l WHERE l.image_id = i.id)),"
        " (SELECT count(*) FROM sight_labels b JOIN sight_images i ON i.id = b.image_id"
        "   WHERE i.city_id = %(city)s)",
        {"city": city.id},
    ).fetchone()
    sights, images, labelled, boxes = (int(v) for v in row) if row else (0, 0, 0, 0)
    ready = warehouse.ready_model(conn, city.id)
    training = warehouse.training_model(conn, city.id)
    if ready is not None:
        state = "ready"
    elif training is not None:
        state = "training"
    elif images:
        state = "collecting"
    else:
        state = "no-images"
    return {
        "state": state,
        "sights": sights,
        "images": images,
        "labelled_images": labelled,
        "labels": boxes,
        "model_version": None if ready is None else ready.version,
        "training": training is not None,
        "training_version": None if training is None else training.version,
    }


# --- uploads ------------------------------------------------------------------------------------------------


@dataclass
class Upload:
    """A photo read from a request body: its bytes, the file name the client gave, and text fields."""

    data: bytes
    filename: str
    fields: dict[str, str]


async def read_upload(request: Request, max_bytes: int) -> Upload:
    """The photo in ``request``'s body (see the module docstring), never holding more than ``max_bytes`` of
    it; :class:`Problem` for a body over the limit, malformed, or of another media type."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    declared = request.headers.get("content-length")
    too_large = Problem(
        "upload-too-large",
        f"the photo is over the limit of {max_bytes} bytes ({max_bytes / 2**20:.1f} MiB); send a smaller one",
        limit_bytes=max_bytes,
    )
    allowance = max_bytes + (MULTIPART_OVERHEAD if media_type == "multipart/form-data" else 0)
    if declared is not None:
        if not declared.isdigit():
            raise Problem("bad-upload", f"Content-Length {declared!r} is not a number of bytes")
        if int(declared) > allowance:
            raise too_large
    if media_type in ingest.IMAGE_SUFFIXES.values() or media_type == "application/octet-stream":
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise too_large
        return Upload(bytes(body), "", {})
    if media_type != "multipart/form-data":
        raise Problem(
            "unsupported-media-type",
            "a photo comes as multipart/form-data (a file part) or as image/jpeg, image/png or image/webp, "
            f"not {media_type or 'a body without a Content-Type'}",
        )
    return await _multipart(request, content_type, max_bytes, too_large)


async def _multipart(request: Request, content_type: str, max_bytes: int, too_large: Problem) -> Upload:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise Problem("bad-upload", "the multipart Content-Type names no boundary")
    state: dict[str, Any] = {"name": "", "filename": None, "disposition": b"", "header": b"", "value": b""}
    files: list[tuple[str, bytearray]] = []
    fields: dict[str, str] = {}
    current = bytearray()
    errors: list[Problem] = []

    def on_part_begin() -> None:
        state.update(name="", filename=None, disposition=b"")
        current.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        if state["header"].lower() == b"content-disposition":
            state["disposition"] = state["value"]
        state["header"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, options = parse_options_header(state["disposition"])
        state["name"] = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        state["filename"] = None if filename is None else filename.decode("utf-8", "replace")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current.extend(data[start:end])
        limit = max_bytes if state["filename"] is not None else MAX_FIELD_BYTES
        if len(current) > limit:
            errors.append(
                too_large
                if state["filename"] is not None
                else Problem("bad-upload", f"the field {state['name']!r} is over {MAX_FIELD_BYTES} bytes")
            )
            raise _StopParsingError

    def on_part_end() -> None:
        if state["filename"] is not None:
            if files:
                errors.append(Problem("bad-upload", "send one photo per request, not several files"))
                raise _StopParsingError
            files.append((state["filename"], bytearray(current)))
        elif state["name"]:
            fields[state["name"]] = current.decode("utf-8", "replace")
        current.clear()

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        },
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes + MULTIPART_OVERHEAD:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except _StopParsingError:
        raise errors[0] from None
    except FormParserError as exc:
        raise Problem("bad-upload", f"the multipart body is malformed: {exc}") from None
    if not files:
        raise Problem("bad-upload", "the multipart body holds no file part: attach the photo as a file")
    filename, data = files[0]
    return Upload(bytes(data), filename, fields)


class _StopParsingError(Exception):
    """Stops the multipart parser (the reason is kept aside)."""


# --- the app ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who is calling: ``authenticated`` with the token or not, and the key their rate limits go by."""

    authenticated: bool
    key: str


_bearer = HTTPBearer(auto_error=False, description="the catalog's token (TESSERA_CATALOG_TOKEN)")


def _caller(request: Request, credentials: HTTPAuthorizationCredentials | None, needed: bool) -> Caller:
    """Who calls (see :class:`Caller`); 401 when ``needed`` and the token is missing or wrong."""
    expected: bytes = request.app.state.token
    address = request.client.host if request.client else "unknown"
    given = credentials.credentials.encode("utf-8", "replace") if credentials else b""
    authenticated = bool(expected) and hmac.compare_digest(given, expected)
    if needed and expected and not authenticated:
        why = "wrong token" if credentials else "no token"
        raise Problem(
            "unauthorized",
            f"{why}: this needs 'Authorization: Bearer <token>' with the catalog's token ({TOKEN_ENV})",
            headers={
                "WWW-Authenticate": 'Bearer realm="tessera-sights"'
                + (', error="invalid_token"' if credentials else "")
            },
        )
    fingerprint = hashlib.sha256(given).hexdigest()[:12] if authenticated else "anonymous"
    return Caller(authenticated, f"{fingerprint}@{address}")


def _reader(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    """A reader: needs the token when the server is bound beyond loopback."""
    settings: Settings = request.app.state.settings
    return _caller(request, credentials, settings.reads_need_token)


def _writer(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    """A writer (or a recognition): needs the token whenever the server has one."""
    return _caller(request, credentials, True)


Reader = Annotated[Caller, Depends(_reader)]
Writer = Annotated[Caller, Depends(_writer)]
Limit = Annotated[int, Query(ge=1, le=warehouse.MAX_PAGE, description="items per page")]
After = Annotated[int | None, Query(ge=0, description="the cursor: the `next` link carries it")]


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ProblemOut, "content": {PROBLEM_TYPE: {}}}
    for status in (400, 401, 404, 409, 413, 415, 422, 429, 503)
}


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
    upload_limits = RateLimiter(settings.upload_rate)
    recognition_limits = RateLimiter(settings.recognition_rate)
    recognising = threading.BoundedSemaphore(settings.recognitions_at_once)
    clients: dict[str, Any] = {"s3": s3_client}

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

    # --- who is calling ------------------------------------------------------------------------------------

    def spend(limiter: RateLimiter, who: Caller, what: str) -> None:
        wait = limiter.take(who.key)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise Problem(
                "rate-limited",
                f"too many {what} from this client: {limiter.rate.burst} at once, then "
                f"{limiter.rate.per_second:g} a second; try again in {seconds} s",
                headers={"Retry-After": str(seconds)},
                retry_after_s=seconds,
            )

    def find(conn: psycopg.Connection[Any], ref: str) -> warehouse.City:
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
        if after is None:
            return None
        params = {k: v for k, v in request.query_params.items() if k != "after"}
        params["after"] = str(after)
        return f"{request.url.path}?{urlencode(params)}"

    def paged(request: Request, body: dict[str, Any], after: int | None) -> JSONResponse:
        link = next_link(request, after)
        body["next"] = link
        headers = {"Link": f'<{link}>; rel="next"'} if link else {}
        return JSONResponse(_jsonable(body), headers=headers)

    # --- health --------------------------------------------------------------------------------------------

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

    # --- cities --------------------------------------------------------------------------------------------

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
        return paged(request, {"items": [_city_out(c) for c in page.items]}, page.next_after)

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
            body = {**_city_out(city), "status": city_status(conn, city)}
        headers = {"Location": body["url"]}
        return JSONResponse(_jsonable(body), status_code=201 if created else 200, headers=headers)

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
            body = {**_city_out(found), "status": city_status(conn, found)}
        return JSONResponse(_jsonable(body))

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
        return paged(request, {"items": [_image_out(i) for i in page.items]}, page.next_after)

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
        return paged(request, {"items": [_model_out(m) for m in items]}, more)

    # --- uploads and recognition ---------------------------------------------------------------------------

    @app.post(
        "/api/cities/{city}/images",
        response_model=UploadOut,
        status_code=201,
        tags=["images"],
        summary="Upload a photo to a city",
        responses={200: {"model": UploadOut, "description": "the city held this photo already"}, **ERRORS},
        openapi_extra=_upload_body("the photo, and optionally `sight`: the sight it shows"),
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
        found = await run_in_threadpool(_with_conn, pool, lambda conn: find(conn, city))
        upload = await read_upload(request, settings.max_upload_bytes)
        chosen = upload.fields.get("sight") or sight
        if chosen is not None:
            try:
                chosen = warehouse.clean_name(chosen, "sight")
            except UserError as exc:
                raise Problem("invalid-name", str(exc)) from None
        _check(upload.data, settings.max_pixels)
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

        outcome, image = await run_in_threadpool(_with_conn, pool, store)
        if outcome.status == "rejected" or image is None:
            reason = outcome.reason or "the photo was not stored"
            if reason.startswith("could not store it"):
                raise Problem("storage-unavailable", reason, headers={"Retry-After": "5"})
            raise Problem("unreadable-image", reason)
        duplicate = outcome.status == "duplicate"
        body = {"duplicate": duplicate, "image": _image_out(image)}
        location = f"/api/cities/{found.slug}/images?{urlencode({'after': image.id - 1, 'limit': 1})}"
        return JSONResponse(
            _jsonable(body), status_code=200 if duplicate else 201, headers={"Location": location}
        )

    @app.post(
        "/api/cities/{city}/recognitions",
        response_model=RecognitionOut,
        tags=["recognition"],
        summary="Recognise the sights on a photo",
        responses=ERRORS,
        openapi_extra=_upload_body("the photo to look at (it is not stored)"),
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

        found, model = await run_in_threadpool(_with_conn, pool, model_of)
        upload = await read_upload(request, settings.max_upload_bytes)
        _check(upload.data, settings.max_pixels)

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

        return JSONResponse(_jsonable(await run_in_threadpool(run)))

    # --- the UI, the docs page and the problem types -------------------------------------------------------

    @app.get("/problems/{kind}", tags=["docs"], summary="What an error type means", response_model=None)
    def problem_type(kind: str) -> JSONResponse:
        """The status, title and meaning of an error ``type``."""
        if kind not in PROBLEMS:
            raise Problem("not-found", f"no problem type {kind!r}; the types are {', '.join(PROBLEMS)}")
        status, title, meaning = PROBLEMS[kind]
        return JSONResponse(
            {"type": f"/problems/{kind}", "status": status, "title": title, "meaning": meaning}
        )

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        return FileResponse(WEB / "docs.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    return app


def _upload_body(what: str) -> dict[str, Any]:
    """The OpenAPI description of an upload's body (read from the stream, not declared as parameters)."""
    return {
        "requestBody": {
            "required": True,
            "description": what,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "sight": {"type": "string"},
                        },
                    }
                },
                **{
                    media: {"schema": {"type": "string", "format": "binary"}}
                    for media in ("image/jpeg", "image/png", "image/webp")
                },
            },
        }
    }


def _with_conn(pool: Pool, work: Callable[[psycopg.Connection[Any]], T]) -> T:
    with pool.connection() as conn:
        return work(conn)


def _check(data: bytes, max_pixels: int) -> None:
    """Problem unless ``data`` is a photo this reads: empty 400, not an image 415, undecodable 422."""
    if not data:
        raise Problem("empty-upload", "the file is empty (0 bytes): send a JPEG, PNG or WebP photo")
    if ingest.sniff(data) is None:
        raise Problem(
            "unsupported-media-type",
            f"the file is not a JPEG, PNG or WebP photo ({ingest._what(data)}, {len(data)} bytes)",
        )
    try:
        check_photo(data, max_pixels=max_pixels)
    except UnreadableImageError as exc:
        raise Problem("unreadable-image", str(exc)) from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


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
