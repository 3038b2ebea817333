"""The smallest loop the Task protocol allows, on the CPU, and a checkpoint's round trip: how the task tests
(classifier, dcgan, sky-position) drive a task without the trainer's loop, storage or jobs."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from services.trainer.task import Task, TrainState

CPU = torch.device("cpu")

TaskT = TypeVar("TaskT", bound=Task)
Step = TypeVar("Step")


def train(
    task: Task,
    state: TrainState,
    data: Any,
    params: Mapping[str, Any],
    epochs: range,
    *,
    batch_shape: tuple[int, ...] | None = None,
) -> list[dict[str, float]]:
    """Every batch of every epoch, one step each; returns what every step reported.

    ``batch_shape``: where given, each batch must be a tuple whose first tensor (the images) has this shape
    past its batch dimension.
    """
    steps = []
    for epoch in epochs:
        for batch in task.batches(data, params, epoch, CPU):
            if batch_shape is not None:
                assert isinstance(batch, tuple) and batch[0].shape[1:] == batch_shape
            steps.append(task.train_step(state, batch))
        state.epoch = epoch + 1
    return steps


def round_trip(state: TrainState) -> dict[str, Any]:
    """What a checkpoint would hold (every network, optimiser and extra), through torch.save/torch.load."""
    buffer = io.BytesIO()
    torch.save(
        {
            "models": {k: m.state_dict() for k, m in state.models.items()},
            "optimizers": {k: o.state_dict() for k, o in state.optimizers.items()},
            "extra": state.extra,
        },
        buffer,
    )
    buffer.seek(0)
    return torch.load(buffer)


def restore(state: TrainState, saved: dict[str, Any]) -> None:
    """Load what :func:`round_trip` returned into a freshly built state."""
    for key, model in state.models.items():
        model.load_state_dict(saved["models"][key])
    for key, optimizer in state.optimizers.items():
        optimizer.load_state_dict(saved["optimizers"][key])
    state.extra = saved["extra"]


def resumed_and_straight(
    train: Callable[[TaskT, TrainState, Any, Mapping[str, Any], range], list[Step]],
    task: TaskT,
    data: Any,
    params: Mapping[str, Any],
    *,
    stop: int,
    end: int,
) -> tuple[list[Step], list[Step]]:
    """The steps of ``end`` epochs interrupted after epoch ``stop`` and resumed from a checkpoint in a state
    built afresh, and the steps of the same epochs trained straight through (built first, as a job would)."""
    straight = train(task, task.build(params, CPU), data, params, range(end))
    interrupted = task.build(params, CPU)
    before = train(task, interrupted, data, params, range(stop))
    saved = round_trip(interrupted)
    resumed = task.build(params, CPU)
    restore(resumed, saved)
    return before + train(task, resumed, data, params, range(stop, end)), straight
