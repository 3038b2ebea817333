"""The loop every queue-fed worker runs: take one message at a time until stopped, and settle each.

A service's worker subclasses :class:`QueueWorker` and implements :meth:`QueueWorker.poll` (receive at most
one message and handle it under a :class:`~services.cloud.queue.Heartbeat`); :meth:`QueueWorker.serve` runs
it until :meth:`QueueWorker.stop` (SIGTERM) or ``max_messages``, and rides out a database that is briefly
unreachable. :func:`settle` deletes a handled message, or hides it for a while; a message whose handling
raised is left alone, so SQS delivers it again and, after ``maxReceiveCount`` deliveries
(:func:`last_delivery`), moves it to the dead-letter queue.

Every message is untrusted input: each subclass's :meth:`QueueWorker.poll` runs inside
:func:`services.jobs.trust.confined` with the worker's :class:`~services.jobs.trust.TrustPolicy` (read from
the environment when the worker starts), so the document checkers it calls confine what a request may read,
write and connect to without each service wiring it up.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
from collections.abc import Callable
from functools import wraps
from typing import Any

import psycopg

from services.cloud import database
from services.cloud.queue import Message, QueueSettings, delete_message, set_visibility
from services.jobs.trust import TrustPolicy, confined

log = logging.getLogger(__name__)

#: SQS refuses visibility timeouts above 12 hours.
MAX_VISIBILITY_S = 43_200
#: Seconds to wait before polling again when the database was unreachable.
DATABASE_RETRY_S = 1.0


def default_worker_id() -> str:
    """``host:pid``: unique among live workers, and says where to look when a job misbehaves."""
    return f"{socket.gethostname()}:{os.getpid()}"


def last_delivery(message: Message, queue: QueueSettings) -> bool:
    """Whether this is the queue's last delivery of ``message`` before it goes to the dead-letter queue."""
    return queue.max_receive_count is not None and message.receive_count >= queue.max_receive_count


def settle(message: Message, client: Any, *, delete: bool, defer_s: float | None = None) -> None:
    """Delete a handled message, or hide it for ``defer_s`` seconds (clamped to 1 s .. 12 h; 0 hands it
    back at once); with neither, leave it to reappear when its visibility timeout lapses."""
    if delete:
        delete_message(message, client)
    elif defer_s is not None:
        seconds = 0 if defer_s <= 0 else min(MAX_VISIBILITY_S, max(1, math.ceil(defer_s)))
        set_visibility(message, seconds, client)


def _confined_poll(poll: Callable[..., bool]) -> Callable[..., bool]:
    """``poll`` run under its worker's trust policy (whoever calls it: ``serve`` or a test)."""

    @wraps(poll)
    def confined_poll(self: QueueWorker, *args: Any, **kwargs: Any) -> bool:
        with confined(self.trust):
            return poll(self, *args, **kwargs)

    return confined_poll


def reconnected(conn: psycopg.Connection[Any], database_url: str) -> psycopg.Connection[Any]:
    """``conn``, or a new connection to ``database_url`` when it was closed or broken."""
    return database.connect(database_url) if conn.closed or conn.broken else conn


class QueueWorker:
    """Serves messages one at a time until stopped (or ``max_messages`` are handled)."""

    def __init__(
        self, worker_id: str = "", max_messages: int | None = None, trust: TrustPolicy | None = None
    ) -> None:
        self.worker_id = worker_id or default_worker_id()
        self.max_messages = max_messages
        self.handled = 0
        self.stop_event = threading.Event()
        #: What the requests this worker handles may touch (see services.jobs.trust).
        self.trust = trust or TrustPolicy.from_environment()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Wrapped here, not in serve(), so no caller of poll (a CLI's --once, a test's crew) skips the policy.
        if "poll" in cls.__dict__:
            cls.poll = _confined_poll(cls.__dict__["poll"])  # type: ignore[method-assign]

    def poll(self, wait_s: int | None = None) -> bool:
        """Receive and handle at most one message; False when there was none."""
        raise NotImplementedError

    def describe(self) -> str:
        """What the worker serves, for the log line at the start of :meth:`serve`."""
        return type(self).__name__

    def serve(self) -> int:
        """Handle messages until :meth:`stop` (or ``max_messages``); returns how many were handled."""
        log.info("worker %s serving %s", self.worker_id, self.describe())
        while not self.stop_event.is_set():
            if self.max_messages is not None and self.handled >= self.max_messages:
                break
            try:
                self.poll()
            except psycopg.OperationalError:
                log.exception("database unreachable; retrying")
                self.stop_event.wait(DATABASE_RETRY_S)
        return self.handled

    def stop(self) -> None:
        """Finish the message in hand, then return from :meth:`serve`."""
        self.stop_event.set()

    def close(self) -> None:
        """Release what the worker holds (connections); nothing by default."""
