"""A stand-in for Amazon Rekognition on loopback: answers JSON 1.1 calls with the recorded responses of
``recorded/`` and keeps every request it received (operation, decoded body), for the tests to check."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

RECORDED = Path(__file__).resolve().parent / "recorded"
ARN = (
    "arn:aws:rekognition:us-east-1:123456789012:project/paris-sights/version/"
    "paris-sights.2026-01-10T09.00.00/1736499600000"
)


def recorded(name: str) -> dict[str, Any]:
    """The recorded exchange ``recorded/<name>.json``: status, headers, body."""
    exchange: dict[str, Any] = json.loads((RECORDED / f"{name}.json").read_text(encoding="utf-8"))
    return exchange


@dataclass(frozen=True)
class Received:
    """A request the stub received."""

    operation: str  # from X-Amz-Target, e.g. "DetectCustomLabels"
    body: dict[str, Any]
    authorized: bool  # it carried a SigV4 Authorization header

    @property
    def image(self) -> bytes:
        """The image bytes sent (``Image.Bytes``, base64 on the wire)."""
        return base64.b64decode(self.body["Image"]["Bytes"])


class RekognitionStub:
    """Serves ``default`` (a recorded response's name) to every call, except that the names queued with
    :meth:`answer` go first, one per call. ``latency_s`` delays each answer (workers overlap)."""

    def __init__(self, default: str = "detect_custom_labels", *, latency_s: float = 0.0) -> None:
        self.default = default
        self.latency_s = latency_s
        self.received: list[Received] = []
        self._queue: deque[str] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def endpoint(self) -> str:
        """The stub's URL, for boto3's ``endpoint_url``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def answer(self, names: Iterable[str]) -> None:
        """Answer the next calls with these recorded responses, in order."""
        with self._lock:
            self._queue.extend(names)

    def start(self) -> RekognitionStub:
        """Start serving."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def _next(self, received: Received) -> dict[str, Any]:
        with self._lock:
            self.received.append(received)
            name = self._queue.popleft() if self._queue else self.default
        return recorded(name)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                target = self.headers.get("X-Amz-Target", "")
                received = Received(
                    operation=target.split(".", 1)[-1],
                    body=body,
                    authorized=self.headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256"),
                )
                exchange = stub._next(received)
                if stub.latency_s:
                    time.sleep(stub.latency_s)
                payload = json.dumps(exchange["body"]).encode()
                self.send_response(int(exchange["status"]))
                for key, value in exchange["headers"].items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
