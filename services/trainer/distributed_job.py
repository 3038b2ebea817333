"""One training job over every local accelerator: the worker's side (:func:`run_processes`) and the side of
each training process (``python -m services.trainer.distributed_job``, started by torchrun).

The worker runs a job in its own process when the machine has one device. With more (several CUDA GPUs, or
Gaudi cards), or when ``$TESSERA_TRAINER_PROCS`` asks for N > 1 processes (gloo on the CPU, for testing), it
starts ``python -m torch.distributed.run --standalone --nproc_per_node=N -m services.trainer.distributed_job``
on the job, waits for it and reads what the processes left in the job's scratch directory:

* ``job.json`` (the job, written by the worker) and ``stop`` (written by the worker when it is asked to stop:
  SIGTERM; the processes also take SIGTERM themselves, as torchrun forwards it). Every rank asks after each
  step whether any rank was told to stop (one all-reduce), so all stop at the same step and rank 0 writes the
  checkpoint.
* ``result-RANK.json``, one per process: ``success`` (rank 0's holds the model URI and registry ref),
  ``stopped``, ``failed`` with the kind (``user``, ``export``, ``checkpoint``: the job's FAILED reason) or
  ``error`` (anything else: the worker raises it, and the message is delivered again).

Rank 0 does what the loop gives rank 0: checkpoints, export, stored artifacts and the registry entry (it
connects to ``$TESSERA_DB_URL``, which the worker sets). A process that fails exits with status 1, so
torchrun ends the others rather than leaving them waiting in a collective.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.errors import UserError

log = logging.getLogger(__name__)

PROCS_ENV = "TESSERA_TRAINER_PROCS"
JOB_FILE = "job.json"
STOP_FILE = "stop"
#: Result kinds that fail the job (its message is deleted), as the single-process path does.
FAILURE_KINDS = ("user", "export", "checkpoint")


def process_count(prefer: str, env: Mapping[str, str] | None = None) -> int:
    """How many training processes a job on device ``prefer`` gets: ``$TESSERA_TRAINER_PROCS`` when set,
    else one per local device of the chosen kind."""
    from services.trainer.device import local_device_count

    env = os.environ if env is None else env
    given = env.get(PROCS_ENV, "").strip()
    if given:
        try:
            count = int(given)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"{PROCS_ENV}={given!r}: give a whole number of training processes >= 1")
        return count
    return local_device_count(prefer)


@dataclass(frozen=True)
class ProcessesResult:
    """What rank 0 reported for a job that finished."""

    steps: int
    model_uri: str | None
    registered: str | None


class JobFailedError(Exception):
    """The processes failed the job for a reason a user can act on; ``kind`` is user, export or
    checkpoint, and the message is the reason the job records."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


class JobStoppedError(Exception):
    """The processes stopped on request after rank 0 wrote a checkpoint."""


def command(job_file: Path, processes: int, task_class: str, workdir: Path | None) -> list[str]:
    """The torchrun command line training ``job_file`` with ``processes`` processes."""
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "services.trainer.distributed_job",
        str(job_file),
        "--task-class",
        task_class,
    ]
    if workdir is not None:
        args += ["--workdir", str(workdir)]
    return args


def run_processes(
    job_json: Mapping[str, Any],
    processes: int,
    *,
    task_class: str,
    database_url: str | None,
    workdir: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_wait: Callable[[], None] | None = None,
    poll_s: float = 0.5,
) -> ProcessesResult:
    """Train ``job_json`` with ``processes`` processes under torchrun; wait, passing a stop request on.

    ``on_wait()`` runs every ``poll_s`` while they train (the worker refreshes its state file there).
    Raises :class:`JobFailedError` or :class:`JobStoppedError` as the processes report, and RuntimeError
    for anything else (a process that crashed, or reported an unexpected error).
    """
    with tempfile.TemporaryDirectory(prefix="tessera-job-") as scratch_name:
        scratch = Path(scratch_name)
        job_file = scratch / JOB_FILE
        job_file.write_text(json.dumps(dict(job_json)))
        env = dict(os.environ)
        # The processes import what this one imports (the task's module included).
        paths = [p for p in sys.path if p and Path(p).is_dir()]
        env["PYTHONPATH"] = os.pathsep.join(
            dict.fromkeys([*paths, *env.get("PYTHONPATH", "").split(os.pathsep)])
        )
        env.pop(PROCS_ENV, None)
        if database_url:
            env["TESSERA_DB_URL"] = database_url
        argv = command(job_file, processes, task_class, workdir)
        log.info("training job %s with %d processes: %s", job_json.get("job_id"), processes, " ".join(argv))
        stop_sent = False

        def pass_stop_on() -> None:
            nonlocal stop_sent
            if not stop_sent and should_stop is not None and should_stop():
                (scratch / STOP_FILE).touch()  # every rank sees it after its next step
                stop_sent = True

        pass_stop_on()
        child = subprocess.Popen(argv, env=env, start_new_session=True)
        try:
            while True:
                try:
                    returncode = child.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if on_wait is not None:
                    on_wait()
                pass_stop_on()
        except BaseException:
            # The worker itself is going down: take the processes with it (torchrun forwards SIGTERM).
            child.terminate()
            child.wait()
            raise
        return _outcome(scratch, processes, returncode)


def _outcome(scratch: Path, processes: int, returncode: int) -> ProcessesResult:
    results: dict[int, dict[str, Any]] = {}
    for rank in range(processes):
        path = scratch / f"result-{rank}.json"
        if path.is_file():
            results[rank] = json.loads(path.read_text())
    main = results.get(0)
    if main is not None and main["status"] == "success" and returncode == 0:
        return ProcessesResult(
            steps=int(main["steps"]), model_uri=main.get("model_uri"), registered=main.get("registered")
        )
    # Rank 0's report first: when it fails, the others only see it go.
    ordered = [results[r] for r in sorted(results, key=lambda r: (r != 0, r))]
    for result in ordered:
        if result["status"] == "failed" and result.get("kind") in FAILURE_KINDS:
            raise JobFailedError(result["kind"], result["reason"])
    for result in ordered:
        if result["status"] == "error":
            raise RuntimeError(f"training process rank {result['rank']} failed: {result['reason']}")
    if ordered and all(r["status"] == "stopped" for r in ordered):
        raise JobStoppedError(ordered[0]["reason"])
    raise RuntimeError(
        f"the {processes} training processes exited with status {returncode} and reported "
        f"{[r['status'] for r in ordered] or 'nothing'}; see the worker's log"
    )


def _write_result(scratch: Path, rank: int, body: dict[str, Any]) -> None:
    path = scratch / f"result-{rank}.json"
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({"rank": rank, **body}))
    os.replace(temporary, path)


def _task(task_class: str) -> Any:
    module_name, _, name = task_class.partition(":")
    cls = importlib.import_module(module_name)
    for part in name.split("."):
        cls = getattr(cls, part)
    return cls()  # type: ignore[operator]


def main(argv: list[str] | None = None) -> int:
    """One training process (torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``)."""
    import torch
    import torch.distributed as dist

    from services.cloud import database
    from services.trainer import checkpoint, loop
    from services.trainer.device import choose_device, leave
    from services.trainer.job import parse_job
    from services.trainer.storage import storage_for

    parser = argparse.ArgumentParser(prog="python -m services.trainer.distributed_job")
    parser.add_argument("job_file", type=Path)
    parser.add_argument("--task-class", required=True, help="MODULE:CLASS of the task")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    scratch: Path = args.job_file.parent
    rank = int(os.environ.get("RANK", "0"))
    told = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: told.set())
    device = None
    conn = None
    try:
        job = parse_job(args.job_file.read_text())
        task = _task(args.task_class)
        device = choose_device(job.device)
        if device.is_main and job.register_name:
            conn = database.connect()
        checked = device

        def should_stop() -> bool:
            mine = told.is_set() or (scratch / STOP_FILE).exists()
            flag = torch.tensor([1 if mine else 0], dtype=torch.int32, device=checked.torch_device)
            if checked.distributed:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())

        result = loop.run(
            task,
            job,
            device,
            storage_for(job.output),
            conn=conn,
            workdir=args.workdir,
            should_stop=should_stop,
        )
    except loop.TrainingStoppedError as stopped:
        _write_result(scratch, rank, {"status": "stopped", "reason": str(stopped)})
        return 0
    except Exception as error:
        kind = (
            "user"
            if isinstance(error, UserError)
            else "export"
            if isinstance(error, loop.ExportMismatchError)
            else "checkpoint"
            if isinstance(error, checkpoint.CheckpointError)
            else None
        )
        if kind is None:
            log.exception("training process rank %d failed", rank)
            body = {"status": "error", "reason": f"{type(error).__name__}: {error}"}
        else:
            body = {"status": "failed", "kind": kind, "reason": str(error)}
        _write_result(scratch, rank, body)
        return 1
    finally:
        if conn is not None:
            conn.close()
        if device is not None:
            leave(device)
    _write_result(
        scratch,
        rank,
        {
            "status": "success",
            "steps": result.steps,
            "model_uri": result.model_uri,
            "registered": result.registered.ref if result.registered is not None else None,
            "finished_at": time.time(),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
