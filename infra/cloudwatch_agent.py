"""The CloudWatch agent configuration every tessera instance runs, and the metric names it produces.

The JSON lives in ``infra/cloudwatch/`` (shipped as package data) so that it can be read, diffed and
validated as a file; :func:`agent_config_json` loads it and fills in the per-use settings. The constants
below are the one place that names the metrics alarms and dashboards read, so that an alarm never waits on
a metric the agent does not publish.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "cloudwatch"
"""Where the agent configuration files live."""

AGENT_NAMESPACE = "CWAgent"
"""The agent's default namespace; alarms and dashboards read GPU metrics from here."""

NVIDIA_UTILIZATION_METRIC = "nvidia_smi_utilization_gpu"
"""GPU busy percent, published by the agent's ``nvidia_gpu`` plugin (``utilization_gpu``)."""

NVIDIA_MEMORY_METRIC = "nvidia_smi_memory_used"
"""GPU memory in use (MiB), published by the agent's ``nvidia_gpu`` plugin (``memory_used``)."""

ACCELERATOR_NAMESPACE = "tessera/Accelerators"
"""Namespace of the utilisation Gaudi and Neuron instances publish themselves (no agent plugin exists)."""

ACCELERATOR_UTILIZATION_METRIC = "AcceleratorUtilization"
"""Busiest accelerator's utilisation in percent, with an ``InstanceId`` dimension."""

TRAINER_NAMESPACE = "tessera"
"""Namespace of the trainer's own metrics (loss, throughput)."""

AGENT_ROLE_STATEMENT: dict[str, Any] = {
    # append_dimensions names ${aws:AutoScalingGroupName}, which the agent reads from the instance's tags;
    # disk metrics name their volumes. Neither call has resource-level permissions.
    "Sid": "CloudWatchAgentDescribe",
    "Effect": "Allow",
    "Action": ["ec2:DescribeTags", "ec2:DescribeVolumes"],
    "Resource": "*",
}
"""What the role of any instance running this agent needs besides ``cloudwatch:PutMetricData``."""

NVIDIA_GPU_MEASUREMENTS = (
    "utilization_gpu",
    "utilization_memory",
    "memory_used",
    "memory_total",
    "temperature_gpu",
    "power_draw",
)
"""What the ``nvidia_gpu`` plugin collects (each becomes ``nvidia_smi_<name>``)."""


def agent_config(
    *, gpu: bool, namespace: str = AGENT_NAMESPACE, log_group_name: str | None = None
) -> dict[str, Any]:
    """The agent configuration as a dict: memory and disk, plus NVIDIA GPU metrics when ``gpu``.

    Metrics carry ``InstanceId`` (and ``AutoScalingGroupName`` inside a group) and are also rolled up on
    those dimensions alone, so an alarm or a dashboard can address one instance or one group. With
    ``log_group_name`` the agent also ships the first-boot log (``cloud-init-output.log``) there.
    """
    file = CONFIG_DIR / ("agent-gpu.json" if gpu else "agent-cpu.json")
    config: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    config["metrics"]["namespace"] = namespace
    if log_group_name:
        config["logs"] = {
            "logs_collected": {
                "files": {
                    "collect_list": [
                        {
                            "file_path": "/var/log/cloud-init-output.log",
                            "log_group_name": log_group_name,
                            "log_stream_name": "{instance_id}/cloud-init-output",
                        }
                    ]
                }
            }
        }
    return config


def agent_config_json(
    *, gpu: bool, namespace: str = AGENT_NAMESPACE, log_group_name: str | None = None
) -> str:
    """The CloudWatch agent configuration, as the JSON text the agent reads (see :func:`agent_config`)."""
    return json.dumps(agent_config(gpu=gpu, namespace=namespace, log_group_name=log_group_name), indent=2)
