"""The loop every queue-fed worker runs: take one message at a time until stopped, and settle each.

A service's worker subclasses :class:`QueueWorker` and implements :meth:`QueueWorker.poll` (receive at most
one message and handle it under a :class:`~services.cloud.queue.Heartbeat`); :meth:`QueueWorker.serve` runs
it until :meth:`QueueWorker.stop` (SIGTERM) or ``max_messages``. A dependency that is down (the database,
SQS or S3 unreachable: :func:`outage`) never kills it: each failed poll is logged with what is down and
retried after a delay that doubles from 1 s to :data:`MAX_BACKOFF_S` (:class:`Backoff`); the work in hand
stays on its queue meanwhile. :func:`start_with_backoff` does the same for a worker whose dependencies are
down when it starts.

Stopping drains: after :meth:`QueueWorker.stop` no new message is taken and the one in hand may finish for
``drain_s`` seconds (``TESSERA_DRAIN_S``, default :data:`DEFAULT_DRAIN_S`, inside the container's stop
timeout); then :meth:`QueueWorker.abort` tells the service to give the work in hand back (the model runner
stops its model's batches and hands the region and its message back at once). A worker whose work cannot be
stopped in-process (:attr:`QueueWorker.restart_needed`) stops serving, and its command exits with
:data:`EXIT_RESTART` so the container is started again.

:func:`settle` deletes a handled message, or hides it for a while; a message whose handling
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
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as AwsConnectionError

from services.cloud import database
from services.cloud.queue import Message, QueueSettings, delete_message, set_visibility
from services.errors import UserError
from services.jobs.trust import TrustPolicy, confined

log = logging.getLogger(__name__)

#: SQS refuses visibility timeouts above 12 hours.
MAX_VISIBILITY_S = 43_200
#: The first retry after a dependency outage waits this long; each further failure doubles it up to the max.
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
DRAIN_ENV = "TESSERA_DRAIN_S"
#: The work in hand may finish for this long after SIGTERM; the fleet's containers are stopped with a
#: timeout of 30 s (infra/gpu_fleet.py), so the hand-back that follows has ten seconds.
DEFAULT_DRAIN_S = 20.0
#: Exit status (EX_TEMPFAIL) of a worker that must be restarted: a run it cannot get back holds a thread.
EXIT_RESTART = 75


def drain_seconds(environ: Any = None) -> float:
    """``TESSERA_DRAIN_S`` (seconds the work in hand may finish after SIGTERM), or the default."""
    text = (os.environ if environ is None else environ).get(DRAIN_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_DRAIN_S
    except ValueError:
        raise UserError(f"{DRAIN_ENV} must be a number of seconds, got {text!r}") from None
    if value < 0:
        raise UserError(f"{DRAIN_ENV} must be 0 or more seconds, got {value}")
    return value


def outage(error: BaseException) -> str | None:
    """What is down when ``error`` says a dependency cannot be reached (the database, an AWS endpoint, or
    AWS answering 5xx); ``None`` for any other error."""
    if isinstance(error, psycopg.OperationalError):
        return f"the database is unreachable ({_first_line(error)})"
    if isinstance(error, AwsConnectionError | HTTPClientError):
        return f"AWS is unreachable ({_first_line(error)})"
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if isinstance(status, int) and status >= 500:
            return f"AWS answers {status} ({_first_line(error)})"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


class Backoff:
    """Delays between retries: :data:`FIRST_BACKOFF_S`, doubling up to :data:`MAX_BACKOFF_S`."""

    def __init__(self, first_s: float = FIRST_BACKOFF_S, max_s: float = MAX_BACKOFF_S) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.failures = 0

    def next_delay(self) -> float:
        """Count a failure; the seconds to wait before the next try."""
        self.failures += 1
        return float(min(self.max_s, self.first_s * 2 ** (self.failures - 1)))

    def reset(self) -> None:
        """A try succeeded: the next failure waits the first delay again."""
        self.failures = 0


def start_with_backoff(
    make: Callable[[], QueueWorker], stop: threading.Event, backoff: Backoff | None = None
) -> QueueWorker | None:
    """``make()``, retried with backoff while its dependencies are down (:func:`outage`); None when ``stop``
    was set while waiting. Any other error is raised."""
    backoff = backoff or Backoff()
    while True:
        try:
            return make()
        except Exception as error:
            what = outage(error)
            if what is None:
                raise
            delay = backoff.next_delay()
            log.warning("cannot start the worker: %s; retry %d in %g s", what, backoff.failures, delay)
            if stop.wait(delay):
                return None


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
        #: Seconds the work in hand may finish after :meth:`stop` before :meth:`abort` (TESSERA_DRAIN_S).
        self.drain_s = drain_seconds()

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
        backoff = Backoff()
        while not self.stop_event.is_set():
            if self.max_messages is not None and self.handled >= self.max_messages:
                break
            if self.restart_needed:
                log.error("worker %s must be restarted: %s", self.worker_id, self.restart_reason())
                break
            try:
                self.poll()
            except Exception as error:
                what = outage(error)
                if what is None:
                    raise
                delay = backoff.next_delay()
                log.warning("worker %s: %s; retry %d in %g s", self.worker_id, what, backoff.failures, delay)
                self.stop_event.wait(delay)
            else:
                if backoff.failures:
                    log.info("worker %s: reachable again after %d retries", self.worker_id, backoff.failures)
                backoff.reset()
        return self.handled

    def stop(self) -> None:
        """Finish the message in hand, then return from :meth:`serve`."""
        self.stop_event.set()

    def abort(self, reason: str) -> None:
        """Give the work in hand back now (its drain time is over); nothing by default."""
        log.warning("worker %s: %s; the message in hand is left to the queue", self.worker_id, reason)

    @property
    def restart_needed(self) -> bool:
        """Whether this process holds work it cannot stop (it should exit and be started again)."""
        return False

    def restart_reason(self) -> str:
        """Why :attr:`restart_needed` holds."""
        return "the work in hand could not be stopped"

    def close(self) -> None:
        """Release what the worker holds (connections); nothing by default."""
