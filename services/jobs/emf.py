"""CloudWatch embedded metric format (EMF): one JSON line per record on stdout.

``TESSERA_EMF_FILE`` (a path) sends the lines there instead, appended, for a run whose stdout a person
reads (a demo, an interactive training run) and no agent collects.

The CloudWatch agent (or the awslogs driver into a log group) turns each line into metrics in the
``tessera`` namespace, dimensioned as the record says; the Grafana dashboards read them from there. Each
service names its metrics and dimensions (:mod:`services.model_runner.metrics`,
:mod:`services.trainer.metrics`); this module only writes the records.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

NAMESPACE = "tessera"
#: The environment variable naming a file for the EMF lines instead of stdout.
EMF_FILE_ENV = "TESSERA_EMF_FILE"


def emf_record(
    dimensions: Mapping[str, str],
    values: Mapping[str, float],
    unit: Callable[[str], str],
    properties: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One EMF record: ``values`` (metric name -> value, ``unit(name)`` its CloudWatch unit) under the
    dimension set ``dimensions`` (name -> value, in order); ``properties`` ride along unindexed."""
    return {
        "_aws": {
            "Timestamp": int(time.time() * 1000),
            "CloudWatchMetrics": [
                {
                    "Namespace": NAMESPACE,
                    "Dimensions": [list(dimensions)],
                    "Metrics": [{"Name": name, "Unit": unit(name)} for name in values],
                }
            ],
        },
        **dimensions,
        **(properties or {}),
        **{name: float(value) for name, value in values.items()},
    }


class EmfWriter:
    """Writes records as whole lines to ``stream`` (default: the file ``$TESSERA_EMF_FILE`` names, else stdout
    at the time of writing), thread-safe."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def write(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` as one compact JSON line and flush."""
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            if self.stream is None and os.environ.get(EMF_FILE_ENV):
                with open(os.environ[EMF_FILE_ENV], "a", encoding="utf-8") as handle:
                    handle.write(line + "\n")
                return
            stream = self.stream or sys.stdout
            stream.write(line + "\n")
            stream.flush()
