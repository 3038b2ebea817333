"""The catalog API's database connections: a small pool shared by the request threads."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from services.cloud import database as databases
from services.sight_catalog.problems import Problem


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
