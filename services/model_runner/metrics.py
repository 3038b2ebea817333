"""Metrics as CloudWatch embedded metric format (EMF): one JSON line per record on stdout.

The CloudWatch agent (or the awslogs driver into a log group) turns each line into metrics in the
``tessera`` namespace with the dimensions ``Service`` and ``Stack``; that is what the Grafana dashboards
read. Names: ``TilesPerSecond`` (Count/Second), ``ModelLatency`` (Milliseconds per batch), ``QueueLag``
(Seconds from SentTimestamp to receive), ``Detections`` and ``Tiles`` (Count), ``RegionSeconds``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

NAMESPACE = "tessera"
UNITS = {
    "TilesPerSecond": "Count/Second",
    "ModelLatency": "Milliseconds",
    "QueueLag": "Seconds",
    "Detections": "Count",
    "Tiles": "Count",
    "RegionSeconds": "Seconds",
}


class Metrics:
    """Writes EMF records for one service on one stack."""

    def __init__(self, service: str | None = None, stack: str | None = None, stream: TextIO | None = None):
        self.service = service or os.environ.get("TESSERA_SERVICE", "model-runner")
        self.stack = stack or os.environ.get("TESSERA_STACK", "local")
        self.stream = stream
        self._lock = threading.Lock()

    def record(self, values: Mapping[str, float], **properties: Any) -> dict[str, Any]:
        """Emit one record of ``values`` (names from :data:`UNITS`); ``properties`` ride along unindexed.

        Returns the record written.
        """
        record: dict[str, Any] = {
            "_aws": {
                "Timestamp": int(time.time() * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": NAMESPACE,
                        "Dimensions": [["Service", "Stack"]],
                        "Metrics": [{"Name": name, "Unit": UNITS.get(name, "None")} for name in values],
                    }
                ],
            },
            "Service": self.service,
            "Stack": self.stack,
            **properties,
            **{name: float(value) for name, value in values.items()},
        }
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            stream = self.stream or sys.stdout
            stream.write(line + "\n")
            stream.flush()
        return record
