"""Fixtures for the sight catalog's tests: a migrated warehouse, the datasets bucket, and a web server on
loopback that serves what a test gives it (and remembers what was asked)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest

from services.cloud import objects
from services.cloud.database import apply_migrations, connect
from services.cloud.embedded import Resources


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to a fresh database with every migration applied."""
    with connect(database_url) as connection:
        apply_migrations(connection)
        yield connection


@pytest.fixture
def datasets(resources: Resources) -> str:
    """The datasets bucket (moto)."""
    return resources.buckets["datasets"]


@pytest.fixture
def s3(aws: str) -> Any:
    """An S3 client talking to moto."""
    return objects.s3_client()


@dataclass
class Served:
    """What the server answers for a path: status, headers and body."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class WebServer:
    """A server on 127.0.0.1: ``routes`` maps paths to answers; ``requests`` lists the paths asked for."""

    port: int
    routes: dict[str, Served]
    requests: list[str]

    def serve(self, path: str, body: bytes = b"", status: int = 200, **headers: str) -> None:
        """Answer ``path`` with ``body`` (headers by name: ``Content_Type="image/jpeg"``)."""
        self.routes[path] = Served(status, {k.replace("_", "-"): v for k, v in headers.items()}, body)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        """The URL of ``path`` on this server."""
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
def web() -> Iterator[WebServer]:
    """A threaded HTTP server on loopback answering from its ``routes`` (404 for anything else)."""
    routes: dict[str, Served] = {}
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            served = routes.get(self.path, Served(404, {"Content-Type": "text/plain"}, b"not here"))
            self.send_response(served.status)
            headers = {"Content-Length": str(len(served.body)), **served.headers}
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(served.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield WebServer(server.server_address[1], routes, requests)
    server.shutdown()
    server.server_close()
