"""Models served elsewhere, over the OSML / SageMaker ``POST /invocations`` contract; and a tiny server.

The request body is one tile as an image (PNG, or TIFF; 8-bit, 1, 3 or 4 bands). The response is a GeoJSON
FeatureCollection of "unlocated" features (``geometry`` null) whose properties carry, in tile pixels:

- the box: ``imageBBox`` ``[x1, y1, x2, y2]`` (also ``bounds_imcoords``, the older OSML name, or the bounds
  of ``imageGeometry``);
- the class and score: ``featureClasses`` ``[{"iri": name, "score": s}, ...]`` (the best entry is taken;
  also ``feature_types`` as such a list or as ``{name: score}``), or ``class`` / ``label`` and ``score``
  / ``detection_score``.

:class:`EndpointDetector` is a detector (same interface as ``OnnxDetector``) that sends each tile to such an
endpoint; :func:`endpoint_server` / :func:`serve_endpoint` stand any detector up behind ``GET /ping`` and
``POST /invocations`` (standard library HTTP server), so a local model can be served the same way. Only
the standard library, NumPy and Pillow are used. The wire format both sides speak (tile images, feature
collections) is :mod:`services.inference.endpoint_wire`; the server's reply helpers (:func:`send_reply`,
:func:`send_json_error`, :func:`bearer_token_ok`) serve the FITS classifier's server too.

The trust boundary (docs/ARCHITECTURE.md): every request the server gets is untrusted.

- It binds 127.0.0.1 unless another address is asked for explicitly (``host=``).
- With a bearer token (``token=``, else ``TESSERA_ENDPOINT_TOKEN``) every request, ``/ping`` included,
  must carry ``Authorization: Bearer <token>`` or gets 401 (compared in constant time). Serving without a
  token is allowed on a loopback address only, where just this machine can connect; binding any other
  address without a token is refused with a UserError.
- A body needs a Content-Length (absent, or ``Transfer-Encoding: chunked``: 411) of at most
  ``max_body_bytes`` (else ``TESSERA_ENDPOINT_MAX_BODY_BYTES``, default 64 MiB; more: 413, and the body
  is not read). A body that is not an image of at most the model's tile size is a 400 with a short
  message; a model failure is a 500 whose detail stays in the server's log.

The client (:class:`EndpointDetector`) takes its settings from its arguments, else the environment, never
from a request: ``TESSERA_ENDPOINT_TOKEN`` (the bearer token it sends) and ``TESSERA_ENDPOINT_TIMEOUT_S``
(seconds to wait for each tile's answer, default 30; an endpoint that does not answer in time fails the
batch with that reason, without retries).
"""

from __future__ import annotations

import hmac
import http.client
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from services.errors import UserError
from services.inference.detections import Detections
from services.inference.detector import Detector
from services.inference.endpoint_wire import (
    TILE_FORMATS,
    TILE_MODES,
    decode_tile,
    encode_tile,
    excerpt,
    features_of,
    parse_features,
)

log = logging.getLogger(__name__)

TOKEN_ENV = "TESSERA_ENDPOINT_TOKEN"
TIMEOUT_ENV = "TESSERA_ENDPOINT_TIMEOUT_S"
MAX_BODY_ENV = "TESSERA_ENDPOINT_MAX_BODY_BYTES"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
# A GeoJSON answer for one tile is small; more than this is a broken or hostile endpoint.
MAX_RESPONSE_BYTES = 64 * 2**20
# How long a server handler waits on a silent client (reading a request line, headers or body).
CLIENT_IDLE_TIMEOUT_S = 60.0


class EndpointUnavailableError(UserError):
    """The endpoint kept failing (5xx or no connection) after every retry, or did not answer in time."""


def endpoint_token(token: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token: ``token``, else ``TESSERA_ENDPOINT_TOKEN``; None when neither is set (or empty).

    A token must be printable ASCII without spaces (it travels in an HTTP header).
    """
    if token is None:
        token = (os.environ if environ is None else environ).get(TOKEN_ENV)
    if not token:
        return None
    if not all("!" <= c <= "~" for c in token):
        raise UserError(f"the endpoint token ({TOKEN_ENV}) must be printable ASCII without spaces")
    return token


def _setting(name: str, value: float | None, default: float, environ: Mapping[str, str] | None) -> float:
    """``value``, else the number in environment variable ``name``, else ``default``; must be > 0."""
    if value is None:
        text = (os.environ if environ is None else environ).get(name, "").strip()
        try:
            value = float(text) if text else default
        except ValueError:
            raise UserError(f"{name} must be a number, got {text!r}") from None
    if not value > 0:
        raise UserError(f"{name} must be more than 0, got {value}")
    return float(value)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` lets only this machine connect (127.0.0.0/8, ::1, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name, or "" (every interface)
        return False


class EndpointDetector:
    """A detector behind ``<url>/invocations`` (see the module docstring for the wire format).

    Tiles (float32 ``[B, C, H, W]`` scaled to [0, 1]) are sent as 8-bit images, ``concurrency`` at a time.
    5xx answers and connection errors are retried ``retries`` times with exponential backoff from
    ``backoff_s``; a 4xx answer or a malformed response is a UserError. A tile not answered within
    ``timeout_s`` (else ``TESSERA_ENDPOINT_TIMEOUT_S``, default 30) fails at once: a hung model would hang
    every retry too. ``token`` (else ``TESSERA_ENDPOINT_TOKEN``) is sent as a bearer token. Class names
    met in responses are appended to ``class_names`` (labels index it).
    """

    provider = "endpoint"

    def __init__(
        self,
        url: str,
        *,
        tile_width: int,
        tile_height: int,
        channels: int = 3,
        class_names: Sequence[str] | None = None,
        timeout_s: float | None = None,
        retries: int = 3,
        encoding: str = "png",
        score_threshold: float = 0.0,
        batch_size: int = 8,
        concurrency: int = 4,
        backoff_s: float = 0.5,
        token: str | None = None,
    ) -> None:
        if channels not in TILE_MODES:
            raise UserError(f"an endpoint takes 1, 3 or 4 band tiles, not {channels}")
        if encoding not in TILE_FORMATS:
            raise UserError(f"unknown tile encoding {encoding!r}; use one of {', '.join(TILE_FORMATS)}")
        if not url.startswith(("http://", "https://")):
            raise UserError(f"endpoint URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.name = self.url
        self.tile_width = int(tile_width)
        self.tile_height = int(tile_height)
        self.channels = int(channels)
        self.class_names: list[str] = list(class_names or [])
        self.timeout_s = _setting(TIMEOUT_ENV, timeout_s, DEFAULT_TIMEOUT_S, None)
        self._token = endpoint_token(token)
        self.retries = int(retries)
        self.encoding = encoding
        self.score_threshold = float(score_threshold)
        self.batch_size = int(batch_size)
        self.concurrency = max(1, int(concurrency))
        self.backoff_s = float(backoff_s)
        self._names_lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the token
        return f"EndpointDetector({self.url!r}, {self.channels}x{self.tile_height}x{self.tile_width})"

    def class_name(self, label: int) -> str:
        """The class name of ``label``, or the label as text when unknown."""
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def detect(self, pixels: np.ndarray) -> list[Detections]:
        """Detections in tile pixels, one per tile of ``pixels`` float32 ``[B, C, H, W]``."""
        pixels = np.asarray(pixels)
        expected = (self.channels, self.tile_height, self.tile_width)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise UserError(
                f"endpoint {self.url} takes tiles [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got {list(pixels.shape)}"
            )
        if pixels.shape[0] == 0:
            return []
        if self.concurrency == 1 or pixels.shape[0] == 1:
            return [self._detect_tile(tile) for tile in pixels]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, pixels.shape[0])) as pool:
            return list(pool.map(self._detect_tile, pixels))

    def ping(self) -> bool:
        """Whether ``GET <url>/ping`` answers 200."""
        request = urllib.request.Request(f"{self.url}/ping", headers=self._auth_headers())
        try:
            with urllib.request.urlopen(request, timeout=min(self.timeout_s, 5)) as r:
                return bool(r.status == 200)
        except (OSError, http.client.HTTPException):
            return False

    def _detect_tile(self, tile: np.ndarray) -> Detections:
        body = encode_tile(tile, self.encoding)
        doc = self._post(body)
        d = parse_features(doc, self._label_of, source=self.url)
        return d.above(self.score_threshold) if self.score_threshold > 0 else d

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _post(self, body: bytes) -> Any:
        fmt, content_type = TILE_FORMATS[self.encoding]
        url = f"{self.url}/invocations"
        headers = {"Content-Type": content_type, "Accept": "application/geo+json, application/json"}
        headers.update(self._auth_headers())
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))
            request = urllib.request.Request(url, data=body, method="POST", headers=headers)
            try:
                payload = self._exchange(request)
            except urllib.error.HTTPError as exc:
                detail = excerpt(exc.read(4096))
                if exc.code >= 500 or exc.code == 429:
                    last = f"HTTP {exc.code} {detail}"
                    log.warning("endpoint %s answered %s (attempt %d)", url, last, attempt + 1)
                    continue
                raise UserError(
                    _refusal(url, fmt, exc.code, detail, size=len(body), token=self._token)
                ) from exc
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out
                if _timed_out(exc):
                    raise EndpointUnavailableError(
                        f"endpoint {url} did not answer within {self.timeout_s:g} s; a slow model needs "
                        f"a larger timeout ({TIMEOUT_ENV} or the detector's timeout_s)"
                    ) from exc
                last = f"{type(exc).__name__}: {exc}"
                log.warning("endpoint %s failed: %s (attempt %d)", url, last, attempt + 1)
                continue
            try:
                return json.loads(payload)
            except ValueError as exc:
                raise UserError(
                    f"endpoint {url} answered something that is not JSON: {excerpt(payload)}"
                ) from exc
        raise EndpointUnavailableError(f"endpoint {url} failed {self.retries + 1} times; last: {last}")

    def _exchange(self, request: urllib.request.Request) -> bytes:
        """The answer's body, read within ``timeout_s`` of sending (a trickling server times out too)."""
        deadline = time.monotonic() + self.timeout_s
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            chunks: list[bytes] = []
            size = 0
            while chunk := response.read(65536):
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise UserError(
                        f"endpoint {request.full_url} answered over {MAX_RESPONSE_BYTES} bytes for a tile"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError("the answer took too long to arrive")
                chunks.append(chunk)
            return b"".join(chunks)

    def _label_of(self, name: str | int) -> int:
        if isinstance(name, int):
            return name
        with self._names_lock:
            if name in self.class_names:
                return self.class_names.index(name)
            short = name.rstrip("/").rsplit("/", 1)[-1].rsplit("#", 1)[-1]
            if short in self.class_names:
                return self.class_names.index(short)
            self.class_names.append(name)
            return len(self.class_names) - 1


def _timed_out(exc: BaseException) -> bool:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return isinstance(reason, TimeoutError)


def _refusal(url: str, fmt: str, code: int, detail: str, *, size: int, token: str | None) -> str:
    """What a 4xx answer means, and what to change."""
    if code == 401:
        sent = "a token that it does not accept" if token else "no token"
        return (
            f"endpoint {url} refused the request (HTTP 401): it wants a bearer token and got {sent}; set "
            f"{TOKEN_ENV} to the token the endpoint serves with"
        )
    if code == 413:
        return (
            f"endpoint {url} refused a {size}-byte {fmt} tile as too large (HTTP 413): use smaller tiles or "
            f"raise the endpoint's body limit ({MAX_BODY_ENV} where it is served by tessera)"
        )
    return f"endpoint {url} refused the tile ({fmt}): HTTP {code} {detail}"


#: Methods whose requests carry a body; one refused unread closes its connection (:func:`send_json_error`).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def send_reply(
    handler: BaseHTTPRequestHandler,
    status: int,
    payload: bytes,
    content_type: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer ``status`` with ``payload`` (no body to a HEAD request), its Content-Type and Content-Length
    first, then ``headers``."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(payload)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(payload)


def send_json_error(
    handler: BaseHTTPRequestHandler,
    status: int,
    message: str,
    *,
    read: bool = True,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer ``status`` with ``{"error": message}`` as JSON, then ``headers``.

    ``read=False``: the request's body (if its method has one) was not read, so the answer closes the
    connection, and lingers (:func:`linger`) so that the client still gets it.
    """
    extra = dict(headers or {})
    unread = not read and handler.command in _BODY_METHODS
    if unread:
        # The unread body would be taken for the next request: answer, then close.
        extra["Connection"] = "close"
        handler.close_connection = True
    send_reply(handler, status, json.dumps({"error": message}).encode(), "application/json", extra)
    if unread:
        linger(handler)


def linger(handler: BaseHTTPRequestHandler) -> None:
    """Discard a little of what the client already sent, so that closing with unread data does not reset
    the connection before the client reads the answer; never the whole body."""
    try:
        handler.wfile.flush()
        handler.connection.shutdown(socket.SHUT_WR)
        handler.connection.settimeout(0.5)
        for _ in range(16):
            if not handler.connection.recv(4096):
                break
    except OSError:
        pass


def bearer_token_ok(handler: BaseHTTPRequestHandler, expected: bytes) -> bool:
    """Whether the request carries ``Authorization: Bearer <expected>`` (compared in constant time); always
    True when ``expected`` is empty (no token is asked for)."""
    if not expected:
        return True
    scheme, _, value = (handler.headers.get("Authorization") or "").strip().partition(" ")
    given = value.strip().encode("latin-1", "replace")
    return scheme.lower() == "bearer" and hmac.compare_digest(given, expected)


def endpoint_server(
    detector: Detector,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    token: str | None = None,
    max_body_bytes: int | None = None,
) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) for ``detector``: ``GET /ping`` and ``POST /invocations``.

    The body is one tile image (PNG, TIFF, JPEG: anything Pillow reads), taken as 8-bit and divided by 255;
    smaller tiles are zero-padded to the model's tile size. ``port=0`` picks a free port
    (``server.server_address[1]``). Call ``serve_forever()`` (e.g. on a thread) and ``shutdown()``.
    ``token`` (else ``TESSERA_ENDPOINT_TOKEN``) and ``max_body_bytes`` (else
    ``TESSERA_ENDPOINT_MAX_BODY_BYTES``) as the module docstring says; a ``host`` that is not loopback
    without a token raises UserError.
    """
    secret = endpoint_token(token)
    if secret is None and not is_loopback(host):
        raise UserError(
            f"refusing to serve on {host or 'every interface'}:{port} without a token: anyone who can reach "
            f"it could use the model; set {TOKEN_ENV} (clients send the same) or bind 127.0.0.1"
        )
    limit = int(_setting(MAX_BODY_ENV, max_body_bytes, DEFAULT_MAX_BODY_BYTES, None))
    expected = secret.encode("ascii") if secret else b""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = CLIENT_IDLE_TIMEOUT_S  # a client that stalls mid-request frees its thread

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path.rstrip("/") == "/ping":
                send_reply(self, 200, b"", "text/plain")
            else:
                send_json_error(self, 404, "not found")

        def do_POST(self) -> None:
            if not self._authorized():
                return
            if self.path.rstrip("/") != "/invocations":
                send_json_error(self, 404, "not found", read=False)
                return
            body = self._body()
            if body is None:
                return
            try:
                tile = decode_tile(body, detector.channels, detector.tile_width, detector.tile_height)
            except UserError as exc:
                send_json_error(self, 400, str(exc))
                return
            try:
                (d,) = detector.detect(tile)
            except Exception:  # the model failed: the client may retry; the detail stays in this log
                log.exception("detector failed")
                send_json_error(self, 500, "the model failed on this tile; the endpoint's log says why")
                return
            payload = json.dumps(features_of(d, detector.class_names)).encode()
            send_reply(self, 200, payload, "application/geo+json")

        def _authorized(self) -> bool:
            if bearer_token_ok(self, expected):
                return True
            send_json_error(
                self, 401, "missing or wrong bearer token", read=False, headers={"WWW-Authenticate": "Bearer"}
            )
            return False

        def _body(self) -> bytes | None:
            """The request body, or None after answering 411, 400 or 413 without reading it."""
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding") or length is None:
                send_json_error(self, 411, "a Content-Length is required (no chunked bodies)", read=False)
                return None
            if not length.strip().isdigit():
                send_json_error(self, 400, "Content-Length must be a whole number of bytes", read=False)
                return None
            if int(length) > limit:
                send_json_error(self, 413, f"the body is over the {limit}-byte limit", read=False)
                return None
            body = self.rfile.read(int(length))
            if len(body) < int(length):  # the client went away mid-body
                self.close_connection = True
                return None
            return body

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_endpoint(
    detector: Detector,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    token: str | None = None,
    max_body_bytes: int | None = None,
) -> None:
    """Serve ``detector`` on ``host:port`` until interrupted (SageMaker/OSML containers listen on 8080).

    Loopback unless ``host`` says otherwise; another address needs a token (``token`` or
    ``TESSERA_ENDPOINT_TOKEN``). See :func:`endpoint_server`.
    """
    server = endpoint_server(detector, host, port, token=token, max_body_bytes=max_body_bytes)
    log.info(
        "serving %s on http://%s:%d (%s)",
        getattr(detector, "name", "detector"),
        host,
        server.server_address[1],
        "bearer token required" if endpoint_token(token) else "no token: loopback only",
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
