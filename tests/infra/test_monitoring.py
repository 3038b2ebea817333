"""Grafana: reachable only via the jump host, password never in state, dashboards that read real metrics."""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.cloudwatch_agent import ACCELERATOR_NAMESPACE, AGENT_NAMESPACE, TRAINER_NAMESPACE
from infra.monitoring import (
    DASHBOARDS_PATH_ON_HOST,
    DEFAULT_DASHBOARDS_DIR,
    PROVISIONING_DIR,
    Monitoring,
    MonitoringArgs,
    encode_user_data,
)
from stacks.offline import Declared, OfflineRun

JUMP_SG = "sg-0jumphost0000000"
JUMP_IP = "198.51.100.20"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
# Every namespace a dashboard may read: AWS services tessera runs on, the agent, and tessera's own.
KNOWN_NAMESPACES = {
    "AWS/SQS",
    "AWS/AutoScaling",
    "AWS/RDS",
    "AWS/EC2",
    AGENT_NAMESPACE,
    ACCELERATOR_NAMESPACE,
    TRAINER_NAMESPACE,
}
DASHBOARDS = sorted(DEFAULT_DASHBOARDS_DIR.glob("*.json"))


def _run(offline: Callable[..., OfflineRun], **kw: Any) -> OfflineRun:
    def program() -> dict[str, Any]:
        settings: dict[str, Any] = {
            "vpc_id": "vpc-0123",
            "subnet_id": "subnet-0private",
            "jump_host_security_group_id": JUMP_SG,
            "instance_profile_name": "tessera-grafana",
            "region": "eu-west-1",
        }
        settings.update(kw)
        grafana = Monitoring("monitoring", MonitoringArgs(**settings))
        return {
            "private_ip": grafana.private_ip,
            "security_group_id": grafana.security_group_id,
            "admin_secret_arn": grafana.admin_secret_arn,
            "url": grafana.url,
            "tunnel": grafana.tunnel_command(JUMP_IP),
            "tunnel_8080": grafana.tunnel_command(JUMP_IP, ssh_user="admin", local_port=8080),
        }

    return offline(program, config={"aws:region": "eu-west-1"})


def _instance(run: OfflineRun) -> Declared:
    (instance,) = run.of_type("aws:ec2/instance:Instance")
    return instance


def _user_data(run: OfflineRun) -> tuple[bytes, str]:
    packed = base64.b64decode(_instance(run).inputs["userDataBase64"])
    return packed, gzip.decompress(packed).decode("utf-8")


def _written_files(script: str) -> dict[str, str]:
    pattern = re.compile(r"install -D -m \d+ /dev/stdin '?([^\s']+)'? <<'(\w+)'\n(.*?)\n\2\n", re.DOTALL)
    return {m.group(1): m.group(3) for m in pattern.finditer(script)}


def test_grafana_port_and_ssh_only_from_the_jump_host(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline)
    sg = run.outputs["security_group_id"]
    assert _instance(run).inputs["vpcSecurityGroupIds"] == [sg]
    rules = run.of_type(INGRESS)
    assert {r.inputs["securityGroupId"] for r in rules} == {sg}
    ports = sorted((r.inputs["fromPort"], r.inputs["toPort"]) for r in rules)
    assert ports == [(22, 22), (3000, 3000)]
    for rule in rules:
        assert rule.inputs["ipProtocol"] == "tcp"
        assert rule.inputs["referencedSecurityGroupId"] == JUMP_SG


def test_no_address_range_can_reach_grafana(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline)
    for rule in run.of_type(INGRESS):
        assert not {"cidrIpv4", "cidrIpv6", "prefixListId"} & set(rule.inputs)
    assert not run.of_type("aws:ec2/securityGroupRule:SecurityGroupRule")
    (group,) = run.of_type("aws:ec2/securityGroup:SecurityGroup")
    assert not group.inputs.get("ingress")
    assert _instance(run).inputs["associatePublicIpAddress"] is False
    # Outbound is HTTPS only (AWS APIs, package repositories).
    (egress,) = run.of_type("aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule")
    assert (egress.inputs["ipProtocol"], egress.inputs["fromPort"], egress.inputs["toPort"]) == (
        "tcp",
        443,
        443,
    )


def test_admin_password_never_passes_through_pulumi(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, kms_key_arn="arn:aws:kms:eu-west-1:123456789012:key/grafana")
    assert not run.of_type("aws:secretsmanager/secretVersion:SecretVersion")
    (secret,) = run.of_type("aws:secretsmanager/secret:Secret")
    assert not {"secretString", "secretBinary"} & set(secret.inputs)
    assert secret.inputs["kmsKeyId"] == "arn:aws:kms:eu-west-1:123456789012:key/grafana"
    # The instance makes the password and stores it in exactly this secret, from a file (not argv).
    _, script = _user_data(run)
    arn = run.outputs["admin_secret_arn"]
    assert arn and f"secret_arn='{arn}'" in script
    assert 'put-secret-value --region "$region" --secret-id "$secret_arn"' in script
    assert "--secret-string file:///etc/grafana/admin-password" in script


def test_user_data_carries_the_provisioning_files_within_16_kb(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline)
    packed, script = _user_data(run)
    assert len(packed) < 16 * 1024
    assert len(_instance(run).inputs["userDataBase64"]) < 16 * 1024
    files = _written_files(script)
    datasource = files["/etc/grafana/provisioning/datasources/cloudwatch.yaml"]
    assert datasource == (PROVISIONING_DIR / "datasources" / "cloudwatch.yaml").read_text().rstrip()
    assert "authType: default" in datasource and "type: cloudwatch" in datasource
    provider = files["/etc/grafana/provisioning/dashboards/tessera.yaml"]
    assert f"path: {DASHBOARDS_PATH_ON_HOST}" in provider
    for source in DASHBOARDS:
        shipped = json.loads(files[f"{DASHBOARDS_PATH_ON_HOST}/{source.name}"])
        assert shipped == json.loads(source.read_text())
    # Pinned Grafana, listening on all interfaces (the security group decides who gets in).
    assert "dnf install -y grafana-11.6.0\n" in script
    assert "GF_SERVER_HTTP_ADDR=0.0.0.0" in script and "GF_SERVER_HTTP_PORT=3000" in script
    assert "Environment=AWS_REGION=$region" in script and "region=eu-west-1" in script


def test_instance_requires_imdsv2_and_encrypts_its_root_volume(offline: Callable[..., OfflineRun]) -> None:
    instance = _instance(_run(offline))
    assert instance.inputs["metadataOptions"]["httpTokens"] == "required"
    assert instance.inputs["rootBlockDevice"]["encrypted"] is True
    assert instance.inputs["iamInstanceProfile"] == "tessera-grafana"


def test_tunnel_command_is_exact(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline)
    ip = _instance(run).outputs["privateIp"]
    assert ip and ip == run.outputs["private_ip"]
    assert run.outputs["tunnel"] == f"ssh -N -o ExitOnForwardFailure=yes -L 3000:{ip}:3000 ec2-user@{JUMP_IP}"
    assert (
        run.outputs["tunnel_8080"] == f"ssh -N -o ExitOnForwardFailure=yes -L 8080:{ip}:3000 admin@{JUMP_IP}"
    )
    assert run.outputs["url"] == "http://localhost:3000"


def test_grafana_version_must_be_pinned(offline: Callable[..., OfflineRun]) -> None:
    with pytest.raises(ValueError, match="grafana_version"):
        _run(offline, grafana_version="latest")


def test_oversized_user_data_is_refused() -> None:
    with pytest.raises(ValueError, match="16384"):
        encode_user_data(base64.b64encode(os.urandom(20_000)).decode())


def test_a_dashboards_folder_without_dashboards_is_refused(
    offline: Callable[..., OfflineRun], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="no Grafana dashboards"):
        _run(offline, dashboards_dir=str(tmp_path))


# --- the dashboards ---------------------------------------------------------------------------------------


def _targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if "target" in annotation:
            yield annotation, annotation["target"]


def _namespaces(target: dict[str, Any]) -> set[str]:
    if target.get("metricEditorMode") == 1:
        return set(re.findall(r'Namespace="([^"]+)"', target["expression"]))
    return {target["namespace"]} if target.get("namespace") else set()


def _load(name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((DEFAULT_DASHBOARDS_DIR / name).read_text(encoding="utf-8"))
    return result


def _metrics(dashboard: dict[str, Any]) -> set[tuple[str, str]]:
    return {(t["namespace"], t["metricName"]) for _, t in _targets(dashboard) if t.get("metricName")}


def test_the_four_dashboards_exist() -> None:
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS}
    assert {"tessera — queues", "tessera — fleet", "tessera — database", "tessera — training"} <= titles


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_reads_a_known_cloudwatch_namespace(path: Path) -> None:
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    assert dashboard["title"].startswith("tessera")
    assert dashboard["uid"]
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["type"] == "cloudwatch"
        namespaces = set().union(*(_namespaces(t) for t in panel["targets"]))
        assert namespaces, f"{path.name}: panel {panel['title']!r} reads no namespace"
        assert namespaces <= KNOWN_NAMESPACES, f"{path.name}: {panel['title']!r} reads {namespaces}"
    for _, target in _targets(dashboard):
        assert _namespaces(target) <= KNOWN_NAMESPACES


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboards_use_template_variables_not_stack_names(path: Path) -> None:
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert defined
    for holder, target in _targets(dashboard):
        for key, value in target.get("dimensions", {}).items():
            assert value == "*" or (value.startswith("$") and value[1:] in defined), (
                f"{path.name}: {holder.get('title', holder.get('name'))!r} pins {key}={value!r}"
            )


def test_queues_dashboard_shows_depth_age_and_dead_letters() -> None:
    dashboard = _load("queues.json")
    assert {
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible"),
        ("AWS/SQS", "ApproximateAgeOfOldestMessage"),
    } <= (_metrics(dashboard))
    dlq = [t for _, t in _targets(dashboard) if t.get("dimensions", {}).get("QueueName") == "$dlq"]
    assert [t["metricName"] for t in dlq] == ["ApproximateNumberOfMessagesVisible"]


def test_fleet_dashboard_shows_capacity_and_gpus_per_instance() -> None:
    metrics = _metrics(_load("fleet.json"))
    assert {
        ("AWS/AutoScaling", "GroupInServiceInstances"),
        ("AWS/AutoScaling", "GroupDesiredCapacity"),
    } <= metrics
    assert {
        (AGENT_NAMESPACE, "nvidia_smi_utilization_gpu"),
        (AGENT_NAMESPACE, "nvidia_smi_memory_used"),
    } <= metrics


def test_database_dashboard_shows_the_rds_health_metrics() -> None:
    metrics = {m for ns, m in _metrics(_load("database.json")) if ns == "AWS/RDS"}
    assert {
        "CPUUtilization",
        "FreeStorageSpace",
        "DatabaseConnections",
        "FreeableMemory",
        "ReadLatency",
        "WriteLatency",
    } <= metrics


def test_training_dashboard_reads_what_the_idle_alarm_and_the_trainer_publish() -> None:
    dashboard = _load("training.json")
    metrics = _metrics(dashboard)
    assert (AGENT_NAMESPACE, "nvidia_smi_utilization_gpu") in metrics
    assert (ACCELERATOR_NAMESPACE, "AcceleratorUtilization") in metrics
    assert ("AWS/EC2", "StatusCheckFailed") in metrics
    namespaces = set().union(*(_namespaces(t) for _, t in _targets(dashboard)))
    assert TRAINER_NAMESPACE in namespaces
    # Training instances are picked by the functional tag the TrainingInstance component sets.
    (variable,) = dashboard["templating"]["list"]
    assert variable["query"]["ec2Filters"] == {"tag:tessera:role": ["training"]}
