"""The sight catalog's refresher as a worker: ``tessera worker sight-catalog``.

It runs a refresher pass (:class:`~services.sight_catalog.refresher.Refresher`: collect finished trainings,
refresh the marts, label, start trainings) every :attr:`WorkerSettings.refresh_s` seconds
(``TESSERA_CATALOG_REFRESH_S``, default 60), counted from the end of one pass to the start of the next,
and logs a heartbeat line after each: the pass's number and what it did. It serves no queue: it runs the
same loop as the queue workers (:class:`~services.jobs.queue_worker.QueueWorker`), so it is started, stopped
and kept alive the same way (:func:`~services.jobs.commands.serve_until_stopped`):

- SIGTERM or SIGINT stops it: the pass in hand ends after the city in hand (a city's labelling and a
  training start are never cut in half), and no pass follows;
- an error in one city is logged and recorded in the pass's summary, and the pass goes on;
- the database, S3 or SQS out of reach ends the pass; the next one is tried after a delay that doubles from
  1 s to 30 s while the outage lasts (a lost database connection is made again), and a worker that cannot
  reach them when it starts waits the same way.

The platform runs exactly one (``infra/catalog.py``: two would send the same training jobs twice).
``--once`` runs one pass and exits; ``--max-messages N`` runs N passes.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from services.cloud import objects
from services.cloud.queue import sqs_client
from services.errors import UserError
from services.jobs.commands import log_to_stderr, serve_until_stopped, user_errors, worker_overrides
from services.jobs.queue_worker import QueueWorker, QueueWorkerSettings

if TYPE_CHECKING:  # imported when a worker is made: ``tessera --help`` need not load the labellers
    from services.sight_catalog.refresher import PassSummary, Refresher, RefresherSettings

log = logging.getLogger(__name__)

REFRESH_ENV = "TESSERA_CATALOG_REFRESH_S"
#: Seconds between passes unless TESSERA_CATALOG_REFRESH_S says otherwise.
DEFAULT_REFRESH_S = 60.0


def _refresher_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> RefresherSettings:
    """The refresher's settings from ``env`` (default: the environment); ``overrides`` win."""
    from services.sight_catalog.refresher import RefresherSettings

    return RefresherSettings.from_env(env, **overrides)


def _default_refresher_settings() -> RefresherSettings:
    from services.sight_catalog.refresher import RefresherSettings

    return RefresherSettings()


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(QueueWorkerSettings):
    """How often the refresher runs, what a pass does, and where the warehouse is (``max_messages``: passes;
    ``wait_s`` is not used: it serves no queue)."""

    refresh_s: float = DEFAULT_REFRESH_S
    refresher: RefresherSettings = field(default_factory=_default_refresher_settings)

    def __post_init__(self) -> None:
        if not self.refresh_s >= 0:
            raise UserError(f"{REFRESH_ENV} must be 0 or more seconds, got {self.refresh_s}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Settings from the container environment; ``overrides`` win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        text = env.get(REFRESH_ENV, "").strip()
        if text:
            try:
                values["refresh_s"] = float(text)
            except ValueError:
                raise UserError(f"{REFRESH_ENV} must be a number of seconds, got {text!r}") from None
        if "refresher" not in overrides:
            values["refresher"] = _refresher_settings(env)
        return cls(**{**values, **overrides})


class Worker(QueueWorker[WorkerSettings]):
    """Runs refresher passes, ``refresh_s`` apart, until stopped (or ``max_messages`` passes are done)."""

    def __init__(self, settings: WorkerSettings, refresher: Refresher | None = None) -> None:
        from services.sight_catalog.refresher import Refresher

        super().__init__(settings)
        #: Seconds from the end of one pass to the start of the next (the loop is QueueWorker.serve).
        self.pause_s = settings.refresh_s
        if refresher is None:
            for name in ("datasets_bucket", "models_bucket", "queue_url"):
                settings.refresher.training.required(name)  # say what is missing before starting
        self.open_database()
        self.refresher = refresher or Refresher(
            settings.refresher, s3=objects.s3_client(), sqs=sqs_client(), should_stop=self.stop_event.is_set
        )
        #: The last pass's summary (None before the first).
        self.last: PassSummary | None = None

    def describe(self) -> str:
        """What the worker does."""
        return f"the sight catalog's refresher, a pass every {self.settings.refresh_s:g} s"

    def poll(self, wait_s: int | None = None) -> bool:
        """Run one pass; True when it did something (or met an error in a city)."""
        self.reconnect()
        summary = self.refresher.run_pass(self.conn)
        self.handled += 1
        self.last = summary
        log.info(
            "heartbeat: worker %s pass %d %s: %s",
            self.worker_id,
            self.handled,
            "idle" if summary.idle else "busy",
            summary.line(),
        )
        return not summary.idle

    def abort(self, reason: str) -> None:
        """The drain time ran out: the pass stops after the city in hand (nothing is handed back)."""
        log.warning("worker %s: %s; the pass ends after the city in hand", self.worker_id, reason)


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``tessera worker sight-catalog``."""
    from services.jobs.commands import add_queue_worker_options

    add_queue_worker_options(parser, wait_s=1, records="the work it does")
    parser.add_argument(
        "--refresh-s",
        type=float,
        metavar="SECONDS",
        help=f"seconds between refresher passes (default: ${REFRESH_ENV}, else 60)",
    )
    parser.add_argument(
        "--providers", choices=["auto", "cpu", "cuda"], help="ONNX Runtime provider of the city models"
    )


def run_worker(args: argparse.Namespace) -> int:
    """Run the refresher (``tessera worker sight-catalog``) until SIGTERM."""
    return user_errors("worker", _worker)(args)


def _worker(args: argparse.Namespace) -> int:
    log_to_stderr()
    overrides = worker_overrides(args)
    if getattr(args, "refresh_s", None) is not None:
        overrides["refresh_s"] = args.refresh_s
    if getattr(args, "providers", None):
        overrides["refresher"] = _refresher_settings(providers=args.providers)
    settings = WorkerSettings.from_env(**overrides)
    return serve_until_stopped(
        lambda: Worker(settings), on_signal="finishing the city in hand, then stopping"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m services.sight_catalog.worker [--once] ...``: the worker on its own (until the
    ``tessera`` front door lists it)."""
    parser = argparse.ArgumentParser(prog="tessera worker sight-catalog")
    add_worker_options(parser)
    return run_worker(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
