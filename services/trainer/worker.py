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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.cloud.queue import Heartbeat, Message
from services.jobs.documents import job_id_of
from services.jobs.queue_worker import (
    QueueWorker,
    QueueWorkerSettings,
    ServedQueue,
    Settlement,
    last_delivery,
    setting,
)
from services.trainer import handler

log = logging.getLogger(__name__)

QUEUE_ENV = "TESSERA_QUEUE_TRAINING_JOBS_URL"


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(QueueWorkerSettings):
    """Where the worker takes jobs from, and how."""

    queue_url: str
    wait_s: int = 5
    #: The trainer state file the idle agent reads (None: ``$TESSERA_TRAINER_STATE`` or the agent's default,
    #: :data:`services.trainer.idle.DEFAULT_TRAINER_STATE`).
    state_path: str | None = None
    #: Local scratch space for checkpoints and exports (None: a temporary directory per job).
    workdir: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Settings from the container environment; ``overrides`` win."""
        needed = "the trainer needs the training-jobs queue's URL"
        return cls(queue_url=setting(env, overrides, "queue_url", QUEUE_ENV, needed), **overrides)


class Worker(QueueWorker[WorkerSettings]):
    """Serves the training-jobs queue until stopped (or ``max_messages`` are handled); a stop request
    checkpoints the job in hand and hands its message back."""

    def __init__(self, settings: WorkerSettings) -> None:
        super().__init__(settings)
        self.open_queues(("training job", settings.queue_url))
        self.open_database()
        self.state = handler.TrainerStateFile(settings.state_path)
        self.outcomes: list[handler.Outcome] = []

    def work(self, message: Message, queue: ServedQueue) -> Settlement:
        """Run one job; delete its message, or release it at once (a stopped job resumes elsewhere)."""
        ctx = handler.Context(
            conn=self.conn,
            worker=self.worker_id,
            state=self.state,
            s3=self.s3,
            should_stop=self.stop_event.is_set,
            workdir=Path(self.settings.workdir) if self.settings.workdir else None,
            database_url=self.database_url,
        )
        outcome = handler.handle_job(ctx, message)
        self.outcomes.append(outcome)
        return Settlement(outcome.delete, 0 if outcome.release else None, outcome.note)

    def heartbeat(self, message: Message, queue: ServedQueue) -> Heartbeat:
        """The heartbeat a job runs under: it keeps ``message`` hidden and refreshes the trainer state file,
        every third of the visibility timeout but at least every :data:`handler.STATE_REFRESH_S`."""
        visibility_s = queue.visibility_timeout_s
        return Heartbeat(
            message,
            visibility_s=visibility_s,
            client=self.sqs,
            on_beat=self.state.beat,
            interval_s=min(max(1, int(visibility_s)) / 3, handler.STATE_REFRESH_S),
        )

    def failed(self, message: Message, queue: ServedQueue, error: Exception) -> None:
        """Record the error as the job's reason (FAILED on the last delivery); the message is left alone."""
        last = last_delivery(message, queue)
        log.exception(
            "training job message %s failed unexpectedly (delivery %d); %s",
            message.message_id,
            message.receive_count,
            "it goes to the dead-letter queue" if last else "it will be delivered again",
        )
        job_id = job_id_of(message.body)
        if job_id is None:
            return
        reason = f"{type(error).__name__}: {error}"
        try:
            self.reconnect()
            if last:
                handler.fail_job(
                    self.conn, job_id, f"gave up after {message.receive_count} deliveries: {reason}"
                )
            else:
                handler.requeue_job(self.conn, job_id, f"delivery {message.receive_count} failed: {reason}")
        except Exception:
            log.exception("recording the failure of job %s failed too", job_id)


def main() -> int:
    """``python -m services.trainer.worker``: serve with settings from the environment."""
    import argparse

    from services.trainer.commands import add_worker_options, run_worker

    parser = argparse.ArgumentParser(prog="python -m services.trainer.worker")
    add_worker_options(parser)
    return run_worker(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
