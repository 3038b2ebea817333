"""What the services' command handlers share: UserError -> one line and status 2, and running a queue
worker in the foreground until it is done or a signal asks it to stop."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from services.errors import UserError
from services.jobs.queue_worker import EXIT_RESTART, QueueWorker, start_with_backoff

Handler = Callable[[argparse.Namespace], int]


def user_errors(name: str, run: Handler) -> Handler:
    """``run``, with a UserError printed as ``tessera NAME: message`` on stderr and exit status 2."""

    def handler(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except UserError as error:
            print(f"tessera {name}: {error}", file=sys.stderr)
            return 2

    return handler


def add_queue_worker_options(
    parser: argparse.ArgumentParser, *, wait_s: int, records: str = "the work it does"
) -> None:
    """The options every queue worker has: ``--once``, ``--max-messages``, ``--wait`` (its long-poll when
    idle, default ``wait_s``) and ``--worker-id`` (the name recorded on ``records``)."""
    parser.add_argument("--once", action="store_true", help="handle at most one message, then exit")
    parser.add_argument("--max-messages", type=int, metavar="N", help="exit after handling N messages")
    parser.add_argument(
        "--wait", type=int, default=wait_s, help=f"seconds to long-poll when idle (default: {wait_s})"
    )
    parser.add_argument("--worker-id", help=f"name recorded on {records} (default: host:pid)")


def worker_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Worker settings from the options every ``tessera worker`` has: ``--once``, ``--max-messages``,
    ``--wait`` and ``--worker-id`` (those a parser lacks are left to the settings' defaults)."""
    overrides: dict[str, Any] = {}
    if getattr(args, "wait", None) is not None:
        overrides["wait_s"] = args.wait
    if getattr(args, "once", False):
        overrides["max_messages"] = 1
    elif getattr(args, "max_messages", None) is not None:
        overrides["max_messages"] = args.max_messages
    if getattr(args, "worker_id", None):
        overrides["worker_id"] = args.worker_id
    return overrides


def log_to_stderr() -> None:
    """INFO log lines with time and logger on stderr (stdout carries the EMF metrics)."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # rasterio opens an AWS session per s3:// dataset; botocore would log each credential lookup.
    logging.getLogger("botocore").setLevel(logging.WARNING)


def serve_until_stopped(make: Callable[[], QueueWorker], *, on_signal: str, once: bool = False) -> int:
    """Start the worker ``make`` returns (retried with backoff while its database or queues are down) and
    serve (or, with ``once``, poll once) until done. SIGTERM or SIGINT calls ``worker.stop()`` (logged with
    ``on_signal``: what the worker does next) and, ``worker.drain_s`` seconds later or at a second signal,
    ``worker.abort()``. The worker is closed and the signal handlers restored afterwards. Returns 0, or
    exits the process with :data:`~services.jobs.queue_worker.EXIT_RESTART` when the worker holds work it
    cannot stop (a thread lost to a model run: only a new process gets it back)."""
    log = logging.getLogger(__name__)
    timers: list[threading.Timer] = []
    starting = threading.Event()  # set by a signal that arrives before the worker has started
    started: list[QueueWorker] = []

    def stop(signum: int, frame: Any) -> None:
        if not started:
            log.info("signal %d: not started yet; stopping", signum)
            starting.set()
            return
        worker = started[0]
        if worker.stop_event.is_set():
            log.info("signal %d again: giving the work in hand back now", signum)
            worker.abort("stopped again")
            return
        log.info("signal %d: %s (for up to %g s)", signum, on_signal, worker.drain_s)
        worker.stop()
        timer = threading.Timer(
            worker.drain_s, worker.abort, (f"the {worker.drain_s:g} s drain time ran out",)
        )
        timer.daemon = True
        timer.start()
        timers.append(timer)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    worker: QueueWorker | None = None
    try:
        worker = start_with_backoff(make, starting)
        if worker is None:
            return 0
        started.append(worker)
        if once:
            worker.poll()
        else:
            worker.serve()
    finally:
        for timer in timers:
            timer.cancel()
        if worker is not None:
            worker.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if worker.restart_needed:
        log.error(
            "exiting with status %d so the worker is started again: %s", EXIT_RESTART, worker.restart_reason()
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_RESTART)  # a plain exit would wait for the thread that cannot be stopped
    return 0


def service_main(
    argv: Sequence[str] | None,
    *,
    register: Callable[[Any], None],
    service: str,
    worker_help: str,
    add_worker_options: Callable[[argparse.ArgumentParser], None],
    run_worker: Handler,
) -> int:
    """One service's commands on their own (``python -m services.<package>.commands ...``): what
    ``register`` adds, and ``worker SERVICE``, parsed as the ``tessera`` front door parses them."""
    parser = argparse.ArgumentParser(prog="tessera")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(commands)
    worker = commands.add_parser("worker", help=worker_help)
    worker.add_argument("service", choices=[service], help="which service")
    add_worker_options(worker)
    worker.set_defaults(handler=run_worker)
    args = parser.parse_args(argv)
    return int(args.handler(args))
