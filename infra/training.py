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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.accelerators import (
    ACCELERATOR_FAMILIES,
    FAMILY_ACCELERATORS,
    GAUDI_SYNAPSE_VERSION,
    INSTANCE_TYPE_SETTING,
    VOLTA_FAMILIES,
    Accelerator,
    accelerator_for,
)
from infra.cloudwatch_agent import AGENT_NAMESPACE, AGENT_ROLE_STATEMENT, agent_config_json
from infra.instances import (
    ENV_NAME,
    allow_egress_anywhere,
    allow_tcp_from_group,
    encrypted_root_volume,
    imdsv2_metadata_options,
    newest_amazon_ami,
)
from infra.training_boot import (
    ACTIVITY_BUSY,
    ACTIVITY_METRIC,
    ACTIVITY_NAMESPACE,
    BUSY_METRIC,
    BUSY_NAMESPACE,
    DATA_DEVICE_NAME,
    render_user_data,
    utilization_namespace,
)

# The accelerator table (infra/accelerators.py) and the busy heartbeat's name (infra/training_boot.py) are
# read from here too: the training component is where the stack, the trainer images and the safety net
# look for them.
__all__ = [
    "ACCELERATOR_FAMILIES",
    "AMI_NAME_PATTERNS",
    "BUSY_METRIC",
    "BUSY_NAMESPACE",
    "FAMILY_ACCELERATORS",
    "GAUDI_SYNAPSE_VERSION",
    "INSTANCE_TYPE_SETTING",
    "VOLTA_AMI_NAME_PATTERN",
    "VOLTA_FAMILIES",
    "Accelerator",
    "TrainingInstance",
    "TrainingInstanceArgs",
    "accelerator_for",
]

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
            if not ENV_NAME.match(key):
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
        utilization_namespaces = sorted({AGENT_NAMESPACE, utilization_namespace(accelerator)})
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
            # The agent resolves its append_dimensions (AutoScalingGroupName) and disk names with these.
            dict(AGENT_ROLE_STATEMENT),
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
