"""The training loop: one job from its dataset to a registered, verified ONNX model.

``run(task, job, device, storage)``: merge the task's hyper-parameters, fetch the dataset (an S3 prefix is
copied into a local cache), build the networks, resume from the job's latest checkpoint if there is one,
train (epochs or steps, a rich progress bar, images/s), checkpoint every ``checkpoint_every`` steps and at
the end, evaluate, export ONNX and check ONNX Runtime reproduces torch (the job fails otherwise), then store
the model, loss curves (PNG), the task's pictures, TensorBoard logs and metrics (JSON) beside the
checkpoints and register the model. Only rank 0 writes; every rank trains its share of each epoch.
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.errors import UserError
from services.registry import RegisteredModel, register
from services.trainer import checkpoint as checkpoints
from services.trainer.checkpoint import Progress as TrainingProgress
from services.trainer.curves import draw_curves
from services.trainer.device import (
    Device,
    barrier,
    broadcast_models,
    hook_gradient_averaging,
    shard,
)
from services.trainer.job import TrainingJob
from services.trainer.metrics import TrainingMetrics
from services.trainer.storage import Storage, fetch_dataset
from services.trainer.task import ExportCheck, Task, TrainState

log = logging.getLogger(__name__)

MODEL_NAME = "model.onnx"
CURVES_NAME = "loss.png"
METRICS_NAME = "metrics.json"
JOB_NAME = "job.json"


class TrainingStoppedError(RuntimeError):
    """Training stopped on request (the instance is stopping) after writing a checkpoint; run the job again
    to resume."""


class ExportMismatchError(RuntimeError):
    """ONNX Runtime does not reproduce torch on the exported model: the model is not stored or registered."""


@dataclass
class RunResult:
    """What a job produced (``model_uri`` and ``artifacts`` only on rank 0)."""

    job_id: str
    steps: int
    epochs: int
    history: list[dict[str, float]]
    metrics: dict[str, Any]
    model_uri: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    registered: RegisteredModel | None = None
    resumed_from_step: int | None = None


@dataclass
class TrainingRun:
    """One job under way, as :func:`run` sets it up: what training it and finishing it share."""

    task: Task
    job: TrainingJob
    device: Device
    storage: Storage
    state: TrainState
    #: What ``task.load`` made of the dataset.
    data: Any
    #: The task's hyper-parameters, merged with the job's (and those the data decided).
    params: Mapping[str, Any]
    #: Where training stands; updated in place as it goes.
    progress: TrainingProgress
    workdir: Path
    console: Console


def verify_export(check: ExportCheck) -> float:
    """Run the exported model with ONNX Runtime on ``check.inputs``; the largest difference from torch.

    Raises ExportMismatchError when an output is missing, has another shape, or differs by more than ``atol``.
    """
    import onnxruntime as ort

    if not check.expected and check.measured is not None:
        return check.measured
    session = ort.InferenceSession(str(check.path), providers=["CPUExecutionProvider"])
    names = list(check.expected)
    outputs = session.run(names, {k: np.asarray(v) for k, v in check.inputs.items()})
    worst = 0.0
    for name, output in zip(names, outputs, strict=True):
        got, want = np.asarray(output), np.asarray(check.expected[name])
        if got.shape != want.shape:
            raise ExportMismatchError(
                f"ONNX output {name} has shape {got.shape}, torch computed {want.shape}; the export is wrong"
            )
        if got.size:
            difference = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            if not difference <= check.atol:
                raise ExportMismatchError(
                    f"ONNX Runtime disagrees with torch on output {name} by {difference:.3g} "
                    f"(tolerance {check.atol:g}); the model was not stored"
                )
            worst = max(worst, difference)
    return worst


def batch_images(batch: Any) -> int:
    """How many images a batch holds: the first dimension of its first array (0 if none is found)."""
    if isinstance(batch, torch.Tensor | np.ndarray):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            count = batch_images(item)
            if count:
                return count
    return 0


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (a resumed job restores them instead)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(
    task: Task,
    job: TrainingJob,
    device: Device,
    storage: Storage,
    *,
    conn: psycopg.Connection[Any] | None = None,
    workdir: Path | None = None,
    console: Console | None = None,
    metrics: TrainingMetrics | None = None,
    metrics_every: int = 10,
    on_step: Callable[[int, Mapping[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    s3_client: Any = None,
) -> RunResult:
    """Train ``job`` with ``task`` on ``device``, writing to ``storage``; see the module docstring.

    ``on_step(step, losses)`` runs after each step (and its checkpoint, if one was due); ``should_stop()``
    is asked after each step: when true, a checkpoint is written and :class:`TrainingStoppedError` raised.
    Errors a user can cause (bad hyper-parameters, a missing or empty dataset) raise UserError before any
    training.
    """
    if job.register_name and conn is None and device.is_main:
        raise UserError(
            f"registering the model as {job.register_name!r} needs the database: set TESSERA_DB_URL"
        )
    console = console or Console(stderr=True, quiet=not device.is_main)
    metrics = metrics or TrainingMetrics(task.name, enabled=device.is_main)
    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"tessera-train-{job.job_id}-"))
    workdir.mkdir(parents=True, exist_ok=True)

    params = task.params(job.params)
    local = fetch_dataset(job.dataset, cache=None, client=s3_client)
    data = task.load(local, params)
    # A parameter the data decides (the classes a folder holds) is recorded as decided, not as its default.
    decided = getattr(data, "class_names", None) or getattr(data, "classes", None)
    if "classes" in params and not params["classes"] and decided:
        params = {**params, "classes": list(decided)}
    seed_everything(int(params.get("seed", 0)))
    state = task.build(params, device.torch_device)
    progress = TrainingProgress()
    resumed_from: int | None = None
    saved = checkpoints.load_latest(storage, workdir / "checkpoints", device)
    if saved is not None:
        progress = checkpoints.restore(state, saved, storage.uri(checkpoints.LATEST))
        resumed_from = progress.step
        console.print(
            f"resuming {job.job_id} from step {progress.step} (epoch {progress.epoch}, "
            f"{progress.epoch_step} batches into it)"
        )
    broadcast_models(state.models.values(), device)
    hooks = hook_gradient_averaging(state.optimizers.values(), device)
    if device.is_main:
        storage.put_bytes(json.dumps(job.to_json(), indent=2).encode(), JOB_NAME)
    writer = _summary_writer(workdir / "tensorboard") if device.is_main else None
    last_saved = progress.step if saved is not None else -1
    training = TrainingRun(
        task=task,
        job=job,
        device=device,
        storage=storage,
        state=state,
        data=data,
        params=params,
        progress=progress,
        workdir=workdir,
        console=console,
    )
    try:
        _train(
            training,
            metrics=metrics,
            metrics_every=metrics_every,
            writer=writer,
            on_step=on_step,
            should_stop=should_stop,
            last_saved=last_saved,
        )
    finally:
        for handle in hooks:
            handle.remove()
        if writer is not None:
            writer.close()

    result = RunResult(
        job_id=job.job_id,
        steps=progress.step,
        epochs=progress.epoch,
        history=progress.history,
        metrics={},
        resumed_from_step=resumed_from,
    )
    if device.is_main:
        _finish(training, result=result, conn=conn)
    barrier(device)
    return result


def _train(
    training: TrainingRun,
    *,
    metrics: TrainingMetrics,
    metrics_every: int,
    writer: Any,
    on_step: Callable[[int, Mapping[str, float]], None] | None,
    should_stop: Callable[[], bool] | None,
    last_saved: int,
) -> None:
    task, job, device, progress = training.task, training.job, training.device, training.progress
    state, data, params = training.state, training.data, training.params

    def done() -> bool:
        if job.steps is not None:
            return progress.step >= job.steps
        return progress.epoch >= (job.epochs or 0)

    def save() -> None:
        nonlocal last_saved
        if last_saved != progress.step:
            checkpoints.save_checkpoint(
                state, progress, training.storage, device, training.workdir / "checkpoints"
            )
            last_saved = progress.step

    columns = (
        TextColumn(f"[bold]{task.name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]}  {task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    images_since, since = 0, time.perf_counter()
    with Progress(*columns, console=training.console, transient=False, disable=not device.is_main) as bar:
        total = job.steps
        bar_task = bar.add_task(
            "train",
            total=total,
            completed=progress.step,
            epoch=_epoch_text(progress.epoch, job.epochs),
            loss=_loss_text(_main_loss(progress.history[-1]) if progress.history else None),
            rate="",
        )
        while not done():
            epoch = progress.epoch
            seen = 0
            finished_epoch = True
            for index, batch in enumerate(
                shard(task.batches(data, params, epoch, device.torch_device), device)
            ):
                seen += 1
                if index < progress.epoch_step:
                    continue  # done before the checkpoint this job resumed from
                if job.steps is not None and progress.step >= job.steps:
                    finished_epoch = False
                    break
                losses = {k: float(v) for k, v in task.train_step(state, batch).items()}
                progress.step += 1
                progress.epoch_step = index + 1
                state.step = progress.step
                progress.history.append({"step": float(progress.step), "epoch": float(epoch), **losses})
                images_since += batch_images(batch) * device.world_size
                main_loss = _main_loss(losses)
                if writer is not None:
                    for name, value in losses.items():
                        writer.add_scalar(f"loss/{name}", value, progress.step)
                if progress.step % metrics_every == 0:
                    elapsed = time.perf_counter() - since
                    rate = images_since / elapsed if elapsed > 0 else 0.0
                    metrics.record(
                        losses, images_per_second=rate, epoch=epoch, Step=progress.step, Job=job.job_id
                    )
                    if writer is not None:
                        writer.add_scalar("throughput/images_per_second", rate, progress.step)
                    bar.update(bar_task, rate=f"{rate:.1f} images/s")
                    images_since, since = 0, time.perf_counter()
                bar.update(
                    bar_task,
                    completed=progress.step,
                    epoch=_epoch_text(epoch, job.epochs),
                    loss=_loss_text(main_loss),
                )
                if progress.step % job.checkpoint_every == 0:
                    save()
                if on_step is not None:
                    on_step(progress.step, losses)
                if should_stop is not None and should_stop():
                    save()
                    raise TrainingStoppedError(
                        f"job {job.job_id} stopped at step {progress.step}; checkpoint written"
                    )
            if seen == 0:
                raise UserError(
                    f"the dataset {job.dataset} gives task {task.name} no batches for epoch {epoch}: it is "
                    "empty, or smaller than one batch"
                    + (f" per process ({device.world_size} processes)" if device.distributed else "")
                )
            if finished_epoch:
                progress.epoch += 1
                progress.epoch_step = 0
                state.epoch = progress.epoch
                if total is None and job.epochs:  # an epoch's batches now known: the whole run's steps
                    total = job.epochs * seen
                    bar.update(bar_task, total=total)
        save()


def _finish(training: TrainingRun, *, result: RunResult, conn: psycopg.Connection[Any] | None) -> None:
    """Evaluate, export and verify, store everything, register (rank 0)."""
    task, job, storage, progress = training.task, training.job, training.storage, training.progress
    state, params, workdir, console = training.state, training.params, training.workdir, training.console
    for model in state.models.values():
        model.eval()
    with torch.no_grad():
        evaluated = {k: float(v) for k, v in task.evaluate(state, training.data, params).items()}
    export_dir = workdir / "export"
    export_dir.mkdir(parents=True, exist_ok=True)
    check = task.export(state, export_dir, params)
    difference = verify_export(check)
    last = progress.history[-20:]
    final_losses = {
        k: float(np.mean([h[k] for h in last]))
        for k in (last[0] if last else {})
        if k not in ("step", "epoch")
    }
    summary: dict[str, Any] = {
        **evaluated,
        "final_loss": final_losses,
        "steps": progress.step,
        "epochs": progress.epoch,
        "onnx_max_abs_diff": difference,
        "params": _jsonable(params),
    }
    artifacts = {"model": storage.put_file(check.path, MODEL_NAME)}
    curves = draw_curves(progress.history, workdir / CURVES_NAME, title=f"{task.name} training loss")
    artifacts["curves"] = storage.put_file(curves, CURVES_NAME)
    pictures_dir = workdir / "pictures"
    pictures_dir.mkdir(exist_ok=True)
    for picture in task.pictures(state, pictures_dir, params):
        artifacts[f"picture:{picture.name}"] = storage.put_file(picture, f"pictures/{picture.name}")
    tensorboard = workdir / "tensorboard"
    if tensorboard.is_dir():
        for event_file in sorted(p for p in tensorboard.rglob("*") if p.is_file()):
            name = f"tensorboard/{event_file.relative_to(tensorboard).as_posix()}"
            artifacts[f"tensorboard:{event_file.name}"] = storage.put_file(event_file, name)
    summary["artifacts"] = artifacts
    artifacts["metrics"] = storage.put_bytes(json.dumps(summary, indent=2).encode() + b"\n", METRICS_NAME)
    result.metrics = summary
    result.model_uri = artifacts["model"]
    result.artifacts = artifacts
    if job.register_name and conn is not None:
        result.registered = register(
            conn,
            job.register_name,
            task=task.name,
            uri=artifacts["model"],
            metrics={k: v for k, v in summary.items() if k not in ("artifacts",)},
            job_id=job.job_id,
        )
        console.print(f"registered {result.registered.ref} -> {result.model_uri}")
    console.print(f"job {job.job_id}: {progress.step} steps, model {result.model_uri}")


def _epoch_text(epoch: int, epochs: int | None) -> str:
    """The epoch under way, counted from 1, out of ``epochs`` when the job gives them."""
    shown = min(epoch + 1, epochs) if epochs else epoch + 1
    return f"{shown}/{epochs}" if epochs else str(shown)


def _main_loss(losses: Mapping[str, float]) -> float | None:
    """``loss``, else the first loss a task reports (a history entry's step and epoch are not losses)."""
    if "loss" in losses:
        return losses["loss"]
    return next((v for k, v in losses.items() if k not in ("step", "epoch")), None)


def _loss_text(loss: float | None) -> str:
    """The loss to 4 places; a dash before the first step (a finished job resumed runs none)."""
    return "-" if loss is None or not math.isfinite(loss) else f"{loss:.4f}"


def _summary_writer(directory: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time; the PNG and EMF still tell the story
        log.warning("tensorboard is not installed; no TensorBoard logs for this job")
        return None
    return SummaryWriter(log_dir=str(directory))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
