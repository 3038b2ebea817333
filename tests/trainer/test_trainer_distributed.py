"""A queued job on a machine with several devices trains in one process per device (here: 2 CPU processes
over gloo, ``TESSERA_TRAINER_PROCS=2``): a stop request reaches them and rank 0 checkpoints, the next delivery
resumes and finishes, rank 0 alone registers and writes, and the result matches one process training on the
same data; a bad job's reason comes back from the processes unchanged."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_toy import ToyTask

from services.cloud import database
from services.cloud.queue import Message
from services.registry.models import list_versions
from services.trainer import distributed_job, handler, idle, loop
from services.trainer import tasks as task_table
from services.trainer.device import Device
from services.trainer.job import parse_job
from services.trainer.storage import LocalStorage


def _message(body: dict[str, Any]) -> Message:
    return Message("queue", "m-1", "receipt", json.dumps(body), receive_count=1, sent_at=time.time())


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    saved = torch.load(out / "checkpoints" / f"step-{step:09d}.pt", weights_only=True)
    return dict(saved["models"]["net"])


def test_process_count_follows_the_setting() -> None:
    assert distributed_job.process_count("cpu", env={}) == 1
    assert distributed_job.process_count("cpu", env={distributed_job.PROCS_ENV: "3"}) == 3
    with pytest.raises(ValueError, match="TESSERA_TRAINER_PROCS"):
        distributed_job.process_count("cpu", env={distributed_job.PROCS_ENV: "two"})


def test_a_job_trains_over_two_processes_like_one_process_on_the_same_data(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One process, batches of 16; two processes, batches of 8, each taking every other one: the same rows
    # per step, and averaged gradients of a mean loss make the steps the same (no dropout to draw apart).
    steps = 4
    single_out = tmp_path / "single"
    loop.run(
        ToyTask(),
        parse_job(
            {
                "task": "toy",
                "dataset": "synthetic",
                "output": str(single_out),
                "steps": steps,
                "params": {"batch_size": 16, "batches": 2, "dropout": 0.0},
            }
        ),
        Device("cpu", torch.device("cpu")),
        LocalStorage(single_out),
    )

    monkeypatch.setitem(task_table.TASKS, "toy", "trainer_toy")
    monkeypatch.setenv(distributed_job.PROCS_ENV, "2")
    out = tmp_path / "two"
    job = {
        "job_id": "toy-two",
        "task": "toy",
        "dataset": "synthetic",
        "output": str(out),
        "steps": steps,
        "checkpoint_every": 100,
        "params": {"batch_size": 8, "batches": 4, "dropout": 0.0},
        "register": {"name": "toy-model"},
        "device": "cpu",
    }
    conn = database.connect(database_url)
    database.apply_migrations(conn)
    state_file = tmp_path / "trainer-state.json"
    stop = [True]
    ctx = handler.Context(
        conn=conn,
        worker="test",
        state=handler.TrainerStateFile(state_file),
        should_stop=lambda: stop[0],
        database_url=database_url,
    )
    try:
        # Asked to stop (as SIGTERM does): both processes stop after the first step, rank 0 checkpoints.
        stopped = handler.handle_job(ctx, _message(job))
        assert (stopped.status, stopped.release, stopped.delete) == ("QUEUED", True, False)
        assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 1
        assert handler.get_job(conn, "toy-two").status == "QUEUED"  # type: ignore[union-attr]
        # Delivered again: resumes and finishes.
        stop[0] = False
        done = handler.handle_job(ctx, _message(job))
        assert done.status == "SUCCESS" and done.delete, done.note
        record = handler.get_job(conn, "toy-two")
        assert record is not None and (record.status, record.registered) == ("SUCCESS", "toy-model:1")
        assert record.model_uri == str(out / "model.onnx")
        assert [m.version for m in list_versions(conn, "toy-model")] == [1]

        # A bad job: the processes' UserError is the job's reason, word for word.
        bad = {**job, "job_id": "toy-bad", "output": str(tmp_path / "bad"), "params": {"lr": -1.0}}
        failed = handler.handle_job(ctx, _message(bad))
        assert failed.status == "FAILED" and failed.delete
        reason = handler.get_job(conn, "toy-bad").reason  # type: ignore[union-attr]
        assert reason == "$.params.lr: must be a positive number, got -1.0"
    finally:
        conn.close()

    # One checkpoint set (the stop's and the end's), one model, and the state file says not busy.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest.json",
        "step-000000001.pt",
        f"step-{steps:09d}.pt",
    ]
    state = idle.read_trainer_state(state_file)
    assert state is not None and not state.busy
    two, one = _weights(out, steps), _weights(single_out, steps)
    assert two.keys() == one.keys()
    for name in one:
        assert torch.allclose(two[name], one[name], atol=1e-6), name
    two_metrics = json.loads((out / "metrics.json").read_text())
    one_metrics = json.loads((single_out / "metrics.json").read_text())
    assert two_metrics["steps"] == steps
    assert two_metrics["mse"] == pytest.approx(one_metrics["mse"], rel=1e-5)
