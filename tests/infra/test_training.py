"""The training instance: stops (never terminates) when idle, keeps its data, admits only the jump host."""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pulumi
import pytest

from infra import training_boot
from infra.cloudwatch_agent import ACCELERATOR_NAMESPACE, ACCELERATOR_UTILIZATION_METRIC
from infra.iam import wildcard_violations
from infra.instances import PLACEHOLDER
from infra.training import (
    AMI_NAME_PATTERNS,
    GAUDI_SYNAPSE_VERSION,
    INSTANCE_TYPE_SETTING,
    VOLTA_AMI_NAME_PATTERN,
    TrainingInstance,
    TrainingInstanceArgs,
    accelerator_for,
)
from infra.training_boot import (
    ACTIVITY_BUSY,
    ACTIVITY_CHECK,
    ACTIVITY_CHECK_PATH,
    ACTIVITY_METRIC,
    ACTIVITY_NAMESPACE,
    BUSY_METRIC,
    BUSY_NAMESPACE,
    IDLE_AGENT_DIR,
    TRAINER_STATE_DIR,
    TRAINER_STATE_FILE,
)
from services.trainer import idle
from stacks.offline import Declared, OfflineRun

IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/tessera/trainer@sha256:" + "a" * 64
JUMP_SG = "sg-0jumphost0000000"
INSTANCE = "aws:ec2/instance:Instance"
SECRET_SENTINEL = "4dabf18193072939515e22adb298388d"
ROOT = Path(__file__).resolve().parents[2]
PUBLISHER = "/usr/local/bin/tessera-activity-metric"


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


def _alarm(run: OfflineRun) -> dict[str, Any]:
    (alarm,) = run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")
    return dict(alarm.inputs)


_EC2_ACTION = re.compile(r"^arn:aws[a-z0-9-]*:automate:[a-z0-9-]+:ec2:(stop|terminate|reboot|recover)$")


def test_idle_alarm_stops_the_box_from_one_per_instance_metric_as_ec2_actions_require(
    offline: Callable[..., OfflineRun],
) -> None:
    run = _run(offline, idle_minutes=20, gpu_idle_threshold_percent=7.5)
    a = _alarm(run)
    assert a["alarmActions"] == ["arn:aws:automate:eu-west-1:ec2:stop"]
    # PutMetricAlarm refuses an EC2 action unless the alarm watches one metric of one instance ("An EC2 action
    # can only be used if the alarm is monitoring an EC2 instance"); the CDK checks the same: one metric whose
    # only dimension is InstanceId. No metric math, then.
    assert all(_EC2_ACTION.match(action) for action in a["alarmActions"])
    assert not a.get("metricQueries")
    assert (a["namespace"], a["metricName"]) == (ACTIVITY_NAMESPACE, ACTIVITY_METRIC)
    assert a["dimensions"] == {"InstanceId": _instance(run).outputs["id"]}
    assert (a["statistic"], a["period"]) == ("Maximum", 300)
    assert a["evaluationPeriods"] == a["datapointsToAlarm"] == 4
    assert a["threshold"] == 7.5
    assert a["comparisonOperator"] == "LessThanThreshold"
    # A box whose publisher died sends nothing: that must count as idle, or it would never stop.
    assert a["treatMissingData"] == "breaching"
    # A busy box reports a value no threshold reaches.
    assert ACTIVITY_BUSY == 100.0 > a["threshold"]


# --- the box's activity: what the alarm's one metric says ---------------------------------------------------

NOW = 1_780_000_000.0


def _proc(root: Path, *, tcp: Sequence[tuple[int, str]] = (), sessions: int = 0) -> Path:
    """A fake /proc: ``tcp`` (local port, state) rows in /proc/net/tcp6, ``sessions`` SSM session workers."""
    proc = root / "proc"
    (proc / "net").mkdir(parents=True)
    header = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    )
    (proc / "net" / "tcp").write_text(
        header + "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:0\n"
    )
    rows = [
        f"   {i}: {'0' * 24}01000000:{port:04X} 0000000000000000FFFF00000A000001:D431 {state} x\n"
        for i, (port, state) in enumerate(tcp)
    ]
    (proc / "net" / "tcp6").write_text(header + "".join(rows))
    for pid, comm in enumerate(["systemd", "sshd", "python3"] + ["ssm-session-worker"] * sessions, start=1):
        (proc / str(pid)).mkdir()
        (proc / str(pid) / "comm").write_text(comm + "\n")
    return proc


def _state(root: Path, body: str | None) -> Path:
    path = root / "trainer-state.json"
    if body is not None:
        path.write_text(body)
    return path


def _trainer_state(*, busy: bool, age_s: float) -> str:
    from datetime import UTC, datetime

    updated = datetime.fromtimestamp(NOW - age_s, tz=UTC).isoformat()
    return json.dumps({"busy": busy, "job_id": "job-1" if busy else None, "updated": updated})


def _activity(tmp_path: Path, readings: str, state: Path, proc: Path) -> float:
    check = tmp_path / "tessera-activity"
    check.write_text(ACTIVITY_CHECK)
    argv = [sys.executable, str(check), "--state", str(state), "--proc", str(proc), "--now", str(NOW)]
    done = subprocess.run(argv, input=readings, text=True, capture_output=True, check=True, timeout=30)
    return float(done.stdout)


_CASES: dict[str, tuple[str | None, dict[str, Any]]] = {
    "nothing": (None, {}),
    "trainer idle": (_trainer_state(busy=False, age_s=5), {}),
    "job running": (_trainer_state(busy=True, age_s=30), {}),
    "trainer died mid-job": (_trainer_state(busy=True, age_s=700), {}),
    "ssh session": (None, {"tcp": [(22, "01")]}),
    "ssh listening only": (None, {"tcp": [(22, "0A"), (443, "01")]}),
    "session manager": (None, {"sessions": 1}),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_the_activity_is_busy_exactly_when_the_idle_agent_would_see_a_job_or_a_login(
    tmp_path: Path, case: str
) -> None:
    body, proc_args = _CASES[case]
    state, proc = _state(tmp_path, body), _proc(tmp_path, **proc_args)
    # The agent's own decision on the same box, with the queue empty (the alarm does not read the queue).
    observation = idle.Observation(
        queued=0, trainer=idle.read_trainer_state(state), sessions=idle.login_sessions(proc)
    )
    agent_busy = bool(idle.busy_reasons(observation, NOW))
    assert _activity(tmp_path, "", state, proc) == (ACTIVITY_BUSY if agent_busy else 0.0)
    # Busy or not, a working accelerator speaks for itself.
    assert _activity(tmp_path, "3\n85\n12\n", state, proc) == (ACTIVITY_BUSY if agent_busy else 85.0)
    expected_busy = case in {"job running", "ssh session", "session manager"}
    assert agent_busy is expected_busy


def test_the_activity_ignores_what_is_not_a_reading_and_a_broken_state_file(tmp_path: Path) -> None:
    proc = _proc(tmp_path)
    nvidia_down = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n[N/A]\n"
    assert _activity(tmp_path, nvidia_down, _state(tmp_path, None), proc) == 0.0
    assert _activity(tmp_path, "4.5\n[N/A]\n", _state(tmp_path, None), proc) == 4.5
    # The agent counts an unreadable state file as busy (stopping by mistake interrupts work); the safety net
    # must not: a box whose trainer is broken that way is still stopped.
    assert _activity(tmp_path, "", _state(tmp_path, "{not json"), proc) == 0.0


def test_the_activity_check_runs_on_the_hosts_python() -> None:
    # Amazon Linux 2023 ships Python 3.9, Ubuntu 22.04 3.10: nothing newer than 3.8 in the script.
    ast.parse(ACTIVITY_CHECK, feature_version=(3, 8))
    assert ACTIVITY_CHECK.startswith("#!/usr/bin/python3\n")
    assert "datetime.UTC" not in ACTIVITY_CHECK and "from datetime import UTC" not in ACTIVITY_CHECK
    # The same staleness rule as the agent's.
    assert f"stale_after_s={idle.STALE_AFTER_S}" in ACTIVITY_CHECK
    assert f'"{idle.SESSION_WORKER}"' in ACTIVITY_CHECK and f"== {idle.SSH_PORT}" in ACTIVITY_CHECK


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


_READINGS: dict[str, tuple[str, str]] = {
    # accelerator: (stub command, what it prints)
    "nvidia": ("nvidia-smi", "printf '3\\n41\\n7\\n'"),
    "gaudi": ("hl-smi", "printf '3 %%\\n41 %%\\n'"),
    "neuron": (
        "neuron-monitor",
        'echo \'{"neuron_runtime_data": [{"report": {"neuroncore_counters": {"neuroncores_in_use": '
        '{"0": {"neuroncore_utilization": 41.0}, "1": {"neuroncore_utilization": 3.0}}}}}]}\'',
    ),
}


@pytest.mark.parametrize("accelerator", ["nvidia", "gaudi", "neuron"])
@pytest.mark.parametrize("job", [False, True])
def test_every_box_publishes_its_activity_every_minute(
    offline: Callable[..., OfflineRun], tmp_path: Path, accelerator: str, job: bool
) -> None:
    instance_type = {"nvidia": "g5.2xlarge", "gaudi": "dl1.24xlarge", "neuron": "trn1.32xlarge"}[accelerator]
    user_data = _instance(_run(offline, instance_type=instance_type)).inputs["userData"]
    _, files = _setup_files(user_data)
    assert files[ACTIVITY_CHECK_PATH] == ACTIVITY_CHECK.rstrip("\n")
    assert "OnUnitActiveSec=1min" in files["/etc/systemd/system/tessera-activity-metric.timer"]
    assert "tessera-activity-metric.timer" in setup_units(user_data).split()
    # Run the publisher as the timer would, with the accelerator's tool, IMDS and the AWS CLI stubbed.
    bin_dir, calls = tmp_path / "bin", tmp_path / "aws-calls"
    bin_dir.mkdir()
    tool, prints = _READINGS[accelerator]
    _stub(bin_dir, tool, prints)
    _stub(bin_dir, "curl", "echo i-0123456789abcdef0")
    _stub(bin_dir, "aws", f'echo "$*" >> {calls}')
    check = tmp_path / "tessera-activity"
    check.write_text(ACTIVITY_CHECK)
    state = _state(tmp_path, _trainer_state(busy=True, age_s=0) if job else None)
    proc = _proc(tmp_path)
    check_call = f"{ACTIVITY_CHECK_PATH} --state {TRAINER_STATE_FILE}"
    publisher = files[PUBLISHER]
    assert check_call in publisher
    script = publisher.replace(
        check_call, f"{sys.executable} {check} --state {state} --proc {proc} --now {NOW}"
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    published = [_put(call) for call in calls.read_text().splitlines()]
    box = "InstanceId=i-0123456789abcdef0"
    assert published[0] == (ACTIVITY_NAMESPACE, ACTIVITY_METRIC, ACTIVITY_BUSY if job else 41.0, box)
    # Gaudi and Neuron have no agent plugin: the box publishes their utilisation too, which the safety net
    # reads; the agent publishes NVIDIA's.
    if accelerator == "nvidia":
        assert len(published) == 1
    else:
        assert published[1:] == [(ACCELERATOR_NAMESPACE, ACCELERATOR_UTILIZATION_METRIC, 41.0, box)]


def _put(call: str) -> tuple[str, str, float, str]:
    """(namespace, metric, value, dimensions) of one stubbed ``aws cloudwatch put-metric-data`` call."""
    words = call.split()
    assert words[:2] == ["cloudwatch", "put-metric-data"] and words[words.index("--unit") + 1] == "Percent"

    def option(name: str) -> str:
        return words[words.index(name) + 1]

    return option("--namespace"), option("--metric-name"), float(option("--value")), option("--dimensions")


def test_the_idle_alarm_has_the_name_the_box_re_arms(offline: Callable[..., OfflineRun]) -> None:
    run = _run(offline, idle_minutes=20)
    (alarm,) = run.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")
    # The box re-arms its own alarm by name, with no lookup (and no right to list alarms).
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
    # No agent plugin exists for Gaudi: the box reads hl-smi itself.
    assert "hl-smi --query-aip=utilization.aip" in files[PUBLISHER]
    # The AMI comes from the Habana Deep Learning AMIs whose driver is the trainer image's SynapseAI release.
    (lookup,) = [args for token, args in run.mocks.calls if token == "aws:ec2/getAmi:getAmi"]
    assert {"name": "name", "values": [AMI_NAME_PATTERNS["gaudi"]]} in lookup["filters"]
    assert lookup["owners"] == ["amazon"] and lookup["mostRecent"] is True


def test_the_gaudi_ami_and_driver_check_follow_the_trainer_images_synapse_release() -> None:
    dockerfile = (ROOT / "images" / "trainer-gaudi.Dockerfile").read_text(encoding="utf-8")
    releases = set(re.findall(r"gaudi-docker/(\d+\.\d+)\.\d+/", dockerfile))
    assert releases == {GAUDI_SYNAPSE_VERSION}
    pattern = AMI_NAME_PATTERNS["gaudi"]
    assert f"SynapseAI {GAUDI_SYNAPSE_VERSION}." in pattern
    # EC2 name filters match like fnmatch (* and ?): this release's AMIs, none of another's.
    release = GAUDI_SYNAPSE_VERSION
    for name, wanted in {
        f"Deep Learning AMI Habana PyTorch 2.6.0 SynapseAI {release}.3 (Ubuntu 22.04) 20250612": True,
        f"Deep Learning Base AMI Habana SynapseAI {release}.0 (Ubuntu 22.04) 20250501": True,
        "Deep Learning AMI Habana PyTorch 2.7.1 SynapseAI 1.22.0 (Ubuntu 22.04) 20250801": False,
        "Deep Learning AMI Habana PyTorch 1.12.0 SynapseAI 1.2.0 (Ubuntu 20.04) 20220915": False,
        "Deep Learning AMI Neuron (Ubuntu 22.04) 20250601": False,
    }.items():
        assert fnmatch.fnmatchcase(name, pattern) is wanted, name


def _driver_check(setup: str) -> str:
    start = setup.index("# --- Gaudi: Habana's host driver")
    return setup[start : setup.index("esac\n", start) + len("esac\n")]


@pytest.mark.parametrize(
    ("driver", "matches"),
    [
        (f"{GAUDI_SYNAPSE_VERSION}.3-a1b2c3d", True),
        (f"{GAUDI_SYNAPSE_VERSION}.0", True),
        ("1.22.0-5f6e7d8", False),
        ("1.2.1-0123abc", False),
        ("", False),  # no hl-smi, no driver
    ],
)
def test_the_gaudi_box_checks_its_habana_driver_at_boot(
    offline: Callable[..., OfflineRun], tmp_path: Path, driver: str, matches: bool
) -> None:
    setup, _ = _setup_files(_instance(_run(offline, instance_type="dl1.24xlarge")).inputs["userData"])
    check = _driver_check(setup)
    assert "hl-smi -Q driver_version -f csv,noheader" in check
    assert setup.index(check) < setup.index("systemctl --no-block enable --now")
    bin_dir, logged = tmp_path / "bin", tmp_path / "logged"
    bin_dir.mkdir()
    if driver:
        _stub(bin_dir, "hl-smi", f"printf '{driver}\\n{driver}\\n'")
    _stub(bin_dir, "logger", f'echo "$*" >> {logged}')
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    done = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + check],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr  # the box boots either way; the trainer reports the failure
    if matches:
        assert "matches" in done.stdout and not done.stderr and not logged.exists()
    else:
        assert done.stderr.startswith("ERROR: Habana driver")
        assert f"SynapseAI {GAUDI_SYNAPSE_VERSION}" in done.stderr and "GAUDI_SYNAPSE_VERSION" in done.stderr
        assert "-p user.err -t tessera-training ERROR: Habana driver" in logged.read_text()


def test_only_the_gaudi_box_checks_a_habana_driver(offline: Callable[..., OfflineRun]) -> None:
    for instance_type in ("g5.2xlarge", "trn1.32xlarge"):
        setup, _ = _setup_files(_instance(_run(offline, instance_type=instance_type)).inputs["userData"])
        assert "hl-smi" not in setup


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
    # The activity publisher reads the GPUs itself; their utilisation metric is the agent's.
    assert "nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits" in files[PUBLISHER]
    assert ACCELERATOR_UTILIZATION_METRIC not in files[PUBLISHER]


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
        body
        for path, body in files.items()
        if path.startswith("/usr/local/bin/") and body.startswith("#!/bin/bash\n")
    ]
    assert len(scripts) >= 5
    assert files[ACTIVITY_CHECK_PATH].startswith("#!/usr/bin/python3\n")  # run as Python by its tests
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
    assert namespaces == sorted(["CWAgent", ACCELERATOR_NAMESPACE])
    assert BUSY_NAMESPACE not in namespaces


def test_the_box_may_publish_its_activity_and_busy_heartbeat_in_that_namespace_only(
    offline: Callable[..., OfflineRun],
) -> None:
    def program() -> dict[str, Any]:
        box = TrainingInstance("trainer", _args())
        return {"statements": pulumi.Output.json_dumps(box.role_statements)}

    statements = json.loads(offline(program, config={"aws:region": "eu-west-1"}).outputs["statements"])
    assert ACTIVITY_NAMESPACE == BUSY_NAMESPACE
    (activity,) = [s for s in statements if s["Sid"] == "PublishActivity"]
    assert activity["Action"] == ["cloudwatch:PutMetricData"]
    assert activity["Condition"] == {"StringEquals": {"cloudwatch:namespace": BUSY_NAMESPACE}}
    # An NVIDIA box publishes no utilisation of its own: the agent's namespace only.
    (utilization,) = [s for s in statements if s["Sid"] == "PublishUtilization"]
    assert utilization["Condition"] == {"StringEquals": {"cloudwatch:namespace": ["CWAgent"]}}
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


def test_the_box_gets_the_idle_agents_own_unit_and_wrapper_files() -> None:
    # One source: the files beside the agent (services/trainer/host/), which infra reads as files (it imports
    # no services code). The agent's image carries them as package data, the box gets them in its user data.
    assert IDLE_AGENT_DIR.resolve() == idle.HOST_DIR.resolve()
    shipped = sorted(p.name for p in idle.HOST_DIR.iterdir())
    assert shipped == ["tessera-idle-agent", "tessera-idle.service"]
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for name in shipped:
        inside = (idle.HOST_DIR / name).relative_to(ROOT / "services").as_posix()
        assert any(fnmatch.fnmatch(inside, pattern) for pattern in patterns["services"]), inside
    # The wrapper's placeholders are the ones the box's user data fills; the unit has none.
    assert set(PLACEHOLDER.findall(idle.WRAPPER_SCRIPT)) == {"REGION", "IDLE_MINUTES"}
    assert PLACEHOLDER.findall(idle.SYSTEMD_UNIT) == []
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


def test_every_boot_template_is_used_and_nothing_reaches_the_box_unfilled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read: set[str] = set()
    template = training_boot.template

    def recording(name: str) -> str:
        read.add(name)
        return template(name)

    monkeypatch.setattr(training_boot, "template", recording)
    for accelerator in ("nvidia", "gaudi", "neuron"):
        user_data = training_boot.render_user_data(
            accelerator=accelerator,
            region="eu-west-1",
            data_volume_id="vol-0123",
            config_parameter_name="/tessera/test/trainer/config",
            log_group_name="/tessera/training",
            agent_config="{}",
            idle_minutes=15,
        )
        assert PLACEHOLDER.search(user_data) is None, accelerator
    # ACTIVITY_CHECK is read once, at import.
    assert read | {"tessera-activity"} == {p.name for p in training_boot.BOOT_DIR.iterdir()}
