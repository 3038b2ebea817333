"""Metrics as CloudWatch embedded metric format (EMF): one JSON line per record on stdout.

The CloudWatch agent (or the awslogs driver into a log group) turns each line into metrics in the
``tessera`` namespace with the dimensions ``Service`` and ``Stack``; that is what the Grafana dashboards
read. Names: ``TilesPerSecond`` (Count/Second), ``ModelLatency`` (Milliseconds per batch), ``QueueLag``
(Seconds from SentTimestamp to receive), ``Detections`` and ``Tiles`` (Count), ``RegionSeconds``; what the
checks on a model's output did in a region (Count, from ``RegionOutcome.checks.metrics()``):
``DroppedNonFinite``, ``DroppedInverted``, ``DroppedOutsideTile``, ``ClippedToTile``, ``ScoresClamped``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TextIO

from services.jobs.emf import EmfWriter, emf_record

UNITS = {
    "TilesPerSecond": "Count/Second",
    "ModelLatency": "Milliseconds",
    "QueueLag": "Seconds",
    "Detections": "Count",
    "Tiles": "Count",
    "RegionSeconds": "Seconds",
    "DroppedNonFinite": "Count",
    "DroppedInverted": "Count",
    "DroppedOutsideTile": "Count",
    "ClippedToTile": "Count",
    "ScoresClamped": "Count",
}


class Metrics:
    """Writes EMF records for one service on one stack."""

    def __init__(self, service: str | None = None, stack: str | None = None, stream: TextIO | None = None):
        self.service = service or os.environ.get("TESSERA_SERVICE", "model-runner")
        self.stack = stack or os.environ.get("TESSERA_STACK", "local")
        self._writer = EmfWriter(stream)

    @property
    def stream(self) -> TextIO | None:
        """Where records go (None: stdout)."""
        return self._writer.stream

    def record(self, values: Mapping[str, float], **properties: Any) -> dict[str, Any]:
        """Emit one record of ``values`` (names from :data:`UNITS`); ``properties`` ride along unindexed.

        Returns the record written.
        """
        record = emf_record(
            {"Service": self.service, "Stack": self.stack},
            values,
            lambda name: UNITS.get(name, "None"),
            properties,
        )
        self._writer.write(record)
        return record
