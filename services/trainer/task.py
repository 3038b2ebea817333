"""What a training task is: the contract between the training loop and each task.

The loop (``services.trainer.loop``) owns devices, epochs, checkpoints, resumption, metrics and export
checks; a task owns its networks, data, loss and ONNX export. A task is deterministic given its seed:
``batches(epoch=e)`` yields the same batches whenever it is asked for epoch ``e``, so a job restarted from
the checkpoint written after epoch ``e - 1`` follows the same loss trajectory as one that never stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn


@dataclass
class TrainState:
    """Everything a checkpoint holds: networks, optimisers, grad scalers, progress and task extras.

    ``epoch`` counts completed epochs and ``step`` completed optimiser steps; ``extra`` holds tensors or plain
    values a task must keep across a restart (e.g. the DCGAN's fixed noise for its sample grids).
    """

    models: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    scalers: dict[str, torch.amp.GradScaler] = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportCheck:
    """An exported ONNX file and what torch computed on ``inputs``, for ONNX Runtime to reproduce."""

    path: Path
    inputs: dict[str, Any]  # ONNX input name -> numpy array
    expected: dict[str, Any]  # ONNX output name -> numpy array from torch
    atol: float = 1e-4
    #: A difference the task measured itself, where an output-by-output comparison cannot judge (a
    #: detector's top-K may pick either of two exactly tied peaks); with no ``expected`` it is the result.
    measured: float | None = None


class Task(Protocol):
    """One kind of model the trainer can train (detector, dcgan, classifier, sky-position)."""

    #: The name jobs use: ``{"task": "dcgan", ...}``.
    name: ClassVar[str]

    def params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The task's hyper-parameters: defaults merged with ``given``; a bad value raises UserError."""
        ...

    def load(self, dataset: Path, params: Mapping[str, Any]) -> Any:
        """Open the dataset under ``dataset`` (a local directory; the loop fetches S3 prefixes there first).

        A missing or empty dataset raises UserError saying what was expected (layout, file types).
        """
        ...

    def build(self, params: Mapping[str, Any], device: torch.device) -> TrainState:
        """Networks and optimisers, initialised from ``params["seed"]``, on ``device``."""
        ...

    def batches(
        self, data: Any, params: Mapping[str, Any], epoch: int, device: torch.device
    ) -> Iterator[Any]:
        """The batches of one epoch, in the same order whenever asked for the same epoch and seed."""
        ...

    def train_step(self, state: TrainState, batch: Any) -> dict[str, float]:
        """One optimiser step (or one step of each optimiser); returns the losses to record."""
        ...

    def evaluate(self, state: TrainState, data: Any, params: Mapping[str, Any]) -> dict[str, float]:
        """Metrics of the current state (recorded in the registry with the model)."""
        ...

    def export(self, state: TrainState, directory: Path, params: Mapping[str, Any]) -> ExportCheck:
        """Write the ONNX model into ``directory`` and return what ONNX Runtime must reproduce."""
        ...

    def pictures(self, state: TrainState, directory: Path, params: Mapping[str, Any]) -> list[Path]:
        """PNGs worth looking at besides the loss curves (the DCGAN's sample grid); may be empty."""
        ...
