"""A fleet of worker instances for one service: a launch template that runs the service's container, an Auto
Scaling group that starts at zero, and scaling on the backlog of the queues the service consumes.

Scaling follows AWS's "backlog per instance" pattern: a target-tracking policy keeps
(messages waiting + messages being worked on) / in-service instances near ``backlog_per_instance``. Target
tracking cannot leave zero (the ratio is undefined with no instances), so a step-scaling policy and an alarm
set the group to one instance when messages wait and the group's desired capacity is zero.

A fleet can also serve: it publishes container ports and registers its instances in load balancer target
groups (the sight catalog's API, ``infra/catalog.py``), with no queue and no backlog scaling. What each
instance runs at boot is ``infra/worker_boot.py``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws
from pulumi import Input, Output
from pulumi_aws.autoscaling import (
    PolicyTargetTrackingConfigurationCustomizedMetricSpecificationMetricArgs as _TrackedMetric,
)
from pulumi_aws.autoscaling import (
    PolicyTargetTrackingConfigurationCustomizedMetricSpecificationMetricMetricStatMetricDimensionArgs as _TrackedDimension,  # noqa: E501
)

from infra.instances import (
    AL2023_AMI_PARAMETER,
    ENV_NAME,
    amazon_linux_ami,
    imdsv2_metadata_options,
    newest_amazon_ami,
)
from infra.worker_boot import worker_user_data

# The Deep Learning Base AMI carries the NVIDIA driver, Docker and the NVIDIA container toolkit.
GPU_AMI_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Amazon Linux 2023) *"
CPU_AMI_PARAMETER = AL2023_AMI_PARAMETER  # CPU workers run plain Amazon Linux 2023
ROOT_DEVICE = "/dev/xvda"  # the root device of both Amazon Linux 2023 AMIs


@dataclass
class WorkerFleetArgs:
    """Settings of one service's worker fleet."""

    service: str
    """Service name, e.g. ``"model-runner"``; names the container and the ``tessera:service`` tag."""
    image_ref: Input[str]
    """Image to run (``Registry.image_refs[service]``: a digest reference, so new pushes roll the fleet)."""
    subnet_ids: Input[Sequence[Input[str]]]
    """Private subnets to launch into (instances get no public IP)."""
    security_group_id: Input[str]
    """Security group of the workers."""
    instance_profile_name: Input[str]
    """Instance profile of the service's role (``ServiceRole.instance_profile_name``)."""
    region: str
    """AWS region (for the ECR login, the log driver and the container's AWS_REGION)."""
    instance_type: str = "g5.xlarge"
    """EC2 instance type (x86_64)."""
    gpu: bool = True
    """Run on a GPU AMI and give the container every GPU."""
    ami_id: str | None = None
    """AMI to launch; None looks up the newest GPU Deep Learning Base AMI (gpu) or Amazon Linux 2023 (cpu).
    A look-up moves to a newer AMI by itself, which rolls the fleet: pin an id to hold it."""
    min_size: int = 0
    """Fewest instances; 0 lets an idle fleet cost nothing."""
    max_size: int = 4
    """Most instances."""
    queue_names: Sequence[Input[str]] = ()
    """Queues whose backlog drives scaling; empty means no scaling policies (a fixed-size group)."""
    backlog_per_instance: int = 20
    """Target number of messages per in-service instance."""
    root_volume_gb: int = 100
    """Size of the encrypted gp3 root volume (image layers and scratch space)."""
    environment: Mapping[str, Input[str]] = field(default_factory=dict)
    """Environment of the container. User data is readable by anyone who can describe the instance, so pass
    secret ARNs here, never secret values."""
    command: Sequence[str] | None = None
    """Arguments after the image's ``tessera`` entrypoint; None runs ``worker <service>``."""
    log_group_name: Input[str] | None = None
    """CloudWatch log group for the container's output (awslogs driver); None keeps logs on the instance."""
    agent_config_json: Input[str] | None = None
    """CloudWatch agent configuration to install and start; None runs no agent."""
    spot: bool = False
    """Run on Spot capacity (all instances; a mixed-instances policy with no on-demand base)."""
    extra_tags: Mapping[str, str] = field(default_factory=dict)
    """More tags for the group's instances and volumes (they do not inherit the provider's default tags)."""
    ebs_kms_key_arn: Input[str] | None = None
    """KMS key for the root volume; None uses the account's default EBS key (still encrypted)."""
    extra_security_group_ids: Sequence[Input[str]] = ()
    """More security groups for the workers, e.g. the one a load balancer may reach (``security_group_id``,
    the service's own, stays egress-only)."""
    published_ports: Sequence[int] = ()
    """Container ports published on the same host port (``--publish``), for a load balancer to reach; the
    instance's security groups decide who may. Empty for queue workers, which listen on nothing."""
    target_group_arns: Sequence[Input[str]] = ()
    """Load balancer target groups the group registers its instances in. With any, the group replaces an
    instance the load balancer finds unhealthy (ELB health checks), not only one EC2 finds impaired."""
    container_healthcheck: bool = True
    """False runs the container with ``--no-healthcheck``: for a command that serves nothing the image's
    HEALTHCHECK could probe (a worker run from an API's image)."""

    def __post_init__(self) -> None:
        _check(self)


class WorkerFleet(pulumi.ComponentResource):
    """An Auto Scaling group of instances that each run one service container, scaled on queue backlog."""

    group_name: pulumi.Output[str]
    launch_template_id: pulumi.Output[str]
    scale_out_alarm_name: pulumi.Output[str] | None
    """The alarm that starts the first instance (None when no queues drive scaling)."""

    def __init__(self, name: str, args: WorkerFleetArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tessera:infra:WorkerFleet", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = {"Name": f"tessera-{args.service}", "tessera:service": args.service, **args.extra_tags}

        ami: Input[str]
        if args.ami_id is not None:
            ami = args.ami_id
        elif args.gpu:
            ami = newest_amazon_ami(GPU_AMI_NAME, self)
        else:
            ami = amazon_linux_ami(self)

        command = list(args.command) if args.command is not None else ["worker", args.service]
        env_keys = list(args.environment)

        def render(values: list[str | None]) -> str:
            image_ref, log_group, agent_config, *env_values = values
            script = worker_user_data(
                service=args.service,
                image_ref=str(image_ref),
                region=args.region,
                gpu=args.gpu,
                command=command,
                environment=dict(zip(env_keys, [str(v) for v in env_values], strict=True)),
                log_group_name=log_group,
                agent_config_json=agent_config,
                published_ports=args.published_ports,
                container_healthcheck=args.container_healthcheck,
            )
            return base64.b64encode(script.encode()).decode()

        user_data = Output.all(
            args.image_ref,
            args.log_group_name,
            args.agent_config_json,
            *[args.environment[k] for k in env_keys],
        ).apply(render)

        self.launch_template = aws.ec2.LaunchTemplate(
            f"{name}-lt",
            description=f"tessera {args.service} worker",
            image_id=ami,
            instance_type=args.instance_type,
            update_default_version=True,
            iam_instance_profile=aws.ec2.LaunchTemplateIamInstanceProfileArgs(
                name=args.instance_profile_name
            ),
            # Hop limit 2: the container reaches the instance metadata service through Docker's bridge.
            metadata_options=imdsv2_metadata_options(hop_limit=2),
            block_device_mappings=[
                aws.ec2.LaunchTemplateBlockDeviceMappingArgs(
                    device_name=ROOT_DEVICE,
                    ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                        volume_size=args.root_volume_gb,
                        volume_type="gp3",
                        encrypted="true",
                        kms_key_id=args.ebs_kms_key_arn,
                        delete_on_termination="true",
                    ),
                )
            ],
            network_interfaces=[
                aws.ec2.LaunchTemplateNetworkInterfaceArgs(
                    device_index=0,
                    associate_public_ip_address="false",
                    security_groups=[args.security_group_id, *args.extra_security_group_ids],
                    delete_on_termination="true",
                )
            ],
            monitoring=aws.ec2.LaunchTemplateMonitoringArgs(enabled=True),
            # Instances and volumes do not inherit the provider's default tags.
            tag_specifications=[
                aws.ec2.LaunchTemplateTagSpecificationArgs(resource_type=kind, tags=tags)
                for kind in ("instance", "volume", "network-interface")
            ],
            user_data=user_data,
            opts=child,
        )
        # The version number, not "$Latest": a new number changes the group, which starts an instance refresh.
        version = self.launch_template.latest_version.apply(str)
        launch_template = None
        mixed_instances = None
        if args.spot:
            mixed_instances = aws.autoscaling.GroupMixedInstancesPolicyArgs(
                launch_template=aws.autoscaling.GroupMixedInstancesPolicyLaunchTemplateArgs(
                    launch_template_specification=(
                        aws.autoscaling.GroupMixedInstancesPolicyLaunchTemplateLaunchTemplateSpecificationArgs(
                            launch_template_id=self.launch_template.id, version=version
                        )
                    ),
                    overrides=[
                        aws.autoscaling.GroupMixedInstancesPolicyLaunchTemplateOverrideArgs(
                            instance_type=args.instance_type
                        )
                    ],
                ),
                instances_distribution=aws.autoscaling.GroupMixedInstancesPolicyInstancesDistributionArgs(
                    on_demand_base_capacity=0,
                    on_demand_percentage_above_base_capacity=0,
                    spot_allocation_strategy="price-capacity-optimized",
                ),
            )
        else:
            launch_template = aws.autoscaling.GroupLaunchTemplateArgs(
                id=self.launch_template.id, version=version
            )

        metric = aws.autoscaling.Metric
        self.group = aws.autoscaling.Group(
            f"{name}-asg",
            min_size=args.min_size,
            max_size=args.max_size,
            vpc_zone_identifiers=args.subnet_ids,
            launch_template=launch_template,
            mixed_instances_policy=mixed_instances,
            capacity_rebalance=args.spot,
            target_group_arns=list(args.target_group_arns) or None,
            health_check_type="ELB" if args.target_group_arns else "EC2",
            health_check_grace_period=300,
            default_instance_warmup=300,
            # Group metrics feed the scaling math (in-service instances, desired capacity).
            enabled_metrics=[
                metric.GROUP_DESIRED_CAPACITY,
                metric.GROUP_IN_SERVICE_INSTANCES,
                metric.GROUP_PENDING_INSTANCES,
                metric.GROUP_TOTAL_INSTANCES,
            ],
            metrics_granularity="1Minute",
            instance_refresh=aws.autoscaling.GroupInstanceRefreshArgs(
                strategy="Rolling",
                preferences=aws.autoscaling.GroupInstanceRefreshPreferencesArgs(
                    min_healthy_percentage=50, skip_matching=True
                ),
            ),
            # GPU capacity can be short; `pulumi up` must not wait for instances to start.
            wait_for_capacity_timeout="0",
            tags=[
                aws.autoscaling.GroupTagArgs(key=key, value=value, propagate_at_launch=True)
                for key, value in tags.items()
            ],
            # Scaling owns the desired capacity; `pulumi up` must not reset it.
            opts=pulumi.ResourceOptions(parent=self, ignore_changes=["desired_capacity"]),
        )

        self.backlog_policy: aws.autoscaling.Policy | None = None
        self.scale_from_zero_policy: aws.autoscaling.Policy | None = None
        self.scale_out_alarm: aws.cloudwatch.MetricAlarm | None = None
        self.scale_out_alarm_name = None
        if args.queue_names:
            self._scale_on_backlog(name, args, child)

        self.group_name = self.group.name
        self.launch_template_id = self.launch_template.id
        self.register_outputs(
            {
                "group_name": self.group_name,
                "launch_template_id": self.launch_template_id,
                "scale_out_alarm_name": self.scale_out_alarm_name,
            }
        )

    def _scale_on_backlog(self, name: str, args: WorkerFleetArgs, child: pulumi.ResourceOptions) -> None:
        tt = aws.autoscaling
        spec_metric = _TrackedMetric
        stat = tt.PolicyTargetTrackingConfigurationCustomizedMetricSpecificationMetricMetricStatArgs
        stat_metric = (
            tt.PolicyTargetTrackingConfigurationCustomizedMetricSpecificationMetricMetricStatMetricArgs
        )
        dimension = _TrackedDimension

        def queue_metric(metric_id: str, metric_name: str, queue: Input[str]) -> _TrackedMetric:
            return spec_metric(
                id=metric_id,
                metric_stat=stat(
                    metric=stat_metric(
                        namespace="AWS/SQS",
                        metric_name=metric_name,
                        dimensions=[dimension(name="QueueName", value=queue)],
                    ),
                    stat="Sum",
                ),
                return_data=False,
            )

        # Messages being worked on count too: otherwise the last busy worker is scaled in mid-job.
        metrics: list[_TrackedMetric] = []
        terms: list[str] = []
        for i, queue in enumerate(args.queue_names):
            metrics.append(queue_metric(f"visible{i}", "ApproximateNumberOfMessagesVisible", queue))
            metrics.append(queue_metric(f"inflight{i}", "ApproximateNumberOfMessagesNotVisible", queue))
            terms += [f"visible{i}", f"inflight{i}"]
        metrics.append(
            spec_metric(
                id="in_service",
                metric_stat=stat(
                    metric=stat_metric(
                        namespace="AWS/AutoScaling",
                        metric_name="GroupInServiceInstances",
                        dimensions=[dimension(name="AutoScalingGroupName", value=self.group.name)],
                    ),
                    stat="Average",
                ),
                return_data=False,
            )
        )
        metrics.append(
            spec_metric(
                id="backlog_per_instance",
                expression=f"({' + '.join(terms)}) / in_service",
                label=f"{args.service} messages per in-service instance",
                return_data=True,
            )
        )
        self.backlog_policy = aws.autoscaling.Policy(
            f"{name}-backlog",
            autoscaling_group_name=self.group.name,
            policy_type="TargetTrackingScaling",
            target_tracking_configuration=tt.PolicyTargetTrackingConfigurationArgs(
                target_value=float(args.backlog_per_instance),
                customized_metric_specification=(
                    tt.PolicyTargetTrackingConfigurationCustomizedMetricSpecificationArgs(metrics=metrics)
                ),
            ),
            opts=child,
        )
        self.scale_from_zero_policy = aws.autoscaling.Policy(
            f"{name}-from-zero",
            autoscaling_group_name=self.group.name,
            policy_type="StepScaling",
            adjustment_type="ExactCapacity",
            metric_aggregation_type="Maximum",
            step_adjustments=[
                tt.PolicyStepAdjustmentArgs(scaling_adjustment=1, metric_interval_lower_bound="0")
            ],
            opts=child,
        )
        query = aws.cloudwatch.MetricAlarmMetricQueryArgs
        query_metric = aws.cloudwatch.MetricAlarmMetricQueryMetricArgs
        queries = [
            query(
                id=f"visible{i}",
                metric=query_metric(
                    namespace="AWS/SQS",
                    metric_name="ApproximateNumberOfMessagesVisible",
                    dimensions={"QueueName": queue},
                    period=60,
                    stat="Maximum",
                ),
                return_data=False,
            )
            for i, queue in enumerate(args.queue_names)
        ]
        queries.append(
            query(
                id="desired",
                metric=query_metric(
                    namespace="AWS/AutoScaling",
                    metric_name="GroupDesiredCapacity",
                    dimensions={"AutoScalingGroupName": self.group.name},
                    period=60,
                    stat="Maximum",
                ),
                return_data=False,
            )
        )
        waiting = " + ".join(f"FILL(visible{i}, 0)" for i in range(len(args.queue_names)))
        queries.append(
            query(
                id="waiting_on_empty_group",
                expression=f"IF(FILL(desired, 0) == 0, {waiting}, 0)",
                label=f"{args.service} messages waiting while the group is empty",
                return_data=True,
            )
        )
        self.scale_out_alarm = aws.cloudwatch.MetricAlarm(
            f"{name}-from-zero",
            alarm_description=(
                f"tessera {args.service}: messages wait and no worker is wanted; start the first one "
                "(target tracking takes over from one instance)"
            ),
            comparison_operator="GreaterThanThreshold",
            threshold=0,
            evaluation_periods=1,
            datapoints_to_alarm=1,
            treat_missing_data="notBreaching",
            metric_queries=queries,
            alarm_actions=[self.scale_from_zero_policy.arn],
            opts=child,
        )
        self.scale_out_alarm_name = self.scale_out_alarm.name


def _check(args: WorkerFleetArgs) -> None:
    if not re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*", args.service):
        raise ValueError(f"service name {args.service!r}: use lower-case letters, digits and single hyphens")
    if not 0 <= args.min_size <= args.max_size or args.max_size < 1:
        raise ValueError(
            f"need 0 <= min_size <= max_size and max_size >= 1, got {args.min_size}..{args.max_size}"
        )
    if args.backlog_per_instance < 1:
        raise ValueError(f"backlog_per_instance must be at least 1, got {args.backlog_per_instance}")
    bad_ports = [p for p in args.published_ports if not 1 <= int(p) <= 65535]
    if bad_ports:
        raise ValueError(f"published_ports must be TCP ports from 1 to 65535, got {bad_ports}")
    bad = [k for k in args.environment if not ENV_NAME.match(k)]
    if bad:
        raise ValueError(f"environment variable names must match [A-Za-z_][A-Za-z0-9_]*: {bad}")
