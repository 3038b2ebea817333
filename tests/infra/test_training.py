"""The training instance: stops (never terminates) when idle, keeps its data, admits only the jump host."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import pulumi
import pytest

from infra.cloudwatch_agent import ACCELERATOR_NAMESPACE, ACCELERATOR_UTILIZATION_METRIC
from infra.iam import wildcard_violations
from infra.training import (
    BUSY_METRIC,
    BUSY_NAMESPACE,
    IDLE_AGENT_UNIT,
    IDLE_AGENT_WRAPPER,
    IDLE_ALARM_EXPRESSION,
    INSTANCE_TYPE_SETTING,
    TRAINER_STATE_DIR,
    TRAINER_STATE_FILE,
    VOLTA_AMI_NAME_PATTERN,
    TrainingInstance,
    TrainingInstanceArgs,
    accelerator_for,
)
from services.trainer import idle
from stacks.offline import Declared, OfflineRun

IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/tessera/trainer@sha256:" + "a" * 64
JUMP_SG = "sg-0jumphost0000000"
INSTANCE = "aws:ec2/instance:Instance"
SECRET_SENTINEL = "4dabf18193072939515e22adb298388d"


def _args(**overrides: Any) -> TrainingInstanceArgs:
    settings: dict[str, Any] = {
        "vpc_id": "vpc-0123",
        "subnet_id": "subnet-0private",
        "instance_profile_name": "tessera-training",
        "image_ref": IMAGE,
        "region": "eu-west-1",
        "availability_zone": "eu-west-1b",
        "environment": {"TESSERA_QUEUE_URL": "https://sqs.eu-west-1.amazonaws.com/123456789012/train"},
        "ssh_source_security_group_id": JUMP_SG,
        "log_group_name": "/tessera/training",
    }
    settings.update(overrides)
    return TrainingInstanceArgs(**settings)


def _run(
    offline: Callable[..., OfflineRun], captured: dict[str, pulumi.ResourceOptions] | None = None, **kw: Any
) -> OfflineRun:
    def program() -> dict[str, Any]:
        if captured is not None:

            def capture(args: pulumi.ResourceTransformationArgs) -> None:
                captured[args.type_] = args.opts

            pulumi.runtime.register_stack_transformation(capture)
        box = TrainingInstance("trainer", _args(**kw))
        return {
            "instance_id": box.instance_id,
            "private_ip": box.private_ip,
            "security_group_id": box.security_group_id,
            "data_volume_id": box.data_volume_id,
            "accelerator": box.accelerator,
        }

    return offline(program, config={"aws:region": "eu-west-1"})


def _instance(run: OfflineRun) -> Declared:
    (instance,) = run.of_type(INSTANCE)
    return instance


def _plain(value: Any) -> Any:
    """An input with Pulumi's secret wrapper taken off."""
    if isinstance(value, dict) and SECRET_SENTINEL in value:
        return value["value"]
    return value


def _heredocs(script: str) -> dict[str, str]:
    """Files a script writes with ``install ... /dev/stdin PATH <<'DELIM'``, by path."""
    pattern = re.compile(r"install -D -m \d+ /dev/stdin '?([^\s']+)'? <<'(\w+)'\n(.*?)\n\2\n", re.DOTALL)
    return {m.group(1): m.group(3) for m in pattern.finditer(script)}


def setup_units(user_data: str) -> str:
    """The units the setup script enables and starts."""
    setup, _ = _setup_files(user_data)
    (line,) = [x for x in setup.splitlines() if x.startswith("systemctl --no-block enable --now")]
    return line


def _setup_files(user_data: str) -> tuple[str, dict[str, str]]:
    (setup,) = _heredocs(user_data).values()
    return setup, _heredocs(setup)


def test_instance_stops_itself_instead_of_terminating_and_requires_imdsv2(
    offline: Callable[..., OfflineRun],
) -> None:
    instance = _instance(_run(offline))
    assert instance.inputs["instanceInitiatedShutdownBehavior"] == "stop"
    assert instance.inputs["metadataOptions"]["httpTokens"] == "required"
    assert instance.inputs["associatePublicIpAddress"] is False
    assert instance.inputs["monitoring"] is True


def test_root_and_data_volumes_are_encrypted_with_the_given_key(offline: Callable[..., OfflineRun]) -> None:
    key = "arn:aws:kms:eu-west-1:123456789012:key/0000-training"
    run = _run(offline, kms_key_arn=key)
    root = _instance(run).inputs["rootBlockDevice"]
    assert root["encrypted"] is True
    assert root["kmsKeyId"] == key
    (volume,) = run.of_type("aws:ebs/volume:Volume")
    assert volume.inputs["encrypted"] is True
    assert volume.inputs["kmsKeyId"] == key
    assert volume.inputs["type"] == "gp3"


def test_data_volume_is_in_the_instance_zone_and_attached_to_it(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, data_volume_gb=750)
    instance = _instance(run)
    (volume,) = run.of_type("aws:ebs/volume:Volume")
    (attachment,) = run.of_type("aws:ec2/volumeAttachment:VolumeAttachment")
    assert volume.inputs["availabilityZone"] == "eu-west-1b"
    assert instance.inputs["availabilityZone"] == volume.inputs["availabilityZone"]
    assert volume.inputs["size"] == 750
    assert attachment.inputs["instanceId"] == instance.outputs["id"] == run.outputs["instance_id"]
    assert attachment.inputs["volumeId"] == volume.outputs["id"] == run.outputs["data_volume_id"]
    # The box mounts exactly this volume (found by its id) at /data.
    setup, _ = _setup_files(_instance(run).inputs["userData"])
    assert f"data_volume_id={volume.outputs['id']}" in setup


def test_data_volume_survives_instance_replacement_and_new_amis(offline: Callable[..., OfflineRun]) -> None:
    captured: dict[str, pulumi.ResourceOptions] = {}
    run = _run(offline, captured=captured)
    # The volume is its own resource: nothing in it depends on the instance, so replacing the box keeps it.
    (volume,) = run.of_type("aws:ebs/volume:Volume")
    assert _instance(run).outputs["id"] not in json.dumps(volume.inputs)
    # A new AMI or edited user data must not replace a box with data on it.
    ignored = set(captured[INSTANCE].ignore_changes or [])
    assert {"ami", "user_data"} <= ignored
    assert _instance(run).inputs["userDataReplaceOnChange"] is False
    # A volume attaches to one instance at a time: the old attachment must go before the new one is made.
    assert captured["aws:ec2/volumeAttachment:VolumeAttachment"].delete_before_replace is True


def _alarm_queries(run: OfflineRun) -> dict[str, dict[str, Any]]:
    (alarm,) = run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")
    return {q["id"]: q for q in alarm.inputs["metricQueries"]}


def _alarm_value(utilization: float | None, busy: float | None) -> float | None:
    """What the alarm's expression gives for one period (None: no datapoint), as CloudWatch evaluates it."""
    assert IDLE_ALARM_EXPRESSION == "MAX([FILL(utilization, 0), FILL(busy, 0) * 100])"
    if utilization is None and busy is None:
        return None
    return max(utilization or 0.0, (busy or 0.0) * 100)


def test_idle_alarm_stops_the_instance_only_when_idle_by_utilisation_and_busy_heartbeat(
    offline: Callable[..., OfflineRun],
) -> None:
    run = _run(offline, idle_minutes=20, gpu_idle_threshold_percent=7.5)
    (alarm,) = run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")
    a = alarm.inputs
    assert a["alarmActions"] == ["arn:aws:automate:eu-west-1:ec2:stop"]
    assert not {"namespace", "metricName", "statistic", "period"} & set(a)  # a metric-math alarm
    queries = _alarm_queries(run)
    box = {"InstanceId": _instance(run).outputs["id"]}
    utilization, busy = queries["utilization"]["metric"], queries["busy"]["metric"]
    assert (utilization["namespace"], utilization["metricName"]) == ("CWAgent", "nvidia_smi_utilization_gpu")
    assert (busy["namespace"], busy["metricName"]) == (BUSY_NAMESPACE, BUSY_METRIC)
    for metric in (utilization, busy):
        assert metric["dimensions"] == box
        assert (metric["stat"], metric["period"]) == ("Maximum", 300)
    assert [q["id"] for q in queries.values() if q.get("returnData")] == ["activity"]
    assert queries["activity"]["expression"] == IDLE_ALARM_EXPRESSION
    assert a["evaluationPeriods"] == a["datapointsToAlarm"] == 4
    assert a["threshold"] == 7.5
    assert a["comparisonOperator"] == "LessThanThreshold"
    # A box whose agents died publishes nothing: that must count as idle, or it would never stop.
    assert a["treatMissingData"] == "breaching"

    def idle(utilization: float | None, busy: float | None) -> bool:
        value = _alarm_value(utilization, busy)
        return value is None or value < a["threshold"]

    assert idle(2.0, None) and idle(2.0, 0.0) and idle(None, None) and idle(None, 0.0)
    assert not idle(80.0, None)  # the accelerators work
    assert not idle(0.0, 1.0)  # data staging, a CPU phase, or someone logged in
    assert not idle(None, 1.0)  # training on the CPU: no accelerator data at all


def test_the_idle_alarm_has_the_name_the_box_re_arms(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, idle_minutes=20)
    (alarm,) = run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")
    # DescribeAlarmsForMetric does not list metric-math alarms: the re-arm script must name the alarm itself.
    assert alarm.inputs["name"] == "tessera-dev-trainer-idle"
    _, files = _setup_files(_instance(run).inputs["userData"])
    rearm = files["/usr/local/bin/tessera-idle-rearm"]
    assert "--alarm-name 'tessera-dev-trainer-idle' --state-value OK" in rearm
    assert "describe-alarms-for-metric" not in rearm
    assert "OnBootSec=30min" in files["/etc/systemd/system/tessera-idle-rearm.timer"]
    named = _run(offline, idle_alarm_name="prod-training-idle")
    assert named.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")[0].inputs["name"] == "prod-training-idle"


def test_idle_minutes_must_fill_whole_alarm_periods(offline: Callable[..., OfflineRun]) -> None:
    with pytest.raises(ValueError, match="multiple of 5"):
        _run(offline, idle_minutes=12)


def test_functional_tags_let_the_platform_find_and_start_the_box(offline: Callable[..., OfflineRun]) -> None:
    tags = _instance(_run(offline)).inputs["tags"]
    assert tags["tessera:auto-stop"] == "true"
    assert tags["tessera:role"] == "training"
    assert tags["tessera:start-on-demand"] == "true"


def test_no_resource_forces_the_instance_to_run(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline)
    # An InstanceState "running" would restart, on every `pulumi up`, a box that stopped itself.
    assert not [r for r in run.resources if r.type.startswith("aws:ec2/instanceState")]
    assert _instance(run).outputs["id"]


@pytest.mark.parametrize("instance_type", ["m5.large", "c7g.4xlarge", "p3", "dl2q.24xlarge", ""])
def test_unknown_instance_families_are_rejected_naming_the_setting(
    offline: Callable[..., OfflineRun], instance_type: str
) -> None:
    with pytest.raises(ValueError) as err:
        _run(offline, instance_type=instance_type)
    message = str(err.value)
    assert INSTANCE_TYPE_SETTING in message
    assert "p3" in message and "dl1" in message and "trn1" in message


def test_accelerator_follows_the_family() -> None:
    assert accelerator_for("p3.2xlarge") == "nvidia"
    assert accelerator_for("g6e.xlarge") == "nvidia"
    assert accelerator_for("dl1.24xlarge") == "gaudi"
    assert accelerator_for("trn1.32xlarge") == "neuron"


def test_dl1_takes_the_gaudi_path(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, instance_type="dl1.24xlarge")
    assert run.outputs["accelerator"] == "gaudi"
    user_data = _instance(run).inputs["userData"]
    _, files = _setup_files(user_data)
    trainer = files["/usr/local/bin/tessera-trainer"]
    assert "--runtime=habana" in trainer
    assert "HABANA_VISIBLE_DEVICES=all" in trainer
    assert "--gpus" not in user_data
    # No agent plugin exists for Gaudi: the box publishes hl-smi utilisation, and the alarm reads that metric.
    publisher = files["/usr/local/bin/tessera-accelerator-metric"]
    assert "hl-smi" in publisher
    assert ACCELERATOR_NAMESPACE in publisher and ACCELERATOR_UTILIZATION_METRIC in publisher
    assert "OnUnitActiveSec=1min" in files["/etc/systemd/system/tessera-accelerator-metric.timer"]
    assert "tessera-accelerator-metric.timer" in setup_units(user_data)
    utilization = _alarm_queries(run)["utilization"]["metric"]
    assert (utilization["namespace"], utilization["metricName"]) == (
        ACCELERATOR_NAMESPACE,
        ACCELERATOR_UTILIZATION_METRIC,
    )
    # The AMI comes from the Habana Deep Learning AMIs.
    (lookup,) = [args for token, args in run.mocks.calls if token == "aws:ec2/getAmi:getAmi"]
    assert any("Habana" in v for f in lookup["filters"] for v in f["values"])


def test_nvidia_box_runs_the_trainer_with_all_gpus_and_the_gpu_agent(
    offline: Callable[..., OfflineRun],
) -> None:
    user_data = _instance(_run(offline, instance_type="g5.2xlarge")).inputs["userData"]
    _, files = _setup_files(user_data)
    trainer = files["/usr/local/bin/tessera-trainer"]
    assert "args+=(--gpus all)" in trainer
    assert trainer.rstrip().endswith('"$image" worker trainer')
    assert "--runtime=habana" not in user_data
    agent = json.loads(files["/opt/aws/amazon-cloudwatch-agent/etc/tessera.json"])
    assert "nvidia_gpu" in agent["metrics"]["metrics_collected"]
    assert "/usr/local/bin/tessera-accelerator-metric" not in files


def test_volta_boxes_get_an_ami_whose_driver_still_supports_v100(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, instance_type="p3.2xlarge")
    (lookup,) = [args for token, args in run.mocks.calls if token == "aws:ec2/getAmi:getAmi"]
    assert {"name": "name", "values": [VOLTA_AMI_NAME_PATTERN]} in lookup["filters"]
    assert lookup["owners"] == ["amazon"] and lookup["mostRecent"] is True


def test_pinned_ami_skips_the_lookup(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, ami_id="ami-0pinned")
    assert _instance(run).inputs["ami"] == "ami-0pinned"
    assert not [t for t, _ in run.mocks.calls if t == "aws:ec2/getAmi:getAmi"]


def test_ssh_is_admitted_only_from_the_jump_host_group(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline)
    sg = run.outputs["security_group_id"]
    assert _instance(run).inputs["vpcSecurityGroupIds"] == [sg]
    ingress = [r for r in run.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")]
    assert [r.inputs["securityGroupId"] for r in ingress] == [sg]
    (rule,) = ingress
    assert rule.inputs["referencedSecurityGroupId"] == JUMP_SG
    assert (rule.inputs["ipProtocol"], rule.inputs["fromPort"], rule.inputs["toPort"]) == ("tcp", 22, 22)
    assert not {"cidrIpv4", "cidrIpv6", "prefixListId"} & set(rule.inputs)
    assert not run.of_type("aws:ec2/securityGroupRule:SecurityGroupRule")
    (group,) = run.of_type("aws:ec2/securityGroup:SecurityGroup")
    assert not group.inputs.get("ingress")


def test_without_a_jump_host_nothing_can_connect_in(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, ssh_source_security_group_id=None)
    assert not run.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")


def test_image_and_environment_reach_the_box_through_ssm(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline)
    (parameter,) = run.of_type("aws:ssm/parameter:Parameter")
    config = json.loads(_plain(parameter.inputs["value"]))
    assert config["image"] == IMAGE
    assert config["environment"] == dict(_args().environment)
    user_data = _instance(run).inputs["userData"]
    # The box reads the parameter at each start; the image itself is not in the (ignored) user data.
    assert (
        f"parameter='{parameter.inputs['name']}'"
        in _setup_files(user_data)[1]["/usr/local/bin/tessera-trainer"]
    )
    assert IMAGE not in user_data


@pytest.mark.parametrize("instance_type", ["p4d.24xlarge", "dl1.24xlarge", "trn1.32xlarge"])
def test_user_data_is_valid_bash_within_the_ec2_limit(
    offline: Callable[..., OfflineRun], instance_type: str
) -> None:
    user_data = _instance(_run(offline, instance_type=instance_type)).inputs["userData"]
    assert len(user_data.encode()) < 16 * 1024
    setup, files = _setup_files(user_data)
    scripts = [user_data, setup] + [
        body for path, body in files.items() if path.startswith("/usr/local/bin/")
    ]
    assert len(scripts) >= 4
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    for script in scripts:
        checked = subprocess.run([bash, "-n"], input=script, text=True, capture_output=True, check=False)
        assert checked.returncode == 0, checked.stderr


def test_role_statements_grant_the_box_only_its_own_parameter_and_alarm(
    offline: Callable[..., OfflineRun],
) -> None:
    def program() -> dict[str, Any]:
        box = TrainingInstance("trainer", _args(instance_type="dl1.24xlarge"))
        return {"statements": pulumi.Output.json_dumps(box.role_statements)}

    run = offline(program, config={"aws:region": "eu-west-1"})
    statements = {s["Sid"]: s for s in json.loads(run.outputs["statements"])}
    (parameter,) = run.of_type("aws:ssm/parameter:Parameter")
    (alarm,) = run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")
    assert statements["ReadTrainerConfig"]["Action"] == ["ssm:GetParameter"]
    assert statements["ReadTrainerConfig"]["Resource"] == parameter.outputs["arn"]
    assert statements["RearmIdleAlarm"]["Action"] == ["cloudwatch:SetAlarmState"]
    assert statements["RearmIdleAlarm"]["Resource"] == alarm.outputs["arn"]
    namespaces = statements["PublishUtilization"]["Condition"]["StringEquals"]["cloudwatch:namespace"]
    assert ACCELERATOR_NAMESPACE in namespaces
    assert BUSY_NAMESPACE not in namespaces


def test_the_box_may_publish_its_busy_heartbeat_in_that_namespace_only(
    offline: Callable[..., OfflineRun],
) -> None:
    def program() -> dict[str, Any]:
        box = TrainingInstance("trainer", _args())
        return {"statements": pulumi.Output.json_dumps(box.role_statements)}

    statements = json.loads(offline(program, config={"aws:region": "eu-west-1"}).outputs["statements"])
    (busy,) = [s for s in statements if s["Sid"] == "PublishBusyHeartbeat"]
    assert busy["Action"] == ["cloudwatch:PutMetricData"]
    assert busy["Condition"] == {"StringEquals": {"cloudwatch:namespace": BUSY_NAMESPACE}}
    assert wildcard_violations({"Statement": statements}) == []
    # Nothing left that only the old, metric-based re-arm needed.
    assert not [s for s in statements if "cloudwatch:DescribeAlarmsForMetric" in s["Action"]]


def test_the_trainer_knows_its_instance_id_to_publish_its_heartbeat(
    offline: Callable[..., OfflineRun],
) -> None:
    _, files = _setup_files(_instance(_run(offline)).inputs["userData"])
    trainer = files["/usr/local/bin/tessera-trainer"]
    assert '-e TESSERA_INSTANCE_ID="$instance_id"' in trainer
    assert trainer.index("instance_id=$(curl") < trainer.index("TESSERA_INSTANCE_ID")
    # The agent and the safety net read the metric the trainer and the agent write.
    assert (idle.BUSY_NAMESPACE, idle.BUSY_METRIC) == (BUSY_NAMESPACE, BUSY_METRIC)


def test_the_instance_joins_the_trainer_service_group_the_database_admits(
    offline: Callable[..., OfflineRun],
) -> None:
    run = _run(offline, service_security_group_ids=["sg-0trainer000000000"])
    groups = _instance(run).inputs["vpcSecurityGroupIds"]
    assert groups == [run.outputs["security_group_id"], "sg-0trainer000000000"]
    # Joining the service group adds no ingress to the box.
    ingress = run.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")
    assert [r.inputs["securityGroupId"] for r in ingress] == [run.outputs["security_group_id"]]


def test_the_data_volume_is_scratch_with_no_final_snapshot_and_the_trainer_can_write_it(
    offline: Callable[..., OfflineRun],
) -> None:
    run = _run(offline)
    (volume,) = run.of_type("aws:ebs/volume:Volume")
    # Datasets and checkpoints live in S3; the volume caches them, and a destroy must not bill for a copy.
    assert volume.inputs.get("finalSnapshot") is False
    setup, files = _setup_files(_instance(run).inputs["userData"])
    assert "chown 10001:10001 /data" in setup.splitlines()
    assert setup.index("mount /data") < setup.index('resize2fs "$device"')  # a grown volume is usable
    assert setup.index("mount /data") < setup.index("chown 10001:10001 /data")
    assert "-e TESSERA_DATA_DIR=/data" in files["/usr/local/bin/tessera-trainer"]


def test_infra_copies_of_the_idle_agent_unit_and_wrapper_match_the_agent() -> None:
    # infra imports no services code, so it keeps copies; they must not drift from the agent's own.
    assert IDLE_AGENT_UNIT == idle.SYSTEMD_UNIT
    assert IDLE_AGENT_WRAPPER == idle.WRAPPER_SCRIPT
    assert str(idle.DEFAULT_TRAINER_STATE) == TRAINER_STATE_FILE
    assert TRAINER_STATE_FILE.startswith(TRAINER_STATE_DIR + "/")


@pytest.mark.parametrize("instance_type", ["g5.2xlarge", "trn1.32xlarge"])
def test_the_box_installs_and_enables_its_idle_agent_and_shares_the_state_file(
    offline: Callable[..., OfflineRun], instance_type: str
) -> None:
    user_data = _instance(
        _run(offline, instance_type=instance_type, idle_minutes=20, agent_idle_minutes=7)
    ).inputs["userData"]
    setup, files = _setup_files(user_data)
    # The agent's wrapper and unit, as the agent defines them, with this box's region and idle period.
    wrapper = idle.WRAPPER_SCRIPT.replace("@REGION@", "eu-west-1").replace("@IDLE_MINUTES@", "7")
    assert files["/usr/local/bin/tessera-idle-agent"] == wrapper.rstrip("\n")
    assert "install -D -m 0755 /dev/stdin /usr/local/bin/tessera-idle-agent <<" in setup
    assert files["/etc/systemd/system/tessera-idle.service"] == idle.SYSTEMD_UNIT.rstrip("\n")
    assert "tessera-idle.service" in setup_units(user_data).split()
    # /run is a tmpfs: the state directory is made at every boot, writable by the trainer image's user.
    made = "install -d -m 0755 -o 10001 -g 10001 /run/tessera"
    assert made in setup.splitlines()
    assert setup.index(made) < setup.index("systemctl --no-block enable --now")
    # The trainer writes the state file where the agent reads it.
    trainer = files["/usr/local/bin/tessera-trainer"]
    assert "-v /run/tessera:/run/tessera " in trainer
    assert f"-e TESSERA_TRAINER_STATE={idle.DEFAULT_TRAINER_STATE}" in trainer
    assert "-v /run/tessera:/run/tessera:ro" in wrapper
    # The wrapper runs the agent from the image the trainer start script resolved.
    image_file = re.search(r"image=\$\(cat (\S+)\)", wrapper)
    assert image_file is not None
    assert f"printf '%s\\n' \"$image\" > {image_file.group(1)}" in trainer
    assert trainer.index(image_file.group(1)) < trainer.index("exec docker run")


def test_agent_idle_minutes_must_be_positive(offline: Callable[..., OfflineRun]) -> None:
    with pytest.raises(ValueError, match="agent_idle_minutes"):
        _run(offline, agent_idle_minutes=0)


def test_the_box_may_stop_only_itself(offline: Callable[..., OfflineRun]) -> None:
    def program() -> dict[str, Any]:
        box = TrainingInstance("trainer", _args())
        return {"statements": pulumi.Output.json_dumps(box.role_statements)}

    run = offline(program, config={"aws:region": "eu-west-1"})
    statements = json.loads(run.outputs["statements"])
    stopping = [s for s in statements if any("StopInstances" in a for a in s["Action"])]
    assert stopping == [
        {
            "Sid": "StopSelf",
            "Effect": "Allow",
            "Action": ["ec2:StopInstances"],
            "Resource": _instance(run).outputs["arn"],
        }
    ]
    assert ":instance/" in _instance(run).outputs["arn"]
    assert wildcard_violations({"Statement": stopping}) == []
