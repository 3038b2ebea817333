"""Checkpoints hold the full state, only rank 0 writes them, resumption repeats nothing, and a checkpoint
that is not a full one (the original's "slim" integer) is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_toy import ToyTask

from services.trainer import checkpoint
from services.trainer.checkpoint import CheckpointError, Progress
from services.trainer.device import Device
from services.trainer.job import TrainingJob, parse_job
from services.trainer.loop import RunResult, run
from services.trainer.storage import LocalStorage

CPU = Device("cpu", torch.device("cpu"))


class CrashError(RuntimeError):
    pass


def _job(out: Path, **extra: object) -> TrainingJob:
    body = {"task": "toy", "dataset": "synthetic", "output": str(out), "job_id": "toy-1", **extra}
    return parse_job(body)


def _crash_at(step: int):  # type: ignore[no-untyped-def]
    def on_step(done: int, losses: object) -> None:
        if done == step:
            raise CrashError(f"simulated crash after step {done}")

    return on_step


def _crash_and_resume(tmp_path: Path, crash_after: int, **extra: object) -> tuple[RunResult, RunResult]:
    """The job run straight through (in ``a``), and run again (in ``b``), crashing after step ``crash_after``
    and then resumed from its own checkpoints."""
    whole = run(ToyTask(), _job(tmp_path / "a", **extra), CPU, LocalStorage(tmp_path / "a"))
    out = tmp_path / "b"
    job = _job(out, **extra)
    with pytest.raises(CrashError):
        run(ToyTask(), job, CPU, LocalStorage(out), on_step=_crash_at(crash_after))
    return whole, run(ToyTask(), job, CPU, LocalStorage(out))


def test_checkpoint_holds_models_optimisers_progress_extras_and_rng(tmp_path: Path) -> None:
    task = ToyTask()
    params = task.params({})
    state = task.build(params, CPU.torch_device)
    data = task.load(Path("synthetic"), params)
    for batch in task.batches(data, params, 0, CPU.torch_device):
        state.step += 1
        task.train_step(state, batch)
    storage = LocalStorage(tmp_path / "out")
    uri = checkpoint.save_checkpoint(
        state, Progress(epoch=1, step=4, epoch_step=0), storage, CPU, tmp_path / "w"
    )
    assert uri is not None and Path(uri).is_file()
    saved = torch.load(uri, weights_only=True)  # plain tensors and values only: no pickled code
    assert set(checkpoint.KEYS) <= set(saved)
    assert saved["format"] == checkpoint.FORMAT
    assert (saved["epoch"], saved["step"], saved["epoch_step"]) == (1, 4, 0)
    assert torch.equal(saved["models"]["net"]["0.weight"], state.models["net"].state_dict()["0.weight"])
    momentum = saved["optimizers"]["net"]["state"][0]["momentum_buffer"]
    assert momentum.abs().sum() > 0
    assert torch.equal(saved["extra"]["noise"], torch.zeros(3))
    assert set(saved["rng"]) >= {"python", "numpy", "torch"}
    pointer = json.loads((tmp_path / "out" / checkpoint.LATEST).read_text())
    assert pointer == {"checkpoint": "checkpoints/step-000000004.pt", "epoch": 1, "step": 4}


def test_rng_states_round_trip() -> None:
    import random

    import numpy as np

    states = checkpoint.rng_states()
    first = (random.random(), np.random.random(), torch.rand(1).item())
    checkpoint.set_rng_states(states)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == first


def test_only_rank_zero_writes(tmp_path: Path) -> None:
    task = ToyTask()
    state = task.build(task.params({}), CPU.torch_device)
    storage = LocalStorage(tmp_path / "out")
    rank1 = Device("cpu", torch.device("cpu"), rank=1, world_size=2)
    assert checkpoint.save_checkpoint(state, Progress(step=1), storage, rank1, tmp_path / "w") is None
    assert not (tmp_path / "out").exists()
    assert not rank1.is_main and CPU.is_main


def test_a_slim_checkpoint_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    torch.save(7, out / "checkpoints" / "step-000000007.pt")  # what the original wrote: an integer
    (out / checkpoint.LATEST).write_text(json.dumps({"checkpoint": "checkpoints/step-000000007.pt"}))
    with pytest.raises(CheckpointError, match="not a full tessera checkpoint"):
        run(ToyTask(), _job(out, steps=3), CPU, LocalStorage(out), workdir=tmp_path / "w")
    task = ToyTask()
    state = task.build(task.params({}), CPU.torch_device)
    with pytest.raises(CheckpointError):
        checkpoint.check_checkpoint(state.models["net"].state_dict(), "a bare state dict")


def test_resume_mid_epoch_follows_the_uninterrupted_trajectory(tmp_path: Path) -> None:
    whole, resumed = _crash_and_resume(tmp_path, 8, steps=10, checkpoint_every=3)
    assert resumed.resumed_from_step == 6  # the last checkpoint before the crash
    assert [h["step"] for h in resumed.history] == list(range(1, 11))
    assert resumed.history == whole.history  # same losses, bit for bit, on CPU
    assert (resumed.steps, resumed.epochs) == (10, 2)  # 4 batches per epoch: epochs 0 and 1 done, 2 half


def test_resume_after_an_epoch_never_repeats_it(tmp_path: Path) -> None:
    whole, resumed = _crash_and_resume(tmp_path, 6, epochs=3, checkpoint_every=4)
    assert resumed.resumed_from_step == 4
    assert [int(h["epoch"]) for h in resumed.history] == [0] * 4 + [1] * 4 + [2] * 4
    assert resumed.history == whole.history
    assert resumed.epochs == 3
