"""One on-demand training instance: a GPU/accelerator box that trains, and stops itself when idle.

The box is started by the platform when training work exists (it finds it by its functional tags), runs the
trainer container at every boot, and stops itself: its idle agent (``services.trainer.idle``, run from the
trainer image by ``tessera-idle.service``) stops it once no job is queued or running and no one is logged in
for ``agent_idle_minutes``, and a CloudWatch alarm, the safety net, stops it once it has been idle for
``idle_minutes``. Busy is more than accelerator utilisation, and an alarm whose action stops an instance may
watch only one metric of that instance (no metric math), so the box itself folds every signal into one
metric: a host timer publishes :data:`ACTIVITY_METRIC` every minute, the busiest accelerator's utilisation, or
100 while the trainer runs a job (data staging included) or someone is logged in (SSH or Session Manager),
decided as the idle agent decides it. The alarm stops the box when that stays below the threshold, or goes
silent. The trainer and the idle agent also publish a busy heartbeat (:data:`BUSY_NAMESPACE` /
:data:`BUSY_METRIC`), which the safety-net Lambda (``services/autostop``) reads. Its data volume is a separate
EBS volume of scratch cache (staged datasets, cached checkpoints: both live in S3), so that a replaced
instance finds the cache of the one before it; it is not snapshotted on destroy.

What the instance's role needs (the stack grants it; :attr:`TrainingInstance.role_statements` lists the part
specific to this component):
``ssm:GetParameter`` on :attr:`TrainingInstance.config_parameter_arn`; ECR pull for the trainer image;
``cloudwatch:PutMetricData`` (the agent, the Gaudi/Neuron utilisation; the activity metric and the busy
heartbeat in :data:`BUSY_NAMESPACE` only); ``cloudwatch:SetAlarmState`` on the idle alarm (the re-arm timer,
see :func:`render_user_data`); ``ec2:StopInstances`` on the instance itself (the idle agent);
``sqs:GetQueueAttributes`` on the training queue (the idle agent, granted with the trainer's consume rights);
and ``logs:CreateLogStream`` / ``logs:PutLogEvents`` on ``log_group_name``
when one is given.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pulumi
import pulumi_aws as aws

from infra.cloudwatch_agent import (
    ACCELERATOR_NAMESPACE,
    ACCELERATOR_UTILIZATION_METRIC,
    AGENT_NAMESPACE,
    agent_config_json,
)
from infra.instances import (
    allow_egress_anywhere,
    allow_tcp_from_group,
    encrypted_root_volume,
    imdsv2_metadata_options,
    newest_amazon_ami,
)

Accelerator = Literal["nvidia", "gaudi", "neuron"]

INSTANCE_TYPE_SETTING = "tessera:trainingInstanceType"
"""The stack setting that chooses the instance type; named in validation errors so users know what to fix."""

FAMILY_ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA: Volta (p3), Turing (g4dn), Ampere (p4d, g5), Ada (g6, g6e, gr6), Hopper (p5*), Blackwell (p6).
    "p3": "nvidia",
    "p3dn": "nvidia",
    "p4d": "nvidia",
    "p4de": "nvidia",
    "p5": "nvidia",
    "p5e": "nvidia",
    "p5en": "nvidia",
    "p6-b200": "nvidia",
    "g4dn": "nvidia",
    "g5": "nvidia",
    "g6": "nvidia",
    "g6e": "nvidia",
    "gr6": "nvidia",
    # Intel Habana Gaudi.
    "dl1": "gaudi",
    # AWS Trainium / Inferentia 2 (Neuron SDK).
    "trn1": "neuron",
    "trn1n": "neuron",
    "trn2": "neuron",
    "inf2": "neuron",
}
"""Instance families that can train, and the accelerator each carries. ``dl2q`` (Qualcomm AI 100) is left out:
it is an inference-only part with no training stack and no container runtime path here."""

ACCELERATOR_FAMILIES: tuple[str, ...] = tuple(FAMILY_ACCELERATORS)
"""The family names alone, in table order (what settings validation offers)."""

VOLTA_FAMILIES = frozenset({"p3", "p3dn"})
"""Families whose GPUs (V100) newer NVIDIA drivers (590 and later) no longer support."""

GAUDI_SYNAPSE_VERSION = "1.21"
"""The Intel Gaudi software (SynapseAI) release of the Gaudi trainer image (``gaudi-docker/<version>.x/`` in
``images/trainer-gaudi.Dockerfile``; a test keeps them equal), the last release for first-generation Gaudi
(DL1). Habana's host driver must be of the container's SynapseAI release, so the AMI is pinned to it and the
box checks its driver at boot."""

AMI_NAME_PATTERNS: dict[Accelerator, str] = {
    "nvidia": "Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Amazon Linux 2023) *",
    # Habana DLAMIs are named "Deep Learning AMI Habana <framework> <version> SynapseAI <x.y.z> (<OS>)
    # <date>": the newest one whose driver is of the trainer image's release, never simply the newest.
    "gaudi": f"Deep Learning*Habana*SynapseAI {GAUDI_SYNAPSE_VERSION}.*",
    "neuron": "Deep Learning AMI Neuron *",
}
"""AWS Deep Learning AMI name patterns per accelerator (newest match wins)."""

VOLTA_AMI_NAME_PATTERN = "Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.6* (Amazon Linux 2023) *"
"""The newest DLAMI line that still ships a driver (580) for V100; the current lines list no P3 support."""

DATA_MOUNT = "/data"
DATA_DEVICE_NAME = "/dev/sdf"
TRAINER_CONTAINER = "tessera-trainer"
TRAINER_UID = 10001
"""The trainer image's user (``images/trainer.Dockerfile``): it writes the trainer state file."""
TRAINER_STATE_DIR = "/run/tessera"
TRAINER_STATE_FILE = f"{TRAINER_STATE_DIR}/trainer-state.json"
"""Where the trainer says whether it is busy and the idle agent reads it (``services.trainer.idle``)."""
TRAINER_IMAGE_FILE = "/etc/tessera/trainer.image"
"""The image the trainer start script resolved from SSM; the idle agent's wrapper runs the agent from it."""
IDLE_AGENT_PATH = "/usr/local/bin/tessera-idle-agent"
BUSY_NAMESPACE = "tessera/Training"
"""The busy heartbeat's namespace (copy of ``services.trainer.idle.BUSY_NAMESPACE``, kept equal by a test)."""
BUSY_METRIC = "Busy"
"""1 while the trainer runs a job, data staging included, or anyone is logged in; dimension ``InstanceId``."""
ACTIVITY_NAMESPACE = BUSY_NAMESPACE
ACTIVITY_METRIC = "Activity"
"""The idle alarm's one metric (dimension ``InstanceId`` only, as EC2 alarm actions require), published every
minute by the box's host timer: the busiest accelerator's utilisation in percent, or :data:`ACTIVITY_BUSY`
while a job runs or someone is logged in."""
ACTIVITY_BUSY = 100.0
"""The activity of a box with a job or a login: a percentage no idle threshold reaches."""
ACTIVITY_CHECK_PATH = "/usr/local/bin/tessera-activity"
IDLE_AGENT_UNIT_PATH = "/etc/systemd/system/tessera-idle.service"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def accelerator_for(instance_type: str) -> Accelerator:
    """The accelerator of ``instance_type`` (``p3.2xlarge`` -> ``nvidia``); a ValueError says what to set."""
    family, dot, size = instance_type.partition(".")
    accelerator = FAMILY_ACCELERATORS.get(family) if dot and size else None
    if accelerator is None:
        families = ", ".join(ACCELERATOR_FAMILIES)
        raise ValueError(
            f"{INSTANCE_TYPE_SETTING}: {instance_type!r} is not an instance type tessera can train on. "
            f"Set it to a size of one of these GPU/accelerator families: {families} "
            "(for example p3.2xlarge for development, dl1.24xlarge for Gaudi)."
        )
    return accelerator


@dataclass
class TrainingInstanceArgs:
    """Settings of one training instance."""

    vpc_id: pulumi.Input[str]
    """The VPC the instance's security group belongs to."""
    subnet_id: pulumi.Input[str]
    """A private subnet (the instance gets no public IP)."""
    instance_profile_name: pulumi.Input[str]
    """Instance profile whose role can read the config parameter, pull the image and publish metrics."""
    image_ref: pulumi.Input[str]
    """The trainer container image (registry/repo@sha256:... or :tag); read at every boot, never baked in."""
    region: str
    """The AWS region (the alarm's stop action and the on-box CLI calls name it)."""
    instance_type: str = "p3.2xlarge"
    """Instance type; its family must be in ``FAMILY_ACCELERATORS``."""
    ami_id: str | None = None
    """A pinned AMI; None looks up the newest AWS Deep Learning AMI for the accelerator."""
    availability_zone: pulumi.Input[str] | None = None
    """The subnet's availability zone; None looks it up from the subnet. The data volume is created here."""
    root_volume_gb: int = 100
    """Root volume size (the DLAMIs need ~75 GB; container images live here too)."""
    data_volume_gb: int = 500
    """Size of the scratch volume at /data: staged datasets and cached checkpoints (both live in S3)."""
    data_volume_iops: int = 3000
    """gp3 IOPS of the data volume (3000 is the free baseline)."""
    data_volume_throughput_mbps: int = 250
    """gp3 throughput of the data volume in MiB/s (125 is the free baseline)."""
    kms_key_arn: pulumi.Input[str] | None = None
    """KMS key (ARN) for the root and data volumes; None uses the account's default EBS key."""
    idle_minutes: int = 15
    """Minutes below the threshold before the idle alarm stops the instance (multiple of 5)."""
    agent_idle_minutes: int = 5
    """Minutes with no queued or running job and no login before the on-box idle agent stops the instance."""
    gpu_idle_threshold_percent: float = 5.0
    """Utilisation (percent, busiest accelerator) below which the instance counts as idle."""
    environment: Mapping[str, pulumi.Input[str]] = field(default_factory=dict)
    """Trainer container environment (queue URLs, bucket names; never secrets: stored in SSM as text)."""
    log_group_name: pulumi.Input[str] | None = None
    """CloudWatch Logs group for the trainer's output and the boot log; None keeps logs on the box."""
    agent_config_json: pulumi.Input[str] | None = None
    """CloudWatch agent config; None uses ``infra.cloudwatch_agent.agent_config_json``. A custom one must keep
    the ``CWAgent`` namespace and the ``[["InstanceId"]]`` aggregation, which the safety net reads."""
    key_name: pulumi.Input[str] | None = None
    """EC2 key pair for SSH through the jump host; None means no SSH key (use SSM Session Manager)."""
    ssh_source_security_group_id: pulumi.Input[str] | None = None
    """The jump host's security group: the only source allowed to reach tcp 22. None: no ingress at all."""
    service_security_group_ids: Sequence[pulumi.Input[str]] = ()
    """More groups the instance joins besides its own: the trainer's, which the database admits."""
    config_parameter_name: str | None = None
    """SSM parameter holding the image and environment; None derives ``/tessera/<stack>/<name>/config``."""
    protect_data_volume: bool = False
    """Protect the data volume from ``pulumi destroy`` (checkpoints and exports go to S3 regardless)."""
    idle_alarm_name: str | None = None
    """The idle alarm's name; None derives ``tessera-<stack>-<name>-idle`` (unique per account and region, as
    alarm names must be). The box re-arms the alarm by this name."""


class TrainingInstance(pulumi.ComponentResource):
    """An on-demand training instance with a persistent data volume and an idle alarm that stops it."""

    instance_id: pulumi.Output[str]
    private_ip: pulumi.Output[str]
    security_group_id: pulumi.Output[str]
    data_volume_id: pulumi.Output[str]
    idle_alarm_name: pulumi.Output[str]
    idle_alarm_arn: pulumi.Output[str]
    config_parameter_name: pulumi.Output[str]
    config_parameter_arn: pulumi.Output[str]
    accelerator: Accelerator
    role_statements: list[dict[str, Any]]

    def __init__(
        self, name: str, args: TrainingInstanceArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("tessera:infra:TrainingInstance", name, None, opts)
        accelerator = accelerator_for(args.instance_type)
        family = args.instance_type.partition(".")[0]
        if args.idle_minutes < 5 or args.idle_minutes % 5:
            raise ValueError(f"idle_minutes must be a positive multiple of 5 (got {args.idle_minutes})")
        if args.agent_idle_minutes < 1:
            raise ValueError(f"agent_idle_minutes must be at least 1 (got {args.agent_idle_minutes})")
        if not 0 < args.gpu_idle_threshold_percent < 100:
            raise ValueError("gpu_idle_threshold_percent must be between 0 and 100")
        for key in args.environment:
            if not _ENV_NAME.match(key):
                raise ValueError(f"trainer environment variable name {key!r} is not a valid shell name")
        child = pulumi.ResourceOptions(parent=self)

        ami: pulumi.Input[str]
        if args.ami_id:
            ami = args.ami_id
        else:
            pattern = VOLTA_AMI_NAME_PATTERN if family in VOLTA_FAMILIES else AMI_NAME_PATTERNS[accelerator]
            ami = newest_amazon_ami(pattern, self)

        availability_zone: pulumi.Input[str] = (
            args.availability_zone
            if args.availability_zone is not None
            else aws.ec2.get_subnet_output(
                id=args.subnet_id, opts=pulumi.InvokeOutputOptions(parent=self)
            ).availability_zone
        )

        self.security_group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            description=f"tessera training instance {name}: SSH from the jump host only",
            vpc_id=args.vpc_id,
            opts=child,
        )
        # Egress is open: the trainer pulls images (ECR), reads and writes S3, talks to SQS and PostgreSQL.
        allow_egress_anywhere(
            f"{name}-egress",
            self.security_group.id,
            description="outbound to AWS APIs, the registry and the database",
            opts=child,
        )
        if args.ssh_source_security_group_id is not None:
            allow_tcp_from_group(
                f"{name}-ssh-from-jump",
                self.security_group.id,
                port=22,
                source_security_group_id=args.ssh_source_security_group_id,
                description="SSH from the jump host",
                opts=child,
            )

        # The data volume is its own resource so that it outlives the instance: a replaced instance attaches
        # the same volume and finds its cache. It is scratch (datasets and checkpoints live in S3, the cache
        # re-fills itself), so a destroy takes no snapshot: one would bill for a copy of a copy.
        self.data_volume = aws.ebs.Volume(
            f"{name}-data",
            availability_zone=availability_zone,
            size=args.data_volume_gb,
            type="gp3",
            iops=args.data_volume_iops,
            throughput=args.data_volume_throughput_mbps,
            encrypted=True,
            kms_key_id=args.kms_key_arn,
            final_snapshot=False,
            opts=pulumi.ResourceOptions(parent=self, protect=args.protect_data_volume),
        )

        parameter_name = args.config_parameter_name or f"/tessera/{pulumi.get_stack()}/{name}/config"
        # Image and environment live in SSM, read by the box at every boot: the user data is ignored after
        # creation (below), so a new image reaches the box on its next start without replacing it.
        self.config_parameter = aws.ssm.Parameter(
            f"{name}-config",
            name=parameter_name,
            type="String",
            description=f"tessera trainer image and environment for {name}",
            value=pulumi.Output.json_dumps({"image": args.image_ref, "environment": dict(args.environment)}),
            opts=child,
        )

        agent_json: pulumi.Input[str]
        if args.agent_config_json is not None:
            agent_json = args.agent_config_json
        else:
            agent_json = pulumi.Output.from_input(args.log_group_name).apply(
                lambda group: agent_config_json(gpu=accelerator == "nvidia", log_group_name=group)
            )

        # A fixed name: the box re-arms its alarm by name (with no lookup, and no right to list alarms), and
        # the alarm, which names the instance, cannot be an input of the instance's user data.
        alarm_name = (
            args.idle_alarm_name or f"tessera-{pulumi.get_stack()}-{name.removeprefix('tessera-')}-idle"
        )
        user_data = pulumi.Output.all(
            volume_id=self.data_volume.id,
            log_group=args.log_group_name,
            agent_json=agent_json,
        ).apply(
            lambda v: render_user_data(
                accelerator=accelerator,
                region=args.region,
                data_volume_id=v["volume_id"],
                config_parameter_name=parameter_name,
                log_group_name=v["log_group"],
                agent_config=v["agent_json"],
                idle_minutes=args.idle_minutes,
                agent_idle_minutes=args.agent_idle_minutes,
                idle_alarm_name=alarm_name,
            )
        )

        self.instance = aws.ec2.Instance(
            f"{name}-instance",
            ami=ami,
            instance_type=args.instance_type,
            subnet_id=args.subnet_id,
            availability_zone=availability_zone,
            # Its own group (SSH from the jump host) and the trainer's service groups (the database's peers).
            vpc_security_group_ids=[self.security_group.id, *args.service_security_group_ids],
            iam_instance_profile=args.instance_profile_name,
            key_name=args.key_name,
            associate_public_ip_address=False,
            # The idle alarm's stop (and a `shutdown` on the box) must stop, never terminate: the platform
            # starts this same instance again when there is work.
            instance_initiated_shutdown_behavior="stop",
            monitoring=True,
            # Hop limit 2: the trainer runs in a container (one network hop further) and needs the role.
            metadata_options=imdsv2_metadata_options(hop_limit=2),
            root_block_device=encrypted_root_volume(args.root_volume_gb, args.kms_key_arn),
            user_data=user_data,
            user_data_replace_on_change=False,
            # Functional tags (not the provider's default tags): the platform finds training boxes by them
            # to start one on demand, and they say the box stops itself.
            tags={
                "Name": f"{name}",
                "tessera:role": "training",
                "tessera:auto-stop": "true",
                "tessera:start-on-demand": "true",
                "tessera:accelerator": accelerator,
            },
            # A newer AMI (the lookup returns the newest) or edited user data must not replace a training box:
            # replacing it would throw away its root volume and interrupt training for a cosmetic change. Roll
            # to a new AMI deliberately (`pulumi up --replace`); runtime settings come from SSM at boot.
            opts=pulumi.ResourceOptions(parent=self, ignore_changes=["ami", "user_data"]),
        )

        # Replacing the instance replaces the attachment: detach from the old box first (a volume attaches to
        # one instance), stopping it so the file system is clean.
        aws.ec2.VolumeAttachment(
            f"{name}-data-attachment",
            device_name=DATA_DEVICE_NAME,
            instance_id=self.instance.id,
            volume_id=self.data_volume.id,
            stop_instance_before_detaching=True,
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),
        )

        periods = args.idle_minutes // 5
        # An alarm may stop an instance only when it watches one metric of that instance (namespace, name
        # and the InstanceId dimension alone): CloudWatch refuses an EC2 action on a metric-math alarm. So the
        # box publishes its own verdict, ACTIVITY_METRIC (render_user_data: the busiest accelerator, or 100
        # while a job runs or someone is logged in), and the alarm compares it with the threshold. Maximum:
        # one busy minute, or one busy accelerator, keeps the box up for the period. Missing data counts as
        # idle ("breaching"): with "notBreaching" a box whose publisher died would never be stopped and would
        # bill by the hour. The price: a box whose timer has not run yet counts as idle, which is why
        # idle_minutes must cover boot, and why the box re-arms the alarm `idle_minutes + 10` minutes after
        # each boot (an alarm already in ALARM while stopped fires nothing).
        self.idle_alarm = aws.cloudwatch.MetricAlarm(
            f"{name}-idle",
            name=alarm_name,
            alarm_description=(
                f"Stop training instance {name} when its activity ({ACTIVITY_NAMESPACE} {ACTIVITY_METRIC}: "
                f"the busiest accelerator's utilisation, or {ACTIVITY_BUSY:g} while a job runs or someone is "
                f"logged in) stays below {args.gpu_idle_threshold_percent}% for {args.idle_minutes} minutes "
                "(missing data counts as idle)"
            ),
            namespace=ACTIVITY_NAMESPACE,
            metric_name=ACTIVITY_METRIC,
            dimensions={"InstanceId": self.instance.id},
            statistic="Maximum",
            period=300,
            evaluation_periods=periods,
            datapoints_to_alarm=periods,
            threshold=args.gpu_idle_threshold_percent,
            comparison_operator="LessThanThreshold",
            treat_missing_data="breaching",
            alarm_actions=[f"arn:aws:automate:{args.region}:ec2:stop"],
            # The name is fixed (the box re-arms the alarm by it): a replacement must free it first.
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),
        )

        self.instance_id = self.instance.id
        self.private_ip = self.instance.private_ip
        self.security_group_id = self.security_group.id
        self.data_volume_id = self.data_volume.id
        self.idle_alarm_name = self.idle_alarm.name
        self.idle_alarm_arn = self.idle_alarm.arn
        self.config_parameter_name = self.config_parameter.name
        self.config_parameter_arn = self.config_parameter.arn
        self.accelerator = accelerator
        utilization_namespaces = sorted(
            {AGENT_NAMESPACE} | ({ACCELERATOR_NAMESPACE} if accelerator != "nvidia" else set())
        )
        # What the box itself does with its role beyond the trainer's own work; the role is made before the
        # instance, so the stack attaches these (e.g. as an aws.iam.RolePolicy) once the ARNs exist.
        self.role_statements = [
            {
                "Sid": "ReadTrainerConfig",
                "Effect": "Allow",
                "Action": ["ssm:GetParameter"],
                "Resource": self.config_parameter.arn,
            },
            {
                "Sid": "RearmIdleAlarm",
                "Effect": "Allow",
                "Action": ["cloudwatch:SetAlarmState"],
                "Resource": self.idle_alarm.arn,
            },
            {
                # The idle agent stops its own box, and no other.
                "Sid": "StopSelf",
                "Effect": "Allow",
                "Action": ["ec2:StopInstances"],
                "Resource": self.instance.arn,
            },
            {
                "Sid": "PublishUtilization",
                "Effect": "Allow",
                "Action": ["cloudwatch:PutMetricData"],
                "Resource": "*",
                # The agent's memory/disk (and NVIDIA) metrics, and the Gaudi/Neuron utilisation the box
                # publishes itself (no agent plugin exists for them), which the safety net reads.
                "Condition": {"StringEquals": {"cloudwatch:namespace": utilization_namespaces}},
            },
            {
                # The activity metric (the idle alarm's), and the trainer's and the idle agent's busy
                # heartbeat (the safety net's): this namespace only, so the box cannot fake others' metrics.
                "Sid": "PublishActivity",
                "Effect": "Allow",
                "Action": ["cloudwatch:PutMetricData"],
                "Resource": "*",
                "Condition": {"StringEquals": {"cloudwatch:namespace": BUSY_NAMESPACE}},
            },
            {
                # The agent resolves its append_dimensions (AutoScalingGroupName) and disk names with these.
                "Sid": "CloudWatchAgentDescribe",
                "Effect": "Allow",
                "Action": ["ec2:DescribeTags", "ec2:DescribeVolumes"],
                "Resource": "*",
            },
        ]
        self.register_outputs(
            {
                "instance_id": self.instance_id,
                "private_ip": self.private_ip,
                "security_group_id": self.security_group_id,
                "data_volume_id": self.data_volume_id,
                "idle_alarm_name": self.idle_alarm_name,
                "config_parameter_name": self.config_parameter_name,
                "accelerator": accelerator,
            }
        )


# --- user data --------------------------------------------------------------------------------------------
# Shell templates are plain strings with @NAME@ placeholders (bash's own ${...} and {...} stay untouched).

_INSTANCE_ID = r"""
token=$(curl -fsS -X PUT http://169.254.169.254/latest/api/token \
  -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')
instance_id=$(curl -fsS -H "X-aws-ec2-metadata-token: $token" \
  http://169.254.169.254/latest/meta-data/instance-id)
"""

_TRAINER_SCRIPT = r"""
#!/bin/bash
# Start the trainer container. Image and environment come from SSM at every start, so that they can change
# without replacing the instance.
set -euo pipefail
region=@REGION@
parameter='@PARAMETER@'
log_group='@LOG_GROUP@'
@INSTANCE_ID@
config=$(aws ssm get-parameter --region "$region" --name "$parameter" --query Parameter.Value --output text)
image=$(printf '%s' "$config" | python3 -c 'import json, sys; print(json.load(sys.stdin)["image"])')
umask 077
printf '%s' "$config" | python3 -c '
import json, sys
for key, value in sorted(json.load(sys.stdin)["environment"].items()):
    if "\n" in value:
        sys.exit(f"environment value of {key} spans lines")
    print(f"{key}={value}")' > /etc/tessera/trainer.env
registry=${image%%/*}
case "$registry" in
  *.dkr.ecr.*.amazonaws.com)
    aws ecr get-login-password --region "$(cut -d. -f4 <<<"$registry")" \
      | docker login --username AWS --password-stdin "$registry" ;;
esac
docker pull "$image"
printf '%s\n' "$image" > @IMAGE_FILE@   # the idle agent runs from the same image
args=(--rm --name @CONTAINER@ --ipc=host --env-file /etc/tessera/trainer.env
      -e TESSERA_DATA_DIR=@DATA@ -e AWS_REGION="$region" -v @DATA@:@DATA@
      -e TESSERA_INSTANCE_ID="$instance_id" -v @STATE_DIR@:@STATE_DIR@ -e TESSERA_TRAINER_STATE=@STATE_FILE@)
@DEVICE_ARGS@
if [ -n "$log_group" ]; then
  args+=(--log-driver=awslogs --log-opt awslogs-region="$region" --log-opt awslogs-group="$log_group"
         --log-opt awslogs-stream="trainer/$instance_id")
fi
exec docker run "${args[@]}" "$image" worker trainer
"""

_TRAINER_UNIT = """
[Unit]
Description=tessera trainer (worker trainer)
Wants=network-online.target
After=network-online.target docker.service
Requires=docker.service
RequiresMountsFor=@DATA@

[Service]
ExecStartPre=-/usr/bin/docker rm -f @CONTAINER@
ExecStart=/usr/local/bin/tessera-trainer
# A stop (the idle alarm, or anyone) gives the trainer two minutes to write its checkpoint.
ExecStop=/usr/bin/docker stop --time 120 @CONTAINER@
TimeoutStartSec=0
TimeoutStopSec=150
Restart=on-failure
RestartSec=30

[Install]
WantedBy=multi-user.target
"""

IDLE_AGENT_UNIT = """\
[Unit]
Description=tessera idle agent: stop this training box when no job, no queue and no login for the idle period
Wants=network-online.target
After=network-online.target docker.service tessera-trainer.service
Requires=docker.service

[Service]
ExecStartPre=-/usr/bin/docker rm -f tessera-idle
ExecStart=/usr/local/bin/tessera-idle-agent
ExecStop=/usr/bin/docker stop --time 10 tessera-idle
Restart=always
RestartSec=30

[Install]
WantedBy=multi-user.target
"""
"""A copy of ``services.trainer.idle.SYSTEMD_UNIT`` (infra imports no services code; a test checks it)."""

IDLE_AGENT_WRAPPER = r"""#!/bin/bash
# tessera idle agent, run from the trainer image. Host network and PID namespaces let it see SSH connections
# (/proc/net/tcp) and Session Manager sessions (/proc/*/comm) of the host; it reads the trainer's state file.
# It stops the box through the EC2 API; exit status 75 asks this wrapper to shut the box down instead.
set -uo pipefail
image=$(cat /etc/tessera/trainer.image) || exit 1
docker run --rm --name tessera-idle --network host --pid host \
  --env-file /etc/tessera/trainer.env -e AWS_REGION=@REGION@ -e TESSERA_IDLE_MINUTES=@IDLE_MINUTES@ \
  -e TESSERA_TRAINER_STATE=/run/tessera/trainer-state.json -v /run/tessera:/run/tessera:ro \
  --entrypoint python "$image" -m services.trainer.idle
status=$?
if [ "$status" -eq 75 ]; then exec /usr/sbin/shutdown -h now; fi
exit "$status"
"""
"""A copy of ``services.trainer.idle.WRAPPER_SCRIPT`` (a test keeps them equal); ``@REGION@`` and
``@IDLE_MINUTES@`` are filled by :func:`render_user_data`."""

_REARM_SCRIPT = r"""
#!/bin/bash
# An alarm that went to ALARM while the box was stopped (no activity data counts as idle) stays there after a
# start, and an alarm fires its stop action only on entering ALARM. Once a full idle window of activity data
# has passed since boot, set it (to OK: a no-op when it is OK already): if the box is still idle it re-enters
# ALARM at the next evaluation and is stopped; had it been busy, the alarm would be OK already.
set -euo pipefail
aws cloudwatch set-alarm-state --region @REGION@ --alarm-name '@ALARM_NAME@' --state-value OK \
  --state-reason "re-armed @REARM_MINUTES@ minutes after boot"
"""

_ONESHOT_UNIT = """
[Unit]
Description=@DESCRIPTION@
[Service]
Type=oneshot
ExecStart=@EXEC@
"""

_TIMER_UNIT = """
[Unit]
Description=@DESCRIPTION@
[Timer]
@SCHEDULE@
AccuracySec=5s
[Install]
WantedBy=timers.target
"""

_PUBLISHER_SCRIPT = r"""
#!/bin/bash
# Every minute: the idle alarm's one metric (an alarm that stops an instance cannot combine metrics), the
# busiest accelerator's utilisation, or 100 while a job runs or someone is logged in (tessera-activity).
set -euo pipefail
region=@REGION@
@READER@
utilization=$(read_utilization 2>/dev/null) || true
# No reading (a sick driver) leaves the job and login checks to decide; a dead timer publishes nothing, which
# the alarm counts as idle.
activity=$(printf '%s\n' "$utilization" | @CHECK@ --state @STATE_FILE@)
@INSTANCE_ID@
aws cloudwatch put-metric-data --region "$region" --namespace '@NAMESPACE@' --metric-name '@METRIC@' \
  --unit Percent --value "$activity" --dimensions "InstanceId=$instance_id"
@ALSO@
"""

_UTILIZATION_PUBLISHER = r"""
# No CloudWatch agent plugin exists for this accelerator: publish its utilisation (the safety net reads it).
busiest=$(printf '%s\n' "$utilization" | sort -n | tail -n1)
[[ $busiest =~ ^[0-9.]+$ ]] || { echo "no accelerator utilisation reading" >&2; exit 1; }
aws cloudwatch put-metric-data --region "$region" --namespace '@NAMESPACE@' --metric-name '@METRIC@' \
  --unit Percent --value "$busiest" --dimensions "InstanceId=$instance_id"
"""

_UTILIZATION_READERS: dict[Accelerator, str] = {
    # One line per GPU.
    "nvidia": r"""
read_utilization() { timeout 30 nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits; }
""",
    # One line per Gaudi card.
    "gaudi": r"""
read_utilization() {
  timeout 30 hl-smi --query-aip=utilization.aip --format=csv,noheader,nounits | tr -d ' %'
}
""",
    # neuron-monitor streams JSON reports; the first one has every NeuronCore's utilisation (none in use: 0).
    "neuron": r"""
read_utilization() {
  timeout 30 neuron-monitor -c /etc/tessera/neuron-monitor.json 2>/dev/null | python3 -c '
import json, sys
report = json.loads(sys.stdin.readline() or "{}")
cores = [core.get("neuroncore_utilization", 0.0)
         for runtime in report.get("neuron_runtime_data") or []
         for core in runtime.get("report", {}).get("neuroncore_counters", {})
                            .get("neuroncores_in_use", {}).values()]
print(max(cores, default=0.0))'
}
""",
}
"""Bash functions printing the accelerators' utilisation in percent, one number a line."""

ACTIVITY_CHECK = r"""#!/usr/bin/python3
# tessera-activity: print the idle alarm's value from accelerator readings on stdin (percent, one a line):
# the busiest, or 100 while a job runs or someone is logged in, decided as services/trainer/idle.py does.
# Unlike the agent, a check that fails says not busy: the safety net must still stop a box whose agents broke.
import argparse, json, os, sys, time
from datetime import datetime, timezone


def busiest(lines):
    values = []
    for line in lines:
        try:
            values.append(float(line))
        except ValueError:
            pass  # "[N/A]", an error message: no reading
    return max((v for v in values if 0 <= v <= 100), default=None)


def job_running(path, now, stale_after_s=600.0):
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
        updated = state.get("updated")
        if isinstance(updated, str):
            stamp = datetime.fromisoformat(updated.replace("Z", "+00:00"))
            updated = (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()
        fresh = type(updated) in (int, float) and now - updated <= stale_after_s
        return state.get("busy") is True and fresh
    except (OSError, ValueError, AttributeError):
        return False


def logins(proc):
    count = 0
    for name in ("tcp", "tcp6"):  # established (01) connections to local port 22
        try:
            with open(os.path.join(proc, "net", name), encoding="ascii") as fh:
                rows = [line.split() for line in fh.read().splitlines()[1:]]
        except OSError:
            continue
        count += sum(len(f) > 3 and int(f[1].rsplit(":", 1)[1], 16) == 22 and f[3] == "01" for f in rows)
    for pid in filter(str.isdigit, os.listdir(proc)):
        try:
            with open(os.path.join(proc, pid, "comm"), encoding="utf-8", errors="replace") as fh:
                count += fh.read().strip() == "ssm-session-worker"
        except OSError:
            pass  # the process ended while we looked
    return count


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", default="/run/tessera/trainer-state.json")
    parser.add_argument("--proc", default="/proc")
    parser.add_argument("--now", type=float, default=None)
    args = parser.parse_args(argv)
    now = time.time() if args.now is None else args.now
    reasons = ["a job runs"] if job_running(args.state, now) else []
    try:
        reasons += ["%d login(s)" % n for n in [logins(args.proc)] if n]
    except (OSError, ValueError):
        pass
    utilization = busiest(sys.stdin)
    print("%g" % max(utilization or 0.0, 100.0 if reasons else 0.0))
    print("accelerators %s; %s" % (utilization, ", ".join(reasons) or "no job, no login"), file=sys.stderr)


if __name__ == "__main__":
    main()
"""
"""``/usr/local/bin/tessera-activity``: the host's decision behind :data:`ACTIVITY_METRIC` (tests run it)."""

_NEURON_MONITOR_CONFIG = json.dumps(
    {
        "period": "5s",
        "neuron_runtimes": [{"tag_filter": ".*", "metrics": [{"type": "neuroncore_counters"}]}],
        "system_metrics": [],
    }
)

_DOCKER_DEVICE_ARGS: dict[Accelerator, str] = {
    "nvidia": "args+=(--gpus all)",
    "gaudi": (
        "args+=(--runtime=habana -e HABANA_VISIBLE_DEVICES=all "
        "-e OMPI_MCA_btl_vader_single_copy_mechanism=none --cap-add=sys_nice)"
    ),
    "neuron": 'for d in /dev/neuron*; do args+=(--device="$d"); done',
}

_SETUP_SCRIPT = r"""
#!/bin/bash
# tessera training instance setup; runs at every boot and is safe to run again.
set -euo pipefail
region=@REGION@
data_volume_id=@VOLUME_ID@

# --- the trainer's state file (the idle agent reads it): /run is a tmpfs, made again at every boot ---------
install -d -m 0755 -o @TRAINER_UID@ -g @TRAINER_UID@ @STATE_DIR@

# --- data volume: wait for the attachment, format only if blank, mount ------------------------------------
find_data_device() {
  local dev
  for dev in "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_${data_volume_id//-/}" @DEVICE@ /dev/xvdf; do
    if [ -b "$dev" ]; then readlink -f "$dev"; return 0; fi
  done
  return 1
}
device=""
for _ in $(seq 1 120); do device=$(find_data_device) && break; sleep 5; done
[ -n "$device" ] || { echo "data volume $data_volume_id never attached" >&2; exit 1; }
found=0
blkid -p "$device" >/dev/null 2>&1 || found=$?
if [ "$found" -eq 2 ]; then
  mkfs.ext4 -q -L tessera-data "$device"   # blkid found no file system: a new, blank volume
elif [ "$found" -ne 0 ]; then
  echo "blkid could not read $device (exit $found); refusing to format it" >&2; exit 1
fi
uuid=$(blkid -s UUID -o value "$device")
mkdir -p @DATA@
grep -q "UUID=$uuid" /etc/fstab || echo "UUID=$uuid @DATA@ ext4 defaults,nofail 0 2" >> /etc/fstab
mountpoint -q @DATA@ || mount @DATA@
# A volume grown in place (trainingDataVolumeGb raised) gets its file system grown too; a no-op otherwise.
resize2fs "$device" || echo "could not grow the file system on $device" >&2
# The trainer (its image's user) stages datasets and caches checkpoints here (TESSERA_DATA_DIR).
chown @TRAINER_UID@:@TRAINER_UID@ @DATA@

# --- CloudWatch agent: memory, disk and (NVIDIA) the GPU metrics the idle alarm reads ---------------------
agent_ctl=/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl
if [ ! -x "$agent_ctl" ]; then
  if command -v dnf >/dev/null; then
    dnf install -y amazon-cloudwatch-agent
  else
    curl -fsSL -o /tmp/amazon-cloudwatch-agent.deb \
      "https://amazoncloudwatch-agent-$region.s3.$region.amazonaws.com/ubuntu/amd64/latest/amazon-cloudwatch-agent.deb"
    dpkg -i -E /tmp/amazon-cloudwatch-agent.deb
  fi
fi
@FILES@
"$agent_ctl" -a fetch-config -m ec2 -s -c file:/opt/aws/amazon-cloudwatch-agent/etc/tessera.json
@DRIVER_CHECK@
# --- trainer, idle agent, activity metric, idle-alarm re-arm: enabled for every boot, started now ---------
systemctl daemon-reload
systemctl --no-block enable --now @UNITS@
"""

_GAUDI_DRIVER_CHECK = r"""
# --- Gaudi: Habana's host driver must be of the trainer image's SynapseAI release (@SYNAPSE@) --------------
driver=$(timeout 60 hl-smi -Q driver_version -f csv,noheader 2>/dev/null | sed -n 1p | tr -d ' ') || driver=""
case "${driver%%-*}" in
  @SYNAPSE@.*) echo "Habana driver $driver matches the trainer image's SynapseAI @SYNAPSE@" ;;
  *) message="ERROR: Habana driver '${driver:-unknown}' is not of SynapseAI @SYNAPSE@, the trainer image's"
     message+=" release: Gaudi jobs will fail. Use an AMI with a @SYNAPSE@ driver"
     message+=" (infra/training.py GAUDI_SYNAPSE_VERSION, AMI_NAME_PATTERNS)."
     echo "$message" >&2
     logger -p user.err -t tessera-training "$message" || true ;;
esac
"""

_USER_DATA = """
#!/bin/bash
# tessera training instance (@ACCELERATOR@). cloud-init runs user data once per instance, but this box is
# stopped and started many times (and the idle alarm may stop it during its first boot): install the setup
# as a per-boot script, which cloud-init runs at every boot, and run it now.
set -euo pipefail
install -D -m 0755 /dev/stdin /var/lib/cloud/scripts/per-boot/10-tessera-training.sh <<'TESSERA_SETUP'
@SETUP@
TESSERA_SETUP
exec /var/lib/cloud/scripts/per-boot/10-tessera-training.sh
"""


def _fill(template: str, **values: str | int) -> str:
    """``template`` with each ``@NAME@`` replaced; refuses to leave a placeholder unfilled."""
    text = template.strip("\n") + "\n"
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    leftover = re.search(r"@[A-Z_]+@", text)
    if leftover:
        raise ValueError(f"user data template placeholder {leftover.group()} was not filled")
    return text


def _file(path: str, mode: str, body: str) -> str:
    if "\nTESSERA_EOF\n" in f"\n{body}":
        raise ValueError(f"{path}: content must not contain the line TESSERA_EOF")
    return f"install -D -m {mode} /dev/stdin {path} <<'TESSERA_EOF'\n{body.rstrip(chr(10))}\nTESSERA_EOF\n"


def render_user_data(
    *,
    accelerator: Accelerator,
    region: str,
    data_volume_id: str,
    config_parameter_name: str,
    log_group_name: str | None,
    agent_config: str,
    idle_minutes: int,
    agent_idle_minutes: int = 5,
    idle_alarm_name: str = "tessera-training-idle",
) -> str:
    """The instance's user data: a bash script that installs an idempotent setup script run at every boot.

    The setup mounts the data volume (formatting it only if it is blank), configures the CloudWatch agent,
    on Gaudi checks that Habana's driver is of :data:`GAUDI_SYNAPSE_VERSION`, and installs, enables and
    starts:
    the trainer service (``docker run ... worker trainer``, image and environment read from SSM at each start,
    ``/run/tessera`` mounted for its state file), the idle agent (:data:`IDLE_AGENT_UNIT` running
    :data:`IDLE_AGENT_WRAPPER`, which stops the box after ``agent_idle_minutes`` with no job, queue or login),
    a timer publishing :data:`ACTIVITY_METRIC` every minute (:data:`ACTIVITY_CHECK` decides it; on Gaudi and
    Neuron, which have no agent plugin, the accelerator utilisation too), and a timer that re-arms the idle
    alarm after each boot.
    """
    instance_id = _INSTANCE_ID.strip("\n")
    common = {
        "INSTANCE_ID": instance_id,
        "REGION": region,
        "DATA": DATA_MOUNT,
        "CONTAINER": TRAINER_CONTAINER,
        "STATE_DIR": TRAINER_STATE_DIR,
    }
    with contextlib.suppress(ValueError):  # compact (EC2 takes 16 KiB of user data); not JSON: left as is
        agent_config = json.dumps(json.loads(agent_config), separators=(",", ":"))
    files = [
        _file("/opt/aws/amazon-cloudwatch-agent/etc/tessera.json", "0644", agent_config),
        _file(
            "/usr/local/bin/tessera-trainer",
            "0755",
            _fill(
                _TRAINER_SCRIPT,
                **common,
                PARAMETER=config_parameter_name,
                LOG_GROUP=log_group_name or "",
                DEVICE_ARGS=_DOCKER_DEVICE_ARGS[accelerator],
                STATE_FILE=TRAINER_STATE_FILE,
                IMAGE_FILE=TRAINER_IMAGE_FILE,
            ),
        ),
        _file("/etc/systemd/system/tessera-trainer.service", "0644", _fill(_TRAINER_UNIT, **common)),
        _file(
            IDLE_AGENT_PATH,
            "0755",
            _fill(IDLE_AGENT_WRAPPER, REGION=region, IDLE_MINUTES=agent_idle_minutes),
        ),
        _file(IDLE_AGENT_UNIT_PATH, "0644", _fill(IDLE_AGENT_UNIT)),
        _file(
            "/usr/local/bin/tessera-idle-rearm",
            "0755",
            _fill(
                _REARM_SCRIPT,
                REGION=region,
                ALARM_NAME=idle_alarm_name,
                REARM_MINUTES=idle_minutes + 10,
            ),
        ),
        _file(
            "/etc/systemd/system/tessera-idle-rearm.service",
            "0644",
            _fill(
                _ONESHOT_UNIT,
                DESCRIPTION="tessera: re-arm the idle alarm",
                EXEC="/usr/local/bin/tessera-idle-rearm",
            ),
        ),
        _file(
            "/etc/systemd/system/tessera-idle-rearm.timer",
            "0644",
            # A full idle window of real datapoints (agent start-up and period alignment included) since boot.
            _fill(
                _TIMER_UNIT,
                DESCRIPTION="tessera: re-arm the idle alarm once a full idle window has passed since boot",
                SCHEDULE=f"OnBootSec={idle_minutes + 10}min",
            ),
        ),
    ]
    also = ""
    if accelerator != "nvidia":  # the agent publishes NVIDIA utilisation itself
        also = _fill(
            _UTILIZATION_PUBLISHER, NAMESPACE=ACCELERATOR_NAMESPACE, METRIC=ACCELERATOR_UTILIZATION_METRIC
        )
    files += [
        _file(ACTIVITY_CHECK_PATH, "0755", ACTIVITY_CHECK),
        _file(
            "/usr/local/bin/tessera-activity-metric",
            "0755",
            _fill(
                _PUBLISHER_SCRIPT,
                REGION=region,
                INSTANCE_ID=instance_id,
                READER=_UTILIZATION_READERS[accelerator].strip("\n"),
                CHECK=ACTIVITY_CHECK_PATH,
                STATE_FILE=TRAINER_STATE_FILE,
                NAMESPACE=ACTIVITY_NAMESPACE,
                METRIC=ACTIVITY_METRIC,
                ALSO=also.rstrip("\n"),
            ),
        ),
        _file(
            "/etc/systemd/system/tessera-activity-metric.service",
            "0644",
            _fill(
                _ONESHOT_UNIT,
                DESCRIPTION="tessera: publish this box's activity (the idle alarm's metric) to CloudWatch",
                EXEC="/usr/local/bin/tessera-activity-metric",
            ),
        ),
        _file(
            "/etc/systemd/system/tessera-activity-metric.timer",
            "0644",
            _fill(
                _TIMER_UNIT,
                DESCRIPTION="tessera: publish this box's activity every minute",
                SCHEDULE="OnBootSec=1min\nOnUnitActiveSec=1min",
            ),
        ),
    ]
    if accelerator == "neuron":
        files.append(_file("/etc/tessera/neuron-monitor.json", "0644", _NEURON_MONITOR_CONFIG))
    units = [
        "tessera-activity-metric.timer",
        "tessera-idle-rearm.timer",
        "tessera-trainer.service",
        "tessera-idle.service",
    ]
    setup = _fill(
        _SETUP_SCRIPT,
        REGION=region,
        VOLUME_ID=data_volume_id,
        DEVICE=DATA_DEVICE_NAME,
        DATA=DATA_MOUNT,
        STATE_DIR=TRAINER_STATE_DIR,
        TRAINER_UID=TRAINER_UID,
        FILES="mkdir -p /etc/tessera\n" + "".join(files).rstrip("\n"),
        DRIVER_CHECK=_fill(_GAUDI_DRIVER_CHECK, SYNAPSE=GAUDI_SYNAPSE_VERSION)
        if accelerator == "gaudi"
        else "",
        UNITS=" ".join(units),
    )
    if "\nTESSERA_SETUP\n" in setup:
        raise ValueError("the setup script must not contain the line TESSERA_SETUP")
    return _fill(_USER_DATA, ACCELERATOR=accelerator, SETUP=setup.rstrip("\n"))
