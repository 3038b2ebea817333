"""The trainer's worker loop: serve the training-jobs queue, one job at a time, under a visibility heartbeat.

A job that fails for a reason a user can fix is recorded FAILED and its message deleted, and the worker goes
on serving. An unexpected error is recorded as the job's reason and the message left alone: SQS delivers it
again (the job resumes from its checkpoint) and, after ``maxReceiveCount`` deliveries, moves it to the
dead-letter queue; the last delivery records the job FAILED. A stop request (SIGTERM: the instance is
stopping) checkpoints the running job, hands its message back and returns.

On a machine with several accelerators (or with ``$TESSERA_TRAINER_PROCS`` > 1) a job trains in one process
per device under torchrun (:mod:`services.trainer.distributed_job`); the heartbeat and the state file go on
from this process meanwhile, and a stop request reaches the training processes.

Run it as ``tessera worker trainer``; it reads ``TESSERA_QUEUE_TRAINING_JOBS_URL`` and the database settings
(``services.cloud.database``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.cloud import database, objects
from services.cloud.queue import (
    Heartbeat,
    Message,
    QueueSettings,
    queue_settings,
    receive_messages,
    sqs_client,
)
from services.errors import UserError
from services.jobs.documents import job_id_of
from services.jobs.queue_worker import QueueWorker, last_delivery, reconnected, settle
from services.trainer import handler

log = logging.getLogger(__name__)

QUEUE_ENV = "TESSERA_QUEUE_TRAINING_JOBS_URL"


@dataclass(frozen=True)
class WorkerSettings:
    """Where the worker takes jobs from, and how."""

    queue_url: str
    database_url: str | None = None
    worker_id: str = ""
    #: Seconds a receive long-polls when the queue was empty.
    wait_s: int = 5
    #: Stop after handling this many messages (None: serve until stopped).
    max_messages: int | None = None
    #: The trainer state file the idle agent reads (None: ``$TESSERA_TRAINER_STATE`` or the agent's default,
    #: :data:`services.trainer.idle.DEFAULT_TRAINER_STATE`).
    state_path: str | None = None
    #: Local scratch space for checkpoints and exports (None: a temporary directory per job).
    workdir: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Settings from the container environment; ``overrides`` win."""
        env = os.environ if env is None else env
        queue = overrides.pop("queue_url", None) or env.get(QUEUE_ENV)
        if not queue:
            raise UserError(f"{QUEUE_ENV} is not set: the trainer needs the training-jobs queue's URL")
        return cls(queue_url=queue, **overrides)


class Worker(QueueWorker):
    """Serves the training-jobs queue until stopped (or ``max_messages`` are handled)."""

    def __init__(self, settings: WorkerSettings) -> None:
        super().__init__(settings.worker_id, settings.max_messages)
        self.settings = settings
        self.sqs = sqs_client()
        self.s3 = objects.s3_client()
        self.queue: QueueSettings = queue_settings(settings.queue_url, self.sqs)
        self.database_url = settings.database_url or database.database_url()
        self.conn = database.connect(self.database_url)
        database.apply_migrations(self.conn)
        self.state = handler.TrainerStateFile(settings.state_path)
        self.outcomes: list[handler.Outcome] = []

    def poll(self, wait_s: int | None = None) -> bool:
        """Receive and handle at most one job; False when the queue was empty."""
        self.conn = reconnected(self.conn, self.database_url)
        wait = self.settings.wait_s if wait_s is None else wait_s
        messages = receive_messages(self.settings.queue_url, max_messages=1, wait_s=wait, client=self.sqs)
        if not messages:
            return False
        self.handle(messages[0])
        return True

    def handle(self, message: Message) -> None:
        """Handle one message under a heartbeat; delete or release it according to the outcome."""
        ctx = handler.Context(
            conn=self.conn,
            worker=self.worker_id,
            state=self.state,
            s3=self.s3,
            should_stop=self.stop_event.is_set,
            workdir=Path(self.settings.workdir) if self.settings.workdir else None,
            database_url=self.database_url,
        )
        beat = self.heartbeat(message)
        self.handled += 1
        try:
            with beat:
                outcome = handler.handle_job(ctx, message)
        except Exception as error:
            last = last_delivery(message, self.queue)
            log.exception(
                "training job message %s failed unexpectedly (delivery %d); %s",
                message.message_id,
                message.receive_count,
                "it goes to the dead-letter queue" if last else "it will be delivered again",
            )
            self._record_unexpected(message, error, last_attempt=last)
            return
        self.outcomes.append(outcome)
        log.info("training job message %s: %s", message.message_id, outcome.note)
        settle(message, self.sqs, delete=outcome.delete, defer_s=0 if outcome.release else None)

    def heartbeat(self, message: Message) -> Heartbeat:
        """The heartbeat a job runs under: it keeps ``message`` hidden and refreshes the trainer state file,
        every third of the visibility timeout but at least every :data:`handler.STATE_REFRESH_S`."""
        visibility_s = self.queue.visibility_timeout_s
        return Heartbeat(
            message,
            visibility_s=visibility_s,
            client=self.sqs,
            on_beat=self.state.beat,
            interval_s=min(max(1, int(visibility_s)) / 3, handler.STATE_REFRESH_S),
        )

    def _record_unexpected(self, message: Message, error: BaseException, *, last_attempt: bool) -> None:
        job_id = job_id_of(message.body)
        if job_id is None:
            return
        reason = f"{type(error).__name__}: {error}"
        try:
            self.conn = reconnected(self.conn, self.database_url)
            if last_attempt:
                handler.fail_job(
                    self.conn, job_id, f"gave up after {message.receive_count} deliveries: {reason}"
                )
            else:
                handler.requeue_job(self.conn, job_id, f"delivery {message.receive_count} failed: {reason}")
        except Exception:
            log.exception("recording the failure of job %s failed too", job_id)

    def describe(self) -> str:
        """The training-jobs queue."""
        return self.settings.queue_url

    def stop(self) -> None:
        """Checkpoint the job in hand (if any), hand its message back, and return from :meth:`serve`."""
        self.stop_event.set()

    def close(self) -> None:
        """Close the database connection."""
        self.conn.close()


def main() -> int:
    """``python -m services.trainer.worker``: serve with settings from the environment."""
    import argparse

    from services.trainer.commands import add_worker_options, run_worker

    parser = argparse.ArgumentParser(prog="python -m services.trainer.worker")
    add_worker_options(parser)
    return run_worker(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
