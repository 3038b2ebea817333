"""The loop every queue-fed worker runs: take one message at a time until stopped, and settle each.

A service's worker is a small subclass of :class:`QueueWorker` plus its handler. Its settings subclass
:class:`QueueWorkerSettings` (the database, worker id, long-poll and ``max_messages`` every worker has),
adding the queue URL read from the environment with :func:`setting`. Its ``__init__`` calls
:meth:`QueueWorker.open_queues` (SQS and S3 clients, the settings of each queue it serves) and
:meth:`QueueWorker.open_database` (connected and migrated; made again when broken, closed by
:meth:`QueueWorker.close`), and it implements :meth:`QueueWorker.work`: what one message does, returning
its :class:`Outcome`. The base's :meth:`QueueWorker.poll` receives at most one message (from the first of
its queues that has one), and :meth:`QueueWorker.handle` runs the work under a
:class:`~services.cloud.queue.Heartbeat` (override :meth:`QueueWorker.heartbeat` for a beat that also
extends a lease), logs the outcome's note and settles the message; an error in the work goes to
:meth:`QueueWorker.failed` (by default: logged, and the message left to be delivered again).

:meth:`QueueWorker.serve` runs it until :meth:`QueueWorker.stop` (SIGTERM) or ``max_messages``. A
dependency that is down (the database, SQS or S3 unreachable: :func:`outage`) never kills it: each failed
poll is logged with what is down and retried after a delay that doubles from 1 s to :data:`MAX_BACKOFF_S`
(:class:`Backoff`); the work in hand stays on its queue meanwhile. :func:`start_with_backoff` does the same
for a worker whose dependencies are down when it starts.

Stopping drains: after :meth:`QueueWorker.stop` no new message is taken and the one in hand may finish for
``drain_s`` seconds (``TESSERA_DRAIN_S``, default :data:`DEFAULT_DRAIN_S`, inside the container's stop
timeout); then :meth:`QueueWorker.abort` tells the service to give the work in hand back (the model runner
stops its model's batches and hands the region and its message back at once). A worker whose work cannot be
stopped in-process (:attr:`QueueWorker.restart_needed`) stops serving, and its command exits with
:data:`EXIT_RESTART` so the container is started again.

:func:`settle` deletes a handled message, or hides it for a while; a message whose handling
raised is left alone, so SQS delivers it again and, after ``maxReceiveCount`` deliveries
(:func:`last_delivery`), moves it to the dead-letter queue.

Every message is untrusted input: :meth:`QueueWorker.poll` (the base's, or a subclass's own) runs inside
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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import wraps
from typing import Any, Generic, Protocol, TypeVar, cast

import psycopg
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as AwsConnectionError

from services.cloud import database, objects
from services.cloud.queue import (
    Heartbeat,
    Message,
    QueueSettings,
    delete_message,
    queue_settings,
    receive_messages,
    set_visibility,
    sqs_client,
)
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


@dataclass(frozen=True, kw_only=True)
class QueueWorkerSettings:
    """What every worker's settings hold; a service's settings subclass it with its queue URLs and options."""

    database_url: str | None = None
    worker_id: str = ""
    #: Seconds a receive long-polls (the last of the worker's queues) when the queues were empty.
    wait_s: int = 1
    #: Stop after handling this many messages (None: serve until stopped).
    max_messages: int | None = None


SettingsT = TypeVar("SettingsT", bound=QueueWorkerSettings)


def optional_setting(
    env: Mapping[str, str] | None, overrides: dict[str, Any], key: str, name: str
) -> str | None:
    """``overrides[key]`` (taken out of ``overrides``), else ``$name`` in ``env`` (default: the environment);
    None when neither says."""
    return overrides.pop(key, None) or (os.environ if env is None else env).get(name) or None


def setting(
    env: Mapping[str, str] | None, overrides: dict[str, Any], key: str, name: str, needed: str
) -> str:
    """:func:`optional_setting`, required: UserError ``"<name> is not set: <needed>"`` when neither says."""
    value = optional_setting(env, overrides, key, name)
    if not value:
        raise UserError(f"{name} is not set: {needed}")
    return value


@dataclass(frozen=True, kw_only=True)
class ServedQueue(QueueSettings):
    """A queue a worker serves: its settings, its URL, and what its messages are (``kind``, in log lines)."""

    kind: str
    url: str


class Outcome(Protocol):
    """What :meth:`QueueWorker.work` says to do with a handled message (see :func:`settle`)."""

    @property
    def delete(self) -> bool: ...

    @property
    def defer_s(self) -> float | None: ...

    #: Logged as ``<kind> message <id>: <note>`` (None: nothing logged).
    @property
    def note(self) -> str | None: ...


@dataclass(frozen=True)
class Settlement:
    """An :class:`Outcome`: delete the message, or hide it ``defer_s`` seconds (0: hand it back now; None:
    leave it to reappear when its visibility lapses); ``note`` is logged when given."""

    delete: bool
    defer_s: float | None = None
    note: str | None = None


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
    def confined_poll(self: QueueWorker[Any], *args: Any, **kwargs: Any) -> bool:
        with confined(self.trust):
            return poll(self, *args, **kwargs)

    return confined_poll


def reconnected(conn: psycopg.Connection[Any], database_url: str) -> psycopg.Connection[Any]:
    """``conn``, or a new connection to ``database_url`` when it was closed or broken."""
    return database.connect(database_url) if conn.closed or conn.broken else conn


class QueueWorker(Generic[SettingsT]):
    """Serves messages one at a time until stopped (or ``max_messages`` are handled)."""

    #: Seconds to wait after each poll that did not fail (a worker that runs passes rather than messages).
    pause_s: float = 0.0
    #: The queues :meth:`poll` serves, in order (:meth:`open_queues`).
    queues: list[ServedQueue]
    sqs: Any
    s3: Any
    #: The service's database (:meth:`open_database`); ``lease_conn`` is the heartbeat thread's own.
    database_url: str
    conn: psycopg.Connection[Any]
    lease_conn: psycopg.Connection[Any]

    def __init__(self, settings: SettingsT | None = None, *, trust: TrustPolicy | None = None) -> None:
        #: The service's settings (a test's bare worker: the defaults).
        self.settings: SettingsT = (
            settings if settings is not None else cast(SettingsT, QueueWorkerSettings())
        )
        self.worker_id = self.settings.worker_id or default_worker_id()
        self.max_messages = self.settings.max_messages
        self.handled = 0
        self.stop_event = threading.Event()
        #: What the requests this worker handles may touch (see services.jobs.trust).
        self.trust = trust or TrustPolicy.from_environment()
        #: Seconds the work in hand may finish after :meth:`stop` before :meth:`abort` (TESSERA_DRAIN_S).
        self.drain_s = drain_seconds()
        #: Lines about one message go to the service's logger (the subclass's module).
        self.log = logging.getLogger(type(self).__module__)
        self.queues = []
        self._connections: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Wrapped here, not in serve(), so no caller of poll (a CLI's --once, a test's crew) skips the policy.
        if "poll" in cls.__dict__:
            cls.poll = _confined_poll(cls.__dict__["poll"])  # type: ignore[method-assign]

    def open_queues(self, *queues: tuple[str, str]) -> None:
        """SQS and S3 clients, and the settings of the queues :meth:`poll` serves: ``(kind, url)`` pairs in
        the order served (``kind`` names their messages in log lines)."""
        self.sqs = sqs_client()
        self.s3 = objects.s3_client()
        self.queues = [
            ServedQueue(**asdict(queue_settings(url, self.sqs)), kind=kind, url=url) for kind, url in queues
        ]

    def open_database(self, *, lease_conn: bool = False) -> None:
        """Connect to the settings' database (default: the platform's) and apply the migrations; with
        ``lease_conn``, a second connection on which the heartbeat thread extends leases, never inside the
        main thread's work. :meth:`poll` makes them again when broken; :meth:`close` closes them."""
        self.database_url = self.settings.database_url or database.database_url()
        self.conn = database.connect(self.database_url)
        database.apply_migrations(self.conn)
        self._connections = ("conn",)
        if lease_conn:
            self.lease_conn = database.connect(self.database_url)
            self._connections += ("lease_conn",)

    def reconnect(self) -> None:
        """Make the database connections again where they were closed or broken."""
        for name in self._connections:
            setattr(self, name, reconnected(getattr(self, name), self.database_url))

    @property
    def lease_s(self) -> float:
        """A lease on the work in hand: half the first queue's visibility timeout (the heartbeat extends
        both)."""
        return self.queues[0].visibility_timeout_s / 2

    @_confined_poll
    def poll(self, wait_s: int | None = None) -> bool:
        """Receive at most one message, from the first of :attr:`queues` that has one, and :meth:`handle`
        it; False when all were empty. Only the last queue is long-polled (``wait_s``, default the
        settings'), so an earlier one is never starved by a wait on a later one."""
        self.reconnect()
        wait = self.settings.wait_s if wait_s is None else wait_s
        for position, queue in enumerate(self.queues):
            last = position == len(self.queues) - 1
            messages = receive_messages(
                queue.url, max_messages=1, wait_s=wait if last else 0, client=self.sqs
            )
            if messages:
                self.handle(messages[0], queue)
                return True
        return False

    def handle(self, message: Message, queue: ServedQueue) -> None:
        """Do :meth:`work` under :meth:`heartbeat`, log the outcome's note and settle the message as it says;
        an error in the work goes to :meth:`failed`."""
        self.handled += 1
        try:
            with self.heartbeat(message, queue):
                outcome = self.work(message, queue)
        except Exception as error:
            self.failed(message, queue, error)
            return
        if outcome.note is not None:
            self.log.info("%s message %s: %s", queue.kind, message.message_id, outcome.note)
        settle(message, self.sqs, delete=outcome.delete, defer_s=outcome.defer_s)

    def heartbeat(self, message: Message, queue: ServedQueue) -> Heartbeat:
        """The heartbeat the work on ``message`` runs under: it keeps the message hidden, extending its
        visibility every third of the timeout. A service whose beat does more (extends a lease, refreshes a
        file) overrides this with its own ``on_beat``."""
        return Heartbeat(message, visibility_s=queue.visibility_timeout_s, client=self.sqs)

    def work(self, message: Message, queue: ServedQueue) -> Outcome:
        """Handle one message of ``queue``; what to do with it."""
        raise NotImplementedError

    def failed(self, message: Message, queue: ServedQueue, error: Exception) -> None:
        """The work on ``message`` raised ``error``: log it and leave the message, so SQS delivers it again
        and, after ``maxReceiveCount`` deliveries, moves it to the dead-letter queue. A service that records
        the failure extends this; one that lets the error out of :meth:`poll` (:meth:`serve` backs off on an
        outage and re-raises anything else) raises ``error`` here."""
        self.log.exception(
            "%s message %s failed unexpectedly (delivery %d); it will be delivered again",
            queue.kind,
            message.message_id,
            message.receive_count,
        )

    def describe(self) -> str:
        """What the worker serves, for the log line at the start of :meth:`serve`: its queues."""
        return " then ".join(queue.url for queue in self.queues) or type(self).__name__

    def serve(self) -> int:
        """Handle messages until :meth:`stop` (or ``max_messages``); returns how many were handled."""
        log.info("worker %s serving %s", self.worker_id, self.describe())
        backoff = Backoff()
        while not self.stop_event.is_set():
            if self._done():
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
                if self.pause_s and not self._done():
                    self.stop_event.wait(self.pause_s)
        return self.handled

    def _done(self) -> bool:
        return self.max_messages is not None and self.handled >= self.max_messages

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
        """Close the database connections (:meth:`open_database`)."""
        for name in self._connections:
            getattr(self, name).close()
