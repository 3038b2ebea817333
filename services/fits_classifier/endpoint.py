"""The frame classifier over HTTP, for other systems: ``POST /classify`` a FITS file, get its verdict.

- ``POST /classify`` (``?name=`` names the frame in the verdict, default ``upload``): the body is the FITS
  file's bytes as they are (plain, gzip or tile-compressed: told apart by their content). The answer is the
  verdict's JSON (:meth:`~services.fits_classifier.verdicts.Verdict.as_json`): 200 when the frame was
  classified, 422 when it is unreadable (status ``UNREADABLE``, the ``reason`` says what is wrong with the
  file, and ``error`` says the same). With a database, each verdict (unreadable ones too) is recorded once
  per frame checksum and model version (:func:`~services.fits_classifier.records.record`), and the answer
  says so in ``recorded`` (``id``, and ``new``: False when the frame was judged by this model before).
- ``GET /health``: 200 ``{"status": "ok", "model": ..., "version": ...}``, without a token.

The trust boundary (docs/ARCHITECTURE.md): every request is untrusted, as for the model endpoint
(:mod:`services.inference.endpoint`), whose conventions this server follows.

- It binds 127.0.0.1 unless another address is asked for (``host=``).
- With a bearer token (``token=``, else ``TESSERA_FITS_TOKEN``), ``POST /classify`` must carry
  ``Authorization: Bearer <token>`` or gets 401 (compared in constant time). Without a token the server
  may bind a loopback address only; any other address is refused with a UserError.
- A body needs a Content-Length (absent, or ``Transfer-Encoding: chunked``: 411) of at most ``max_bytes``
  (default 64 MiB; more: 413, and the body is not read).
- At most ``max_concurrent`` uploads (default 4, else ``TESSERA_FITS_MAX_CONCURRENT``) are read and
  classified at once, so memory stays bounded by about ``max_concurrent`` frames. An authorized upload
  beyond that is answered at once with 503, ``Retry-After`` and a JSON error, its body unread, rather than
  queued; ``GET /health`` is never counted and still answers. A client has ``timeout_s`` seconds (default 60)
  to send its request line and headers, and as long again for its whole body; a body that ends early or
  does not arrive in time is a 400.
- Every error is JSON ``{"error": "..."}`` saying what to change: 404 for another path, 405 for another
  method (with ``Allow``), 500 when the model fails (the detail stays in the server's log), 503 when the
  verdict could not be recorded (recording is idempotent: send the frame again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg

from services.cloud import database as databases
from services.errors import UserError
from services.fits_classifier import records
from services.fits_classifier.model import FrameClassifier
from services.fits_classifier.verdicts import CLASSIFIED, Verdict, judge
from services.inference.endpoint import (
    bearer_token_ok,
    endpoint_token,
    is_loopback,
    send_json_error,
    send_reply,
)

log = logging.getLogger(__name__)

TOKEN_ENV = "TESSERA_FITS_TOKEN"
DEFAULT_PORT = 8090
DEFAULT_MAX_BYTES = 64 * 2**20
DEFAULT_TIMEOUT_S = 60.0
#: Uploads read and classified at once (each may hold a frame of ``max_bytes`` and its decoded pixels).
DEFAULT_MAX_CONCURRENT = 4
MAX_CONCURRENT_ENV = "TESSERA_FITS_MAX_CONCURRENT"
#: Seconds a client refused for want of a free slot is told to wait (``Retry-After``).
RETRY_AFTER_S = 1
#: The frame's name in its verdict when the request gives none (``?name=``).
DEFAULT_SOURCE = "upload"
MAX_NAME_CHARS = 1024
_CHUNK = 1 << 16
# Which methods each path answers; anything else on a known path is a 405.
_ROUTES = {"/classify": "POST", "/health": "GET"}
#: Sent with every answer: a verdict is about one upload, never to be cached.
_NO_STORE = {"Cache-Control": "no-store"}


def fits_token(token: str | None = None) -> str | None:
    """The bearer token: ``token``, else ``TESSERA_FITS_TOKEN``; None when neither is set (or empty)."""
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    try:
        return endpoint_token(token or None, environ={})
    except UserError:
        raise UserError(
            f"the classifier's token ({TOKEN_ENV}) must be printable ASCII without spaces"
        ) from None


def max_concurrent_uploads(value: int | None = None) -> int:
    """The cap on uploads in hand at once: ``value``, else ``TESSERA_FITS_MAX_CONCURRENT``, else
    :data:`DEFAULT_MAX_CONCURRENT`; UserError unless it is a whole number of at least 1."""
    if value is None:
        text = os.environ.get(MAX_CONCURRENT_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_CONCURRENT
        try:
            value = int(text)
        except ValueError:
            raise UserError(
                f"{MAX_CONCURRENT_ENV} must be a whole number of uploads, at least 1; got {text!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"the cap on concurrent uploads must be a whole number, at least 1; got {value!r}")
    return value


class FitsServer(ThreadingHTTPServer):
    """The HTTP server :func:`fits_server` makes; closing it closes its database connection too.

    ``slots`` holds one permit per upload that may be read and classified at once (``max_concurrent``).
    """

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        database: Any,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    ) -> None:
        self.database: _Database | None = database  # before binding: a failed bind closes it
        self.max_concurrent = max_concurrent
        self.slots = threading.BoundedSemaphore(max_concurrent)
        if ":" in address[0]:  # an IPv6 address
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def server_close(self) -> None:
        super().server_close()
        if self.database is not None:
            self.database.close()


class _Database:
    """One connection shared by the request threads, one statement at a time; reopened when it breaks."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        try:
            self._conn = databases.connect(url)
            databases.apply_migrations(self._conn)
        except psycopg.Error as error:
            self.close()
            raise UserError(f"cannot use the database to record verdicts: {error}".strip()) from error

    def record(self, verdict: Verdict) -> records.Recorded:
        with self._lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = databases.connect(self.url)
            try:
                return records.record(self._conn, verdict)
            except psycopg.Error:
                self._conn.close()  # the next request connects afresh
                self._conn = None
                raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def fits_server(
    classifier: FrameClassifier,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    database_url: str | None = None,
    max_concurrent: int | None = None,
) -> FitsServer:
    """An HTTP server (not yet serving) classifying frames with ``classifier``; see the module docstring.

    ``port=0`` picks a free port (``server.server_address[1]``). Call ``serve_forever()`` (e.g. on a
    thread), then ``shutdown()`` and ``server_close()``. ``token`` (else ``TESSERA_FITS_TOKEN``) is required
    to bind a ``host`` that is not loopback (UserError otherwise). ``database_url``: record every verdict
    there (migrations applied first, as the other commands do). ``max_concurrent``: uploads in hand at once
    (else ``TESSERA_FITS_MAX_CONCURRENT``, else 4); more get 503 at once.
    """
    secret = fits_token(token)
    if secret is None and not is_loopback(host):
        raise UserError(
            f"refusing to serve on {host or 'every interface'}:{port} without a token: anyone who can reach "
            f"it could use the classifier and fill its records; set {TOKEN_ENV} (clients send it as "
            "'Authorization: Bearer <token>') or bind 127.0.0.1"
        )
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise UserError(f"the body limit must be a whole number of bytes, at least 1; got {max_bytes!r}")
    if not timeout_s > 0:
        raise UserError(f"the read timeout must be more than 0 seconds, got {timeout_s}")
    slots = max_concurrent_uploads(max_concurrent)
    handler = _handler(classifier, secret, max_bytes, float(timeout_s))
    database = _Database(database_url) if database_url else None
    try:
        return FitsServer((host, port), handler, database, slots)
    except OSError as error:
        if database is not None:
            database.close()
        raise UserError(f"cannot serve on {host}:{port}: {error.strerror or error}") from error


def _handler(
    classifier: FrameClassifier, secret: str | None, limit: int, timeout_s: float
) -> type[BaseHTTPRequestHandler]:
    expected = secret.encode("ascii") if secret else b""
    health = json.dumps({"status": "ok", "model": classifier.name, "version": classifier.version}).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = timeout_s  # a client that stalls before its body frees its thread
        server: FitsServer

        def do_GET(self) -> None:
            if self._route("GET"):
                self._send(200, health)

        def do_POST(self) -> None:
            if not self._route("POST") or not self._authorized():
                return
            query = parse_qs(urlsplit(self.path).query)
            source = (query.get("name") or [DEFAULT_SOURCE])[0] or DEFAULT_SOURCE
            if len(source) > MAX_NAME_CHARS or not source.isprintable():
                self._error(
                    400,
                    f"?name= must be printable and at most {MAX_NAME_CHARS} characters; send the frame's "
                    "file name",
                    read=False,
                )
                return
            if not self.server.slots.acquire(blocking=False):
                self._error(
                    503,
                    f"the classifier is busy: {self.server.max_concurrent} uploads are being read or "
                    f"classified, as many as it takes at once; send the frame again in {RETRY_AFTER_S} s",
                    read=False,
                    extra={"Retry-After": str(RETRY_AFTER_S)},
                )
                return
            try:
                self._classify(source)
            finally:
                self.server.slots.release()

        def _classify(self, source: str) -> None:
            """Read the body, judge it, record the verdict and answer (a slot is held)."""
            body = self._body()
            if body is None:
                return
            try:
                [verdict] = judge(classifier, [(source, body)])
            except Exception:  # the model failed: the detail stays in this log
                log.exception("classifying %s failed", source)
                self._error(500, "the model failed on this frame; the server's log says why")
                return
            document = verdict.as_json()
            if self.server.database is not None:
                try:
                    recorded = self.server.database.record(verdict)
                except psycopg.Error as error:
                    log.error("recording the verdict of %s failed: %s", source, error)
                    self._error(
                        503,
                        "the frame was judged but its verdict could not be recorded (the database is "
                        "unavailable); send it again later",
                    )
                    return
                document["recorded"] = {"id": recorded.id, "new": recorded.new}
            score = "" if verdict.score is None else f" {verdict.score:.3f}"
            log.info(
                "%s: %s%s%s", source, verdict.verdict, score, f" ({verdict.reason})" if verdict.reason else ""
            )
            if verdict.status == CLASSIFIED:
                self._send(200, json.dumps(document).encode())
            else:
                document["error"] = f"the frame is unreadable: {verdict.reason}"
                self._send(422, json.dumps(document).encode())

        def do_PUT(self) -> None:
            self._route("PUT")

        def do_DELETE(self) -> None:
            self._route("DELETE")

        def do_PATCH(self) -> None:
            self._route("PATCH")

        def handle_expect_100(self) -> bool:
            # 100 Continue is sent by _body once the request is accepted, so a refused body is never sent.
            return True

        def _route(self, method: str) -> bool:
            """Whether ``method`` on this path is served; else answers 404 or 405."""
            path = urlsplit(self.path).path.rstrip("/") or "/"
            allowed = _ROUTES.get(path)
            if allowed is None:
                self._error(
                    404, f"no such path {path}; POST /classify a FITS file, or GET /health", read=False
                )
                return False
            if method != allowed:
                self._error(
                    405, f"{path} takes {allowed}, not {method}", read=False, extra={"Allow": allowed}
                )
                return False
            return True

        def _authorized(self) -> bool:
            if bearer_token_ok(self, expected):
                return True
            self._error(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the token the "
                f"classifier serves with ({TOKEN_ENV})",
                read=False,
                extra={"WWW-Authenticate": 'Bearer realm="tessera-fits"'},
            )
            return False

        def _body(self) -> bytes | None:
            """The request body, or None after answering 411, 413 or 400."""
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding") or length is None:
                self._error(
                    411, "a Content-Length is required (no chunked bodies): send the file's size", read=False
                )
                return None
            if not length.strip().isdigit():
                self._error(400, "Content-Length must be a whole number of bytes", read=False)
                return None
            size = int(length)
            if size > limit:
                self._error(
                    413,
                    f"the body is {size} bytes, over this server's {limit}-byte limit; send a smaller "
                    "(e.g. tile-compressed) frame or raise the limit",
                    read=False,
                )
                return None
            expects = (self.headers.get("Expect") or "").lower() == "100-continue"
            if expects and self.request_version != "HTTP/1.0":
                self.send_response_only(100)
                self.end_headers()
            return self._read(size)

        def _read(self, size: int) -> bytes | None:
            """``size`` bytes within ``timeout_s``, or None after answering 400."""
            deadline = time.monotonic() + timeout_s
            chunks: list[bytes] = []
            held = 0
            try:
                while held < size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    self.connection.settimeout(left)
                    chunk = self.rfile.read1(min(_CHUNK, size - held))
                    if not chunk:
                        self._error(
                            400,
                            f"the body ended after {held} of the {size} bytes its Content-Length declares; "
                            "send the whole file",
                            read=False,
                        )
                        return None
                    chunks.append(chunk)
                    held += len(chunk)
            except TimeoutError:
                self._error(
                    400,
                    f"the body did not arrive within {timeout_s:g} s ({held} of {size} bytes came); send "
                    "it faster or ask for a longer read timeout",
                    read=False,
                )
                return None
            except OSError:  # the client went away: nobody to answer
                self.close_connection = True
                return None
            finally:
                self.connection.settimeout(timeout_s)
            return b"".join(chunks)

        def _error(
            self, status: int, message: str, *, read: bool = True, extra: dict[str, str] | None = None
        ) -> None:
            """An error answer; ``read=False``: the body (if any) was not read, so the connection closes."""
            send_json_error(self, status, message, read=read, headers={**_NO_STORE, **(extra or {})})

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """The standard library's own refusals (a malformed request line, an unknown method) as JSON."""
            self.close_connection = True
            text = message or self.responses.get(code, ("error",))[0]
            with contextlib.suppress(OSError):  # the client may be gone already
                self._send(code, json.dumps({"error": text}).encode(), {"Connection": "close"})

        def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
            send_reply(self, status, payload, "application/json", {**_NO_STORE, **(headers or {})})

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def serve(
    classifier: FrameClassifier,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    database_url: str | None = None,
    max_concurrent: int | None = None,
) -> int:
    """Serve ``classifier`` (see :func:`fits_server`) until SIGTERM or SIGINT, printing its URL; returns 0.

    Requests in hand when the signal comes are not waited for.
    """
    server = fits_server(
        classifier,
        host=host,
        port=port,
        token=token,
        max_bytes=max_bytes,
        timeout_s=timeout_s,
        database_url=database_url,
        max_concurrent=max_concurrent,
    )
    secret = fits_token(token)
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    thread = threading.Thread(target=server.serve_forever, name="fits-endpoint", daemon=True)
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
        thread.start()
        shown = f"[{host}]" if ":" in host else (host or "0.0.0.0")
        print(
            f"serving {classifier.name} {classifier.version} on http://{shown}:{server.server_address[1]} "
            "(POST /classify, GET /health); "
            + ("bearer token required" if secret else "no token: this machine only")
            + f"; at most {server.max_concurrent} uploads at once"
            + ("; recording verdicts" if database_url else "")
            + "; Ctrl-C stops",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        if thread.is_alive():
            server.shutdown()
            thread.join(5)
        server.server_close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
