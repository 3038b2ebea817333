"""What the training progress bar says: epochs counted from 1 out of the job's, the whole run's steps once
an epoch's batches are known (never "5/?" to the end), and the last loss, not 0.0000, when a finished job is
run again."""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch
from rich.console import Console
from trainer_toy import ToyTask

from services.trainer.device import Device
from services.trainer.job import parse_job
from services.trainer.loop import run
from services.trainer.storage import LocalStorage

CPU = Device("cpu", torch.device("cpu"))


def _train(out: Path, **length: int) -> str:
    text = io.StringIO()
    console = Console(file=text, width=200, force_terminal=False, color_system=None)
    job = parse_job(
        {"task": "toy", "dataset": "synthetic", "output": str(out), "job_id": "toy-bar", **length}
    )
    run(ToyTask(), job, CPU, LocalStorage(out), console=console)
    return text.getvalue()


def test_an_epochs_job_shows_its_total_and_ends_at_its_last_epoch(tmp_path: Path) -> None:
    shown = _train(tmp_path / "a", epochs=3)
    bars = re.findall(r"(\d+)/(\d+|\?) epoch (\d+)/3\s+loss (\S+)", shown)
    assert bars, shown
    done, total, epoch, loss = bars[-1]
    assert total != "?" and done == total and epoch == "3"
    assert float(loss) > 0


def test_a_finished_job_run_again_shows_its_last_loss(tmp_path: Path) -> None:
    first = _train(tmp_path / "b", steps=4)
    again = _train(tmp_path / "b", steps=4)
    last = re.findall(r"loss (\S+)", first)[-1]
    assert re.findall(r"loss (\S+)", again)[-1] == last != "0.0000"
