"""One training-job message: validate it, record the job, train it, record the outcome.

Errors a user can cause (a bad job, unknown task, missing or empty dataset, bad hyper-parameters), an export
ONNX Runtime does not reproduce and an unusable checkpoint fail the job with the reason, and the message is
deleted: delivering it again would fail the same way. A stop request (the instance is stopping) writes a
checkpoint and hands the message back at once, so the next delivery resumes. Anything else propagates to
the worker, which records it and leaves the message to be delivered again (dead-letter queue at last).

A job on a machine with several accelerators (or with ``$TESSERA_TRAINER_PROCS`` > 1) trains in one process
per device (:mod:`services.trainer.distributed_job`, under torchrun); rank 0 writes checkpoints, the model and
the registry entry, and the handler records what it reports, with the same outcomes as above.

Job rows live in ``training_jobs`` (``services/trainer/migrations``). The trainer's state file (the idle
agent's: ``$TESSERA_TRAINER_STATE``, default ``/run/tessera/trainer-state.json``, see
:mod:`services.trainer.idle`) says busy while a job runs, refreshed at least every minute, and not busy once
it ends; on a training box the same beats publish the busy heartbeat metric (:class:`idle.BusyHeartbeat`)
from the job's start, so data staging and CPU-bound phases count as work for the idle alarm and the safety
net.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from services.cloud.queue import Message
from services.errors import UserError
from services.jobs.documents import job_id_of
from services.trainer import idle
from services.trainer.job import TrainingJob, parse_job

log = logging.getLogger(__name__)

STATE_REFRESH_S = 30.0
"""The longest the worker leaves the state file unrefreshed while a job runs (the agent wants a minute)."""
FINAL = ("SUCCESS", "FAILED")


@dataclass(frozen=True)
class Outcome:
    """What to do with the message: delete it, or make it visible again at once (``release``)."""

    delete: bool
    status: str
    note: str = ""
    release: bool = False


@dataclass(frozen=True)
class JobRecord:
    """A row of ``training_jobs``."""

    job_id: str
    status: str
    reason: str | None
    model_uri: str | None
    registered: str | None
    attempts: int
    task: str | None


class TrainerStateFile:
    """The trainer's state file, which the instance's idle agent reads (:mod:`services.trainer.idle`).

    ``busy`` with the job's id when a job starts, rewritten by :meth:`beat` while it runs (the worker calls it
    from the visibility heartbeat, at least every :data:`STATE_REFRESH_S`, and training every 10 s), and not
    busy once the job ends, however it ends. The format and the default path are the agent's
    (:func:`services.trainer.idle.write_trainer_state`). Failing to write it is logged, never fatal: the agent
    counts a stale busy file as not busy and an unreadable one as busy.

    While a job runs, :meth:`start` and :meth:`beat` also send the busy heartbeat (at most once a minute) when
    there is one: ``heartbeat``, else the training box's (``TESSERA_INSTANCE_ID`` set), else none.
    """

    def __init__(self, path: str | Path | None = None, heartbeat: idle.BusyHeartbeat | None = None) -> None:
        self.path = Path(path or os.environ.get(idle.TRAINER_STATE_ENV) or idle.DEFAULT_TRAINER_STATE)
        self.heartbeat = heartbeat or idle.busy_heartbeat_from_environment(os.environ)
        self.job_id: str | None = None
        self.last_beat = 0.0
        # The heartbeat thread and the training loop both beat; the lock keeps a late beat from writing
        # "busy" over the end of the job.
        self._lock = threading.Lock()

    def start(self, job_id: str) -> None:
        """Say ``job_id`` is running, as of now."""
        with self._lock:
            self.job_id = job_id
            self._write(busy=True, job_id=job_id)
        self._publish()

    def beat(self, min_interval_s: float = 0.0) -> None:
        """Say the job is still running (at most once per ``min_interval_s``); nothing when no job runs."""
        with self._lock:
            running = self.job_id is not None
            if running and time.time() - self.last_beat >= min_interval_s:
                self._write(busy=True, job_id=self.job_id)
        if running:
            self._publish()  # outside the lock: a slow API call must not hold up the training loop

    def _publish(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.publish()

    def clear(self) -> None:
        """The job ended: say the trainer is not busy (naming the job that ran last)."""
        with self._lock:
            job_id, self.job_id = self.job_id, None
            self._write(busy=False, job_id=job_id)

    def _write(self, *, busy: bool, job_id: str | None) -> None:
        now = time.time()
        try:
            idle.write_trainer_state(self.path, busy=busy, job_id=job_id, now=now)
        except OSError:
            log.warning("cannot write the trainer state file %s", self.path, exc_info=True)
            return
        self.last_beat = now


def get_job(conn: psycopg.Connection[Any], job_id: str) -> JobRecord | None:
    """The row of a job, or None."""
    row = conn.execute(
        "SELECT id, status, reason, model_uri, registered, attempts, task FROM training_jobs WHERE id = %s",
        (job_id,),
    ).fetchone()
    return JobRecord(*row) if row is not None else None


def record_queued(conn: psycopg.Connection[Any], job: TrainingJob) -> None:
    """Record a job as QUEUED (what ``submit`` does); an existing row is left alone."""
    conn.execute(
        "INSERT INTO training_jobs (id, request, task, status) VALUES (%s, %s, %s, 'QUEUED')"
        " ON CONFLICT (id) DO NOTHING",
        (job.job_id, Jsonb(job.to_json()), job.task),
    )


def start_job(conn: psycopg.Connection[Any], job: TrainingJob, worker: str) -> bool:
    """Move a job to RUNNING (recording it if new); False when it has finished already."""
    row = conn.execute(
        "INSERT INTO training_jobs (id, request, task, status, worker, attempts, started_at)"
        " VALUES (%s, %s, %s, 'RUNNING', %s, 1, now())"
        " ON CONFLICT (id) DO UPDATE SET status = 'RUNNING', worker = EXCLUDED.worker,"
        "  attempts = training_jobs.attempts + 1, request = EXCLUDED.request, task = EXCLUDED.task,"
        "  started_at = COALESCE(training_jobs.started_at, now()), updated_at = now()"
        " WHERE training_jobs.status NOT IN ('SUCCESS', 'FAILED')"
        " RETURNING 1",
        (job.job_id, Jsonb(job.to_json()), job.task, worker),
    ).fetchone()
    return row is not None


def finish_job(
    conn: psycopg.Connection[Any], job_id: str, *, model_uri: str | None, registered: str | None, step: int
) -> None:
    """Mark a job SUCCESS with its model."""
    conn.execute(
        "UPDATE training_jobs SET status = 'SUCCESS', reason = NULL, model_uri = %s, registered = %s,"
        " step = %s, finished_at = now(), updated_at = now() WHERE id = %s",
        (model_uri, registered, step, job_id),
    )


def fail_job(
    conn: psycopg.Connection[Any], job_id: str, reason: str, request: Mapping[str, Any] | None = None
) -> bool:
    """Mark a job FAILED with ``reason`` (recording it if new); a finished job is left alone."""
    row = conn.execute(
        "INSERT INTO training_jobs (id, request, status, reason, finished_at)"
        " VALUES (%s, %s, 'FAILED', %s, now())"
        " ON CONFLICT (id) DO UPDATE SET status = 'FAILED', reason = EXCLUDED.reason,"
        "  finished_at = now(), updated_at = now()"
        " WHERE training_jobs.status NOT IN ('SUCCESS', 'FAILED') RETURNING 1",
        (job_id, Jsonb(dict(request)) if request is not None else None, reason),
    ).fetchone()
    return row is not None


def requeue_job(conn: psycopg.Connection[Any], job_id: str, reason: str) -> None:
    """A running job stopped before the end (it resumes from its checkpoint): back to QUEUED, with why."""
    conn.execute(
        "UPDATE training_jobs SET status = 'QUEUED', reason = %s, updated_at = now()"
        " WHERE id = %s AND status = 'RUNNING'",
        (reason, job_id),
    )


@dataclass
class Context:
    """What handling a job needs."""

    conn: psycopg.Connection[Any]
    worker: str
    state: TrainerStateFile
    s3: Any = None
    should_stop: Callable[[], bool] | None = None
    workdir: Path | None = None
    #: The database the training processes of a multi-device job connect to (rank 0 registers the model).
    database_url: str | None = None


def handle_job(ctx: Context, message: Message) -> Outcome:
    """Train the job a message carries; see the module docstring for what happens to failures."""
    from services.trainer import checkpoint, distributed_job, loop
    from services.trainer.device import choose_device
    from services.trainer.storage import storage_for
    from services.trainer.tasks import make_task

    try:
        job = parse_job(message.body)
    except UserError as error:
        job_id = job_id_of(message.body) or f"message-{message.message_id}"
        fail_job(ctx.conn, job_id, str(error), request=_raw(message.body))
        return Outcome(delete=True, status="FAILED", note=f"job {job_id} is not valid: {error}")
    existing = get_job(ctx.conn, job.job_id)
    if existing is not None and existing.status in FINAL:
        return Outcome(delete=True, status=existing.status, note=f"job {job.job_id} finished already")
    start_job(ctx.conn, job, ctx.worker)
    ctx.state.start(job.job_id)
    try:
        task = make_task(job.task)
        processes = distributed_job.process_count(job.device)
        if processes > 1:
            return _run_processes(ctx, job, task, processes)
        device = choose_device(job.device)
        result = loop.run(
            task,
            job,
            device,
            storage_for(job.output, ctx.s3),
            conn=ctx.conn,
            workdir=ctx.workdir,
            on_step=lambda step, losses: ctx.state.beat(min_interval_s=10.0),
            should_stop=ctx.should_stop,
            s3_client=ctx.s3,
        )
    except (UserError, loop.ExportMismatchError, checkpoint.CheckpointError) as error:
        fail_job(ctx.conn, job.job_id, str(error))
        return Outcome(delete=True, status="FAILED", note=f"job {job.job_id} failed: {error}")
    except loop.TrainingStoppedError as stopped:
        requeue_job(ctx.conn, job.job_id, str(stopped))
        return Outcome(delete=False, release=True, status="QUEUED", note=str(stopped))
    finally:
        ctx.state.clear()
    registered = result.registered.ref if result.registered is not None else None
    return _succeeded(ctx, job, steps=result.steps, model_uri=result.model_uri, registered=registered)


def _succeeded(
    ctx: Context, job: TrainingJob, *, steps: int, model_uri: str | None, registered: str | None
) -> Outcome:
    finish_job(ctx.conn, job.job_id, model_uri=model_uri, registered=registered, step=steps)
    return Outcome(
        delete=True,
        status="SUCCESS",
        note=f"job {job.job_id}: {steps} steps, model {model_uri}"
        + (f", registered {registered}" if registered else ""),
    )


def _run_processes(ctx: Context, job: TrainingJob, task: Any, processes: int) -> Outcome:
    """Train ``job`` with one process per local device (torchrun); the same outcomes as in-process."""
    from services.trainer import distributed_job

    cls = type(task)
    try:
        result = distributed_job.run_processes(
            job.to_json(),
            processes,
            task_class=f"{cls.__module__}:{cls.__qualname__}",
            database_url=ctx.database_url,
            workdir=ctx.workdir,
            should_stop=ctx.should_stop,
            on_wait=lambda: ctx.state.beat(min_interval_s=10.0),
        )
    except distributed_job.JobFailedError as error:
        fail_job(ctx.conn, job.job_id, str(error))
        return Outcome(delete=True, status="FAILED", note=f"job {job.job_id} failed: {error}")
    except distributed_job.JobStoppedError as stopped:
        requeue_job(ctx.conn, job.job_id, str(stopped))
        return Outcome(delete=False, release=True, status="QUEUED", note=str(stopped))
    return _succeeded(ctx, job, steps=result.steps, model_uri=result.model_uri, registered=result.registered)


def _raw(body: str) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"body": body[:10_000]}
    return data if isinstance(data, dict) else {"body": data}
