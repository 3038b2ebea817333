"""Training metrics as CloudWatch embedded metric format (EMF): one JSON line per record on stdout.

Namespace ``tessera``, dimensions ``Service`` (``trainer``), ``Task`` and ``Stack``. The Grafana training
dashboard (``infra/grafana/dashboards/training.json``) finds them with ``SEARCH('Namespace="tessera" loss')``
and ``SEARCH('Namespace="tessera" (throughput OR samples OR images)')``, so the names are lower case words
joined by ``_`` (CloudWatch search matches whole tokens): ``loss`` (the task's total), ``loss_<part>`` for
each other loss the task reports (``loss_d``, ``loss_g``, ``loss_heat``), ``images_per_second`` and
``epoch``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TextIO

from services.jobs.emf import EmfWriter, emf_record

SERVICE = "trainer"
THROUGHPUT = "images_per_second"
EPOCH = "epoch"


def loss_metric_name(key: str) -> str:
    """The metric name of a task loss: ``loss`` and ``loss_d`` stay; ``heat`` becomes ``loss_heat``."""
    key = "".join(c if c.isalnum() else "_" for c in key.lower()).strip("_") or "loss"
    return key if key.split("_")[0] == "loss" else f"loss_{key}"


def unit(name: str) -> str:
    """The CloudWatch unit of a metric name."""
    if name == THROUGHPUT:
        return "Count/Second"
    if name == EPOCH:
        return "Count"
    return "None"


class TrainingMetrics:
    """Writes EMF records for one task on one stack (only the main process should emit)."""

    def __init__(
        self,
        task: str,
        *,
        stack: str | None = None,
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        self.task = task
        self.stack = stack or os.environ.get("TESSERA_STACK", "local")
        self.enabled = enabled
        self._writer = EmfWriter(stream)

    @property
    def stream(self) -> TextIO | None:
        """Where records go (None: stdout)."""
        return self._writer.stream

    def record(
        self,
        losses: Mapping[str, float],
        *,
        images_per_second: float | None = None,
        epoch: int | None = None,
        **properties: Any,
    ) -> dict[str, Any] | None:
        """Emit one record of the step's losses, throughput and epoch; ``properties`` ride along unindexed.

        Returns the record written (None when disabled).
        """
        if not self.enabled:
            return None
        values = {loss_metric_name(k): float(v) for k, v in losses.items()}
        if images_per_second is not None:
            values[THROUGHPUT] = float(images_per_second)
        if epoch is not None:
            values[EPOCH] = float(epoch)
        dimensions = {"Service": SERVICE, "Task": self.task, "Stack": self.stack}
        record = emf_record(dimensions, values, unit, properties)
        self._writer.write(record)
        return record
