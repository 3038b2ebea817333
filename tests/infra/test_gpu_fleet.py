"""Worker fleets: locked-down instances that run the service image, and scaling on the queue backlog."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pulumi
import pulumi_aws as aws
import pytest

from infra.gpu_fleet import (
    CPU_AMI_PARAMETER,
    GPU_AMI_NAME,
    WorkerFleet,
    WorkerFleetArgs,
)
from infra.worker_boot import CONTAINER_STOP_TIMEOUT_S, worker_user_data
from services.jobs.queue_worker import DEFAULT_DRAIN_S
from stacks.offline import OfflineRun

LT = "aws:ec2/launchTemplate:LaunchTemplate"
ASG = "aws:autoscaling/group:Group"
POLICY = "aws:autoscaling/policy:Policy"
ALARM = "aws:cloudwatch/metricAlarm:MetricAlarm"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/tessera-model-runner@sha256:" + "ab" * 32
SUBNETS = ["subnet-0aaa", "subnet-0bbb"]
AGENT_CONFIG = json.dumps(
    {"metrics": {"metrics_collected": {"nvidia_gpu": {"measurement": ["utilization_gpu"]}}}}
)


def _fleet(offline: Callable[..., OfflineRun], **overrides: Any) -> OfflineRun:
    """A model-runner fleet consuming two real (mocked) queues; ``overrides`` change WorkerFleetArgs."""

    def program() -> dict[str, Any]:
        requests = aws.sqs.Queue("image-requests")
        regions = aws.sqs.Queue("region-requests")
        args: dict[str, Any] = {
            "service": "model-runner",
            "image_ref": IMAGE,
            "subnet_ids": SUBNETS,
            "security_group_id": "sg-0workers",
            "instance_profile_name": "model-runner-profile",
            "region": "us-east-1",
            "queue_names": [requests.name, regions.name],
            "environment": {"TESSERA_QUEUE_URL": requests.url, "GREETING": 'it\'s a "test" $HOME'},
            "log_group_name": "/tessera/dev/model-runner",
            "agent_config_json": AGENT_CONFIG,
            **overrides,
        }
        fleet = WorkerFleet("mr", WorkerFleetArgs(**args))
        outputs: dict[str, Any] = {
            "group": fleet.group_name,
            "template": fleet.launch_template_id,
            "queues": [requests.name, regions.name],
            "queue_url": requests.url,
            "has_alarm": fleet.scale_out_alarm_name is not None,
        }
        return outputs

    return offline(program)


def _user_data(run: OfflineRun) -> str:
    (template,) = run.of_type(LT)
    return base64.b64decode(template.inputs["userData"]).decode()


def test_launch_template_requires_imdsv2_and_encrypts_every_volume(
    offline: Callable[..., OfflineRun],
) -> None:
    run = _fleet(offline, root_volume_gb=200, ebs_kms_key_arn="arn:aws:kms:us-east-1:123456789012:key/ebs")
    (template,) = run.of_type(LT)
    options = template.inputs["metadataOptions"]
    assert options["httpTokens"] == "required"
    assert options["httpPutResponseHopLimit"] == 2  # the container reaches IMDS through Docker's bridge
    devices = template.inputs["blockDeviceMappings"]
    assert devices
    for device in devices:
        assert device["ebs"]["encrypted"] == "true"
        assert device["ebs"]["kmsKeyId"] == "arn:aws:kms:us-east-1:123456789012:key/ebs"
    assert devices[0]["ebs"]["volumeSize"] == 200
    assert devices[0]["ebs"]["volumeType"] == "gp3"
    assert template.inputs["monitoring"] == {"enabled": True}
    assert template.inputs["iamInstanceProfile"] == {"name": "model-runner-profile"}


def test_instances_get_no_public_ip(offline: Callable[..., OfflineRun]) -> None:
    (template,) = _fleet(offline).of_type(LT)
    interfaces = template.inputs["networkInterfaces"]
    assert interfaces
    assert all(i["associatePublicIpAddress"] == "false" for i in interfaces)
    assert interfaces[0]["securityGroups"] == ["sg-0workers"]


def test_instances_and_volumes_are_tagged_with_their_service(offline: Callable[..., OfflineRun]) -> None:
    (template,) = _fleet(offline, extra_tags={"tessera:stack": "dev"}).of_type(LT)
    specs = {s["resourceType"]: s["tags"] for s in template.inputs["tagSpecifications"]}
    assert {"instance", "volume"} <= set(specs)
    for tags in specs.values():
        assert tags["tessera:service"] == "model-runner"
        assert tags["tessera:stack"] == "dev"


def test_gpu_workers_run_the_image_with_every_gpu(offline: Callable[..., OfflineRun]) -> None:
    run = _fleet(offline)
    script = _user_data(run)
    assert f"IMAGE={IMAGE}" in script
    assert "--gpus all" in script
    assert "--restart unless-stopped" in script
    # docker stop waits out the worker's drain time and its hand-back before SIGKILL.
    assert f"--stop-timeout {CONTAINER_STOP_TIMEOUT_S}" in script
    assert CONTAINER_STOP_TIMEOUT_S >= DEFAULT_DRAIN_S + 10
    assert "--log-driver awslogs" in script and "awslogs-group=/tessera/dev/model-runner" in script
    assert (
        "docker login --username AWS --password-stdin 123456789012.dkr.ecr.us-east-1.amazonaws.com" in script
    )
    assert script.rstrip().endswith('"$IMAGE" worker model-runner')
    # The newest Deep Learning Base AMI is looked up, from Amazon only.
    (lookup,) = [args for token, args in run.mocks.calls if token == "aws:ec2/getAmi:getAmi"]
    assert lookup["owners"] == ["amazon"] and lookup["mostRecent"] is True
    assert {"name": "name", "values": [GPU_AMI_NAME]} in lookup["filters"]


def test_cpu_workers_run_without_gpus_on_amazon_linux(offline: Callable[..., OfflineRun]) -> None:
    run = _fleet(offline, gpu=False, instance_type="c6i.xlarge", service="fits-classifier")
    script = _user_data(run)
    assert "--gpus" not in script
    assert f"IMAGE={IMAGE}" in script and "docker run" in script
    assert script.rstrip().endswith('"$IMAGE" worker fits-classifier')
    (template,) = run.of_type(LT)
    ssm = [args for token, args in run.mocks.calls if token == "aws:ssm/getParameter:getParameter"]
    assert ssm == [{"name": CPU_AMI_PARAMETER}]
    assert template.inputs["imageId"].startswith("ami-")
    assert not [token for token, _ in run.mocks.calls if token == "aws:ec2/getAmi:getAmi"]


def test_a_pinned_ami_skips_the_lookup(offline: Callable[..., OfflineRun]) -> None:
    run = _fleet(offline, ami_id="ami-0pinned", command=["worker", "model-runner", "--once"])
    assert run.of_type(LT)[0].inputs["imageId"] == "ami-0pinned"
    assert not [
        t for t, _ in run.mocks.calls if t in ("aws:ec2/getAmi:getAmi", "aws:ssm/getParameter:getParameter")
    ]
    assert _user_data(run).rstrip().endswith('"$IMAGE" worker model-runner --once')


def _fake_bin(tmp_path: Path) -> tuple[Path, Path]:
    """Stand-ins for docker, aws, curl, systemctl and dnf that record each call's argv, one arg per line."""
    calls = tmp_path / "calls"
    calls.mkdir()
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("docker", "aws", "curl", "systemctl", "dnf", "amazon-cloudwatch-agent-ctl"):
        script = fake / tool
        script.write_text(
            "#!/bin/bash\n"
            # Pipes run their sides at once: name each record by time and pid, never by a count.
            f'printf "%s\\n" "{tool}" "$@" > "{calls}/$(date +%s%N)-$$"\n'
            'if [ "$1" = "-sS" ]; then echo i-0fake; fi\n'
            "cat >/dev/null 2>&1 <&0 || true\n"
        )
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return fake, calls


def test_user_data_runs_and_passes_the_environment_intact(
    offline: Callable[..., OfflineRun], tmp_path: Path
) -> None:
    run = _fleet(offline)
    script = _user_data(run)
    # Run the boot script for real against stand-in tools, with its fixed paths moved into tmp_path.
    agent_dir = tmp_path / "agent"
    script = script.replace("/var/log/tessera-bootstrap.log", str(tmp_path / "boot.log"))
    script = script.replace("/opt/aws/amazon-cloudwatch-agent/etc", str(agent_dir))
    script = script.replace(
        "/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl", "amazon-cloudwatch-agent-ctl"
    )
    fake, calls = _fake_bin(tmp_path)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", script], check=True, env=env, timeout=30, stdin=subprocess.DEVNULL)

    recorded = [p.read_text().splitlines() for p in sorted(calls.iterdir())]
    runs = [argv[1:] for argv in recorded if argv[:2] == ["docker", "run"]]
    assert len(runs) == 1
    argv = runs[0]
    envs = [argv[i + 1] for i, a in enumerate(argv) if a == "--env"]
    assert f"TESSERA_QUEUE_URL={run.outputs['queue_url']}" in envs
    assert 'GREETING=it\'s a "test" $HOME' in envs  # quotes and dollars arrive unexpanded
    assert "AWS_REGION=us-east-1" in envs
    assert argv[-3:] == [IMAGE, "worker", "model-runner"]
    assert "awslogs-stream=model-runner/i-0fake" in argv
    assert ["docker", "pull", IMAGE] in recorded
    assert any(a[:3] == ["aws", "ecr", "get-login-password"] for a in recorded)
    # The CloudWatch agent gets the given configuration and is started with it.
    assert json.loads((agent_dir / "amazon-cloudwatch-agent.json").read_text()) == json.loads(AGENT_CONFIG)
    assert any(a[0] == "amazon-cloudwatch-agent-ctl" and "fetch-config" in a for a in recorded)


def test_without_a_log_group_or_agent_logs_stay_local() -> None:
    script = worker_user_data(
        service="sight-catalog",
        image_ref="public.ecr.aws/example/image:1",
        region="eu-west-1",
        gpu=False,
        command=["catalog", "serve"],
        environment={},
    )
    assert "awslogs" not in script and "amazon-cloudwatch-agent" not in script
    assert "--log-driver json-file" in script
    assert "docker login" not in script  # not an ECR private registry: nothing to log in to
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0


def test_a_boot_script_ec2_would_refuse_is_rejected() -> None:
    with pytest.raises(ValueError, match="over EC2's 16384"):
        worker_user_data(
            service="trainer",
            image_ref=IMAGE,
            region="us-east-1",
            gpu=True,
            command=["worker", "trainer"],
            environment={"BIG": "x" * 17_000},
        )


def test_group_starts_at_zero_in_the_given_subnets_and_tags_propagate(
    offline: Callable[..., OfflineRun],
) -> None:
    run = _fleet(offline, max_size=6, extra_tags={"tessera:stack": "dev"})
    (group,) = run.of_type(ASG)
    assert group.inputs["minSize"] == 0
    assert group.inputs["maxSize"] == 6
    assert "desiredCapacity" not in group.inputs  # scaling owns it
    assert group.inputs["vpcZoneIdentifiers"] == SUBNETS
    tags = {t["key"]: t for t in group.inputs["tags"]}
    assert tags["tessera:service"]["value"] == "model-runner"
    assert tags["tessera:stack"]["value"] == "dev"
    assert all(t["propagateAtLaunch"] is True for t in tags.values())
    (template,) = run.of_type(LT)
    # The group follows the template's newest version, and a new version rolls the instances.
    assert group.inputs["launchTemplate"] == {
        "id": template.outputs["id"],
        "version": str(template.outputs["latestVersion"]),
    }
    assert group.inputs["instanceRefresh"]["strategy"] == "Rolling"
    assert {"GroupInServiceInstances", "GroupDesiredCapacity"} <= set(group.inputs["enabledMetrics"])
    assert run.outputs["group"] == group.outputs["name"]
    assert run.outputs["template"] == template.outputs["id"]


def test_pulumi_up_never_resets_the_desired_capacity(offline: Callable[..., OfflineRun]) -> None:
    ignored: dict[str, list[str]] = {}

    def record(args: pulumi.ResourceTransformationArgs) -> None:
        if args.type_ == ASG:
            ignored[args.name] = list(args.opts.ignore_changes or [])

    def program() -> dict[str, Any]:
        pulumi.runtime.register_stack_transformation(record)
        fleet = WorkerFleet(
            "w",
            WorkerFleetArgs(
                service="sky-generator",
                image_ref=IMAGE,
                subnet_ids=SUBNETS,
                security_group_id="sg-1",
                instance_profile_name="p",
                region="us-east-1",
            ),
        )
        return {"group": fleet.group_name}

    offline(program)
    assert ignored == {"w-asg": ["desired_capacity"]}


def test_target_tracking_keeps_backlog_per_instance_on_the_queues(offline: Callable[..., OfflineRun]) -> None:
    run = _fleet(offline, backlog_per_instance=12)
    queues = run.outputs["queues"]
    (group,) = run.of_type(ASG)
    (tracking,) = [p for p in run.of_type(POLICY) if p.inputs["policyType"] == "TargetTrackingScaling"]
    assert tracking.inputs["autoscalingGroupName"] == group.outputs["name"]
    config = tracking.inputs["targetTrackingConfiguration"]
    assert config["targetValue"] == 12
    metrics = {m["id"]: m for m in config["customizedMetricSpecification"]["metrics"]}
    sqs = [m["metricStat"]["metric"] for m in metrics.values() if "metricStat" in m]
    visible = [m for m in sqs if m["metricName"] == "ApproximateNumberOfMessagesVisible"]
    assert sorted(d["value"] for m in visible for d in m["dimensions"]) == sorted(queues)
    (in_service,) = [m for m in sqs if m["metricName"] == "GroupInServiceInstances"]
    assert in_service["dimensions"] == [{"name": "AutoScalingGroupName", "value": group.outputs["name"]}]
    (result,) = [m for m in metrics.values() if m.get("returnData")]
    expression = result["expression"]
    in_service_id = next(i for i, m in metrics.items() if m.get("metricStat", {}).get("metric") == in_service)
    assert expression.replace(" ", "").endswith(f"/{in_service_id}")
    for metric_id, metric in metrics.items():
        if metric.get("metricStat", {}).get("metric", {}).get("namespace") == "AWS/SQS":
            assert metric_id in expression  # every queue's backlog counts


def test_an_alarm_takes_the_empty_group_to_one_instance(offline: Callable[..., OfflineRun]) -> None:
    run = _fleet(offline)
    queues = run.outputs["queues"]
    (group,) = run.of_type(ASG)
    (step,) = [p for p in run.of_type(POLICY) if p.inputs["policyType"] == "StepScaling"]
    assert step.inputs["autoscalingGroupName"] == group.outputs["name"]
    assert step.inputs["adjustmentType"] == "ExactCapacity"
    assert [s["scalingAdjustment"] for s in step.inputs["stepAdjustments"]] == [1]
    (alarm,) = run.of_type(ALARM)
    assert alarm.inputs["alarmActions"] == [step.outputs["arn"]]
    assert alarm.inputs["comparisonOperator"] == "GreaterThanThreshold" and alarm.inputs["threshold"] == 0
    queries = {q["id"]: q for q in alarm.inputs["metricQueries"]}
    waiting = [q["metric"] for q in queries.values() if q.get("metric", {}).get("namespace") == "AWS/SQS"]
    assert sorted(m["dimensions"]["QueueName"] for m in waiting) == sorted(queues)
    (desired_id,) = [
        i for i, q in queries.items() if q.get("metric", {}).get("metricName") == "GroupDesiredCapacity"
    ]
    assert queries[desired_id]["metric"]["dimensions"] == {"AutoScalingGroupName": group.outputs["name"]}
    (result,) = [q for q in queries.values() if q.get("returnData")]
    assert f"FILL({desired_id}, 0) == 0" in result["expression"]  # only when the group is empty
    assert run.outputs["has_alarm"] is True


def test_no_queues_means_a_fixed_group_without_scaling(offline: Callable[..., OfflineRun]) -> None:
    run = _fleet(offline, queue_names=[], min_size=1)
    assert run.of_type(POLICY) == [] and run.of_type(ALARM) == []
    assert run.outputs["has_alarm"] is False
    assert run.of_type(ASG)[0].inputs["minSize"] == 1


def test_spot_fleets_use_a_mixed_instances_policy(offline: Callable[..., OfflineRun]) -> None:
    run = _fleet(offline, spot=True)
    (group,) = run.of_type(ASG)
    assert "launchTemplate" not in group.inputs
    policy = group.inputs["mixedInstancesPolicy"]
    assert policy["instancesDistribution"]["onDemandPercentageAboveBaseCapacity"] == 0
    spec = policy["launchTemplate"]["launchTemplateSpecification"]
    assert spec["launchTemplateId"] == run.of_type(LT)[0].outputs["id"]
    assert group.inputs["capacityRebalance"] is True


def test_children_belong_to_the_component(offline: Callable[..., OfflineRun]) -> None:
    run = _fleet(offline)
    for token in (LT, ASG, POLICY, ALARM):
        assert {r.parent for r in run.of_type(token)} == {"mr"}


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"environment": {"BAD-NAME": "x"}}, "environment variable names"),
        ({"min_size": 3, "max_size": 2}, "min_size"),
        ({"service": "Model Runner"}, "service name"),
        ({"backlog_per_instance": 0}, "backlog_per_instance"),
    ],
)
def test_bad_args_are_rejected(overrides: dict[str, Any], complaint: str) -> None:
    args: dict[str, Any] = {
        "service": "model-runner",
        "image_ref": IMAGE,
        "subnet_ids": SUBNETS,
        "security_group_id": "sg-1",
        "instance_profile_name": "p",
        "region": "us-east-1",
        **overrides,
    }
    with pytest.raises(ValueError, match=complaint):
        WorkerFleetArgs(**args)
