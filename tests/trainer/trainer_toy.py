"""A toy regression task (seconds on CPU) that exercises everything the loop keeps across a restart:
momentum in the optimiser, dropout drawing on torch's global RNG, and per-epoch seeded batches."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from services.errors import UserError
from services.trainer.task import ExportCheck, TrainState

DEFAULTS = {"seed": 0, "batches": 4, "batch_size": 8, "lr": 0.05, "broken_export": False, "dropout": 0.3}


class ToyTask:
    """y = W x + noise, learnt by a dropout MLP."""

    name: ClassVar[str] = "toy"

    def params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(given) - set(DEFAULTS))
        if unknown:
            raise UserError(f"$.params.{unknown[0]}: unknown hyper-parameter of the toy task")
        merged = {**DEFAULTS, **given}
        if not isinstance(merged["lr"], float) or merged["lr"] <= 0:
            raise UserError(f"$.params.lr: must be a positive number, got {merged['lr']!r}")
        return merged

    def load(self, dataset: Path, params: Mapping[str, Any]) -> Any:
        if str(dataset) != "synthetic":
            raise UserError(f"the toy task only knows the synthetic dataset, not {dataset}")
        return np.random.default_rng(1234).normal(size=(4, 3)).astype(np.float32)

    def build(self, params: Mapping[str, Any], device: torch.device) -> TrainState:
        torch.manual_seed(params["seed"])
        model = nn.Sequential(
            nn.Linear(4, 16), nn.ReLU(), nn.Dropout(params["dropout"]), nn.Linear(16, 3)
        ).to(device)
        optimiser = torch.optim.SGD(model.parameters(), lr=params["lr"], momentum=0.9)
        return TrainState(
            models={"net": model}, optimizers={"net": optimiser}, extra={"noise": torch.zeros(3)}
        )

    def batches(
        self, data: Any, params: Mapping[str, Any], epoch: int, device: torch.device
    ) -> Iterator[Any]:
        rng = np.random.default_rng([params["seed"], epoch])
        for _ in range(params["batches"]):
            x = rng.normal(size=(params["batch_size"], 4)).astype(np.float32)
            yield torch.from_numpy(x).to(device), torch.from_numpy(x @ data).to(device)

    def train_step(self, state: TrainState, batch: Any) -> dict[str, float]:
        x, y = batch
        model, optimiser = state.models["net"], state.optimizers["net"]
        model.train()
        loss = nn.functional.mse_loss(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        return {"loss": float(loss.detach())}

    def evaluate(self, state: TrainState, data: Any, params: Mapping[str, Any]) -> dict[str, float]:
        x = torch.ones(2, 4)
        return {"mse": float(nn.functional.mse_loss(state.models["net"](x), x @ torch.from_numpy(data)))}

    def export(self, state: TrainState, directory: Path, params: Mapping[str, Any]) -> ExportCheck:
        model = state.models["net"].eval()
        path = directory / "toy.onnx"
        x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, (torch.from_numpy(x),), str(path), input_names=["x"], output_names=["y"], dynamo=False
            )
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        if params["broken_export"]:
            expected = expected + 1.0
        return ExportCheck(path=path, inputs={"x": x}, expected={"y": expected}, atol=1e-5)

    def pictures(self, state: TrainState, directory: Path, params: Mapping[str, Any]) -> list[Path]:
        return []


TASK = ToyTask
