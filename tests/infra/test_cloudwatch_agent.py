"""The CloudWatch agent config: what the idle alarms and dashboards read is what the agent publishes."""

from __future__ import annotations

import json

import pytest

from infra.cloudwatch_agent import (
    AGENT_NAMESPACE,
    CONFIG_DIR,
    NVIDIA_MEMORY_METRIC,
    NVIDIA_UTILIZATION_METRIC,
    agent_config_json,
)


def test_gpu_config_collects_nvidia_metrics_per_instance() -> None:
    config = json.loads(agent_config_json(gpu=True))
    metrics = config["metrics"]
    gpu = metrics["metrics_collected"]["nvidia_gpu"]
    assert {"utilization_gpu", "utilization_memory", "memory_used", "temperature_gpu", "power_draw"} <= set(
        gpu["measurement"]
    )
    # Alarms address one instance (InstanceId) and dashboards one group: both dimensions are appended...
    assert metrics["append_dimensions"]["InstanceId"] == "${aws:InstanceId}"
    assert metrics["append_dimensions"]["AutoScalingGroupName"] == "${aws:AutoScalingGroupName}"
    # ...and rolled up alone, so an alarm with just {InstanceId} finds a metric (the raw one has more dims).
    assert ["InstanceId"] in metrics["aggregation_dimensions"]
    assert ["AutoScalingGroupName"] in metrics["aggregation_dimensions"]
    assert config["agent"]["metrics_collection_interval"] == 60
    assert metrics["namespace"] == AGENT_NAMESPACE


def test_metric_names_the_alarms_read_are_what_the_plugin_publishes() -> None:
    # The agent names nvidia_gpu measurements nvidia_smi_<measurement>.
    gpu = json.loads(agent_config_json(gpu=True))["metrics"]["metrics_collected"]["nvidia_gpu"]
    published = {f"nvidia_smi_{m}" for m in gpu["measurement"]}
    assert NVIDIA_UTILIZATION_METRIC in published
    assert NVIDIA_MEMORY_METRIC in published


def test_cpu_config_has_memory_and_disk_but_no_gpu() -> None:
    collected = json.loads(agent_config_json(gpu=False))["metrics"]["metrics_collected"]
    assert "nvidia_gpu" not in collected
    assert "mem_used_percent" in collected["mem"]["measurement"]
    assert "used_percent" in collected["disk"]["measurement"]


def test_gpu_and_cpu_files_differ_only_by_the_gpu_plugin() -> None:
    gpu = json.loads((CONFIG_DIR / "agent-gpu.json").read_text())
    cpu = json.loads((CONFIG_DIR / "agent-cpu.json").read_text())
    del gpu["metrics"]["metrics_collected"]["nvidia_gpu"]
    assert gpu == cpu


@pytest.mark.parametrize("gpu", [True, False])
def test_namespace_and_log_group_are_applied(gpu: bool) -> None:
    config = json.loads(agent_config_json(gpu=gpu, namespace="Custom", log_group_name="/tessera/boot"))
    assert config["metrics"]["namespace"] == "Custom"
    (entry,) = config["logs"]["logs_collected"]["files"]["collect_list"]
    assert entry["log_group_name"] == "/tessera/boot"
    assert entry["file_path"] == "/var/log/cloud-init-output.log"
    assert "logs" not in json.loads(agent_config_json(gpu=gpu))
