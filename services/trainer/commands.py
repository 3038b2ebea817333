"""The trainer's commands: ``tessera train TASK ...`` (train here), ``tessera train submit TASK ...`` (queue
a job and start the training instance) and the trainer's ``tessera worker trainer``.

:func:`register` adds ``train`` to the ``tessera`` parser; :func:`add_worker_options` and :func:`run_worker`
are the trainer's half of ``tessera worker``. Handlers return an exit status and turn a UserError into one
line on stderr and status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.errors import UserError
from services.jobs.commands import (
    add_queue_worker_options,
    log_to_stderr,
    serve_until_stopped,
    service_main,
    user_errors,
    worker_overrides,
)

#: The tasks ``tessera train`` offers (the table in services.trainer.tasks, without importing torch).
TASK_NAMES = ("classifier", "dcgan", "detector", "sky-position")


def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``NAME=VALUE`` items -> a dict; each VALUE is parsed as JSON when it is JSON, else kept as text."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--param {item!r}: write it as NAME=VALUE (VALUE is JSON or text)")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


#: ``--size tiny``: parameters that train each task in seconds on a CPU (to try it; the models are toys).
#: ``--size full`` keeps the task's own defaults, for real runs. Explicit ``--param`` values win over both.
TINY_PARAMS: dict[str, dict[str, Any]] = {
    "detector": {"batch_size": 2, "crop": 64, "width": 8, "tile": 64, "eval_scenes": 1, "steps_per_epoch": 5},
    "dcgan": {
        "batch_size": 16,
        "nz": 32,
        "ngf": 16,
        "ndf": 16,
        "samples": 16,
        "eval_images": 32,
        "synthetic_images": 64,
        "mixed_precision": False,
    },
    "classifier": {
        "input_size": 64,
        "width": 0.125,
        "head_width": 32,
        "batch_size": 8,
        "synthetic_per_class": 4,
        "synthetic_side": 256,
    },
    "sky-position": {"image_size": 64, "width": 4, "hidden": 32, "batch_size": 8},
}
#: Frames ``--dataset synthetic`` renders for sky-position (Stellarium), by ``--size``.
SKY_FRAMES = {"tiny": 24, "full": 400}


def job_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """A training job (JSON object, not yet validated) from ``train``'s options."""
    preset = TINY_PARAMS.get(args.task, {}) if getattr(args, "size", "full") == "tiny" else {}
    job: dict[str, Any] = {
        "schema": "tessera.training-job/v1",
        "task": args.task,
        "dataset": args.dataset,
        "output": args.out,
        "params": {**preset, **parse_params(args.param)},
    }
    if args.job_id:
        job["job_id"] = args.job_id
    if args.steps is not None:
        job["steps"] = args.steps
    if args.epochs is not None:
        job["epochs"] = args.epochs
    if args.checkpoint_every is not None:
        job["checkpoint_every"] = args.checkpoint_every
    if args.register:
        job["register"] = {"name": args.register}
    if args.device:
        job["device"] = args.device
    return job


def _add_job_options(parser: argparse.ArgumentParser, *, out_help: str, size: str) -> None:
    parser.add_argument(
        "--dataset", required=True, help="s3://bucket/prefix, a directory, or 'synthetic' (generated data)"
    )
    parser.add_argument(
        "--size",
        choices=["tiny", "full"],
        default=size,
        help="tiny: parameters that train in seconds on a CPU, to try the task; full: the task's own "
        f"defaults, for real runs (default: {size}; --param values win over both)",
    )
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument(
        "--param", action="append", metavar="NAME=VALUE", help="a hyper-parameter (VALUE is JSON or text)"
    )
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="optimiser steps to train")
    length.add_argument("--epochs", type=int, help="epochs to train")
    parser.add_argument("--checkpoint-every", type=int, metavar="N", help="checkpoint every N steps")
    parser.add_argument("--register", metavar="NAME", help="register the model under this name")
    parser.add_argument(
        "--job-id", help="the job id (default: a new one; the same id resumes its checkpoint)"
    )
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda", "hpu"], help="where to train (default auto)"
    )


def _train(args: argparse.Namespace) -> int:
    from services.cloud import database
    from services.jobs.emf import EMF_FILE_ENV
    from services.trainer.device import choose_device, leave
    from services.trainer.job import parse_job
    from services.trainer.loop import run
    from services.trainer.metrics import TrainingMetrics
    from services.trainer.storage import storage_for
    from services.trainer.tasks import make_task

    body = job_from_args(args)
    if body["task"] == "sky-position" and body["dataset"] == "synthetic":
        body["dataset"] = str(render_skies(Path(args.out) / "synthetic-skies", SKY_FRAMES[args.size]))
    job = parse_job(body)
    task = make_task(job.task)
    device = choose_device(job.device)
    with contextlib.ExitStack() as stack:
        conn = None
        if database.configured():
            conn = stack.enter_context(database.connect())
            database.apply_migrations(conn)
        elif job.register_name:
            from services.cloud.embedded import local_database, local_home

            # No database configured: the machine's own registry, so --register needs no AWS account.
            conn = stack.enter_context(database.connect(stack.enter_context(local_database())))
            print(
                f"registry: the local one (an embedded PostgreSQL in {local_home() / 'postgres'}; "
                "set TESSERA_DB_URL to register elsewhere)",
                file=sys.stderr,
            )
        stack.callback(leave, device)
        metrics = None
        if not job.output.startswith("s3://") and not os.environ.get(EMF_FILE_ENV):
            # A person reads this console: the metric lines go beside the model, not between progress lines.
            Path(job.output).mkdir(parents=True, exist_ok=True)
            emf = stack.enter_context((Path(job.output) / "metrics.emf.jsonl").open("a", encoding="utf-8"))
            metrics = TrainingMetrics(task.name, stream=emf, enabled=device.is_main)
        result = run(task, job, device, storage_for(job.output), conn=conn, metrics=metrics)
    if device.is_main:
        print(f"job        {result.job_id}")
        print(f"steps      {result.steps} ({result.epochs} epochs complete)")
        if result.resumed_from_step is not None:
            print(f"resumed    from step {result.resumed_from_step}")
        print(f"model      {result.model_uri}")
        for name, uri in result.artifacts.items():
            if name != "model":
                print(f"{name:<10} {uri}")
        if result.registered is not None:
            print(f"registered {result.registered.ref}")
    return 0


def render_skies(directory: Path, frames: int) -> Path:
    """A sky-position dataset rendered by the sky generator (``tessera sky render``, a process of its own:
    real Stellarium frames of one night over the Gulf of Maine, with their manifest) into ``directory``;
    kept, and reused when it is already complete."""
    import subprocess

    import yaml

    if directory.is_dir() and (directory / "manifest.jsonl").is_file():
        print(f"synthetic dataset: reusing {directory}", file=sys.stderr)
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    job = {
        "schema": "tessera.sky-job/v1",
        "job_id": "synthetic-skies",
        "count": frames,
        "seed": 7,
        "latitude": [41.0, 45.0],
        "longitude": [-71.0, -66.0],
        "time": ["2024-01-15T01:00:00Z", "2024-01-15T09:00:00Z"],
        "camera": {
            "altitude": 60,
            "azimuth": 180,
            "fov": 60,
            "projection": "perspective",
            "size": [256, 256],
        },
        "atmosphere": False,
        "frames_per_shard": frames,
        "output": str(directory),
    }
    job_file = directory.parent / "synthetic-skies.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))
    print(
        f"synthetic dataset: rendering {frames} sky frames with Stellarium into {directory}", file=sys.stderr
    )
    command = [sys.executable, "-m", "services.cli", "sky", "render", str(job_file), "--out", str(directory)]
    if subprocess.run(command, check=False).returncode != 0:
        raise UserError(
            "rendering the synthetic sky dataset failed (see above); it needs Stellarium and xvfb-run "
            "(bash .ci/system-packages), or give --dataset a folder of sky frames with a manifest"
        )
    return directory


def _submit(args: argparse.Namespace) -> int:
    import importlib

    from services.trainer.job import parse_job
    from services.trainer.worker import QUEUE_ENV

    body = job_from_args(args)
    if body["task"] == "sky-position" and body["dataset"] == "synthetic":
        raise UserError(
            "a queued sky-position job needs rendered frames: render them with `tessera sky submit JOB.yaml` "
            "and give --dataset the job's s3:// output (synthetic skies are for `tessera train` here)"
        )
    job = parse_job(body)
    queue_url = args.queue_url or os.environ.get(QUEUE_ENV)
    if not queue_url:
        raise UserError(f"no training queue: pass --queue-url or set {QUEUE_ENV}")
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    launch: Any = importlib.import_module("services.trainer.launch")
    result = launch.submit_job(
        job.to_json(),
        queue_url=queue_url,
        sqs=boto3.client("sqs", endpoint_url=endpoint),
        ec2=boto3.client("ec2", endpoint_url=endpoint),
        stack=args.stack,
        start_instance=not args.no_start,
    )
    print(result.job_id)
    print(result.describe(), file=sys.stderr)
    return 0


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``tessera worker trainer``."""
    add_queue_worker_options(parser, wait_s=5, records="the jobs it runs")
    parser.add_argument(
        "--state-file", help="the trainer state file the idle agent reads (default: $TESSERA_TRAINER_STATE)"
    )


def run_worker(args: argparse.Namespace) -> int:
    """Serve the training-jobs queue (``tessera worker trainer``); SIGTERM checkpoints the job in hand."""
    return user_errors("worker", _worker)(args)


def _worker(args: argparse.Namespace) -> int:
    from services.trainer.worker import Worker, WorkerSettings

    log_to_stderr()
    overrides = worker_overrides(args)
    if getattr(args, "state_file", None):
        overrides["state_path"] = args.state_file
    settings = WorkerSettings.from_env(**overrides)
    return serve_until_stopped(
        lambda: Worker(settings), on_signal="checkpointing the job in hand, then stopping"
    )


def parameter_table(name: str) -> str:
    """The ``--param`` names of task ``name`` with their defaults and what each accepts, for ``--help``
    (imports the task: torch)."""
    from services.trainer.tasks import make_task, task_class

    module = sys.modules[task_class(name).__module__]
    rules = getattr(module, "RULES", {})
    defaults = make_task(name).params({})
    width = max(len(key) for key in defaults) + 2
    lines = [f"{name} parameters (--param NAME=VALUE, VALUE as JSON or text; default, then what it takes):"]
    for key, value in defaults.items():
        rule = rules.get(key)
        takes = rule.accepts() if rule is not None else type(value).__name__
        lines.append(f"  {key.ljust(width)}{json.dumps(value, default=str):<14} {takes}")
    return "\n".join(lines)


class _TaskHelp(argparse.Action):
    """``tessera train TASK --help``: the usual help, then the task's parameters (its module is imported
    only now, so ``tessera --help`` stays quick)."""

    def __init__(self, option_strings: Sequence[str], dest: str, task: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)
        self.task = task

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None
    ) -> None:
        parser.epilog = parameter_table(self.task)
        parser.print_help()
        parser.exit()


def _models(args: argparse.Namespace) -> int:
    from services.cloud import database
    from services.cloud.embedded import local_database, local_home
    from services.registry import latest_of_each, list_versions

    with contextlib.ExitStack() as stack:
        if database.configured():
            where = "the registry at TESSERA_DB_URL" if os.environ.get("TESSERA_DB_URL") else "the platform's"
            url = None
        else:
            where = f"the local registry ({local_home() / 'postgres'})"
            url = stack.enter_context(local_database())
        conn = stack.enter_context(database.connect(url))
        rows = list_versions(conn, args.name) if args.name else latest_of_each(conn)
    if not rows:
        what = f"no model named {args.name!r}" if args.name else "no models"
        print(f"{where}: {what}; train one with `tessera train TASK ... --register NAME`")
        return 0
    print(f"{where}:" + ("" if args.name else " the newest version of each name"))
    for model in rows:
        print(f"  {model.ref:<28} {model.task:<14} {model.created:%Y-%m-%d %H:%M}  {model.uri}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``train`` (``train TASK ...`` and ``train submit TASK ...``) and ``models`` to the ``tessera``
    subparsers (``tessera worker trainer`` is :func:`add_worker_options` and :func:`run_worker`)."""
    models = subparsers.add_parser(
        "models", help="the registered models (TESSERA_DB_URL's registry, else this machine's own)"
    )
    models.add_argument(
        "name", nargs="?", help="list every version of this name (default: each name's newest)"
    )
    models.set_defaults(handler=user_errors("models", _models))
    train = subparsers.add_parser("train", help="train a model here, or submit a training job to the queue")
    kinds = train.add_subparsers(dest="train_command", required=True, metavar="TASK|submit")
    for name in TASK_NAMES:
        task = kinds.add_parser(
            name,
            help=f"train the {name} task in this process",
            add_help=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        task.add_argument(
            "-h", "--help", action=_TaskHelp, task=name, help="show this help, with the task's parameters"
        )
        task.set_defaults(task=name)
        _add_job_options(task, out_help="the job's output: a directory or s3://bucket/prefix", size="tiny")
        task.set_defaults(handler=user_errors("train", _train))
    submit = kinds.add_parser(
        "submit", help="queue a training job and start the training instance if stopped"
    )
    submit.add_argument("task", choices=TASK_NAMES, help="what to train")
    _add_job_options(
        submit, out_help="the job's output: s3://bucket/prefix (read by the training instance)", size="full"
    )
    submit.add_argument(
        "--queue-url", help="the training-jobs queue (default: $TESSERA_QUEUE_TRAINING_JOBS_URL)"
    )
    submit.add_argument(
        "--no-start", action="store_true", help="only queue the job; leave the instance alone"
    )
    submit.add_argument(
        "--stack", help="start only the training instance of this (compute) stack, by its tessera:stack tag"
    )
    submit.set_defaults(handler=user_errors("train submit", _submit))


def main(argv: Sequence[str] | None = None) -> int:
    """These commands on their own (``python -m services.trainer.commands ...``)."""
    return service_main(
        argv,
        register=register,
        service="trainer",
        worker_help="serve the training-jobs queue",
        add_worker_options=add_worker_options,
        run_worker=run_worker,
    )


if __name__ == "__main__":
    raise SystemExit(main())
