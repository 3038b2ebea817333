"""The auto-stop safety net: a scheduled Lambda function that stops idle instances tagged for auto-stop.

It does not depend on the instances at all, so it catches a training box whose own idle agent, CloudWatch
agent or utilisation publisher has died (the box's idle alarm reads metrics that box publishes; silence is
also what this function looks for). The function's code is the ``services/autostop`` directory, which the
stack passes in as a path: infra never imports service code.

An instance counts as busy when its accelerators work or when it sent the busy heartbeat (a job running, data
staging, someone logged in: ``infra.training.BUSY_NAMESPACE``); silence on both counts as idle.

Its role may describe instances and read metrics everywhere (AWS offers no narrower scope for those), but
may stop only instances that carry ``tessera:auto-stop=true``, and write only to its own log group. When
the function fails, its error alarm notifies the alerts topic (:attr:`AutoStop.alerts_topic_arn`, encrypted
with ``kms_key_arn``), which the stack outputs for an operator to subscribe to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pulumi
import pulumi_aws as aws
from pulumi import Input, Output

from infra.cloudwatch_agent import (
    ACCELERATOR_NAMESPACE,
    ACCELERATOR_UTILIZATION_METRIC,
    AGENT_NAMESPACE,
    NVIDIA_UTILIZATION_METRIC,
)
from infra.encryption import partition_of
from infra.iam import trust_policy
from infra.logs import check_retention
from infra.training import BUSY_METRIC, BUSY_NAMESPACE

AUTO_STOP_TAG = "tessera:auto-stop"
"""The tag (value ``"true"``) that puts an instance under the safety net; ``infra/training.py`` sets it."""
AUTO_STOP_VALUE = "true"

PACKAGE = "autostop"
"""The package name the code has inside the deployment zip."""
HANDLER = f"{PACKAGE}.handler.handler"
RUNTIME = "python3.12"

IDLE_MINUTES_ENV = "TESSERA_AUTOSTOP_IDLE_MINUTES"
THRESHOLD_ENV = "TESSERA_AUTOSTOP_THRESHOLD_PERCENT"
METRICS_ENV = "TESSERA_AUTOSTOP_METRICS"
BUSY_METRIC_ENV = "TESSERA_AUTOSTOP_BUSY_METRIC"

DEFAULT_METRICS: tuple[tuple[str, str], ...] = (
    (AGENT_NAMESPACE, NVIDIA_UTILIZATION_METRIC),
    (ACCELERATOR_NAMESPACE, ACCELERATOR_UTILIZATION_METRIC),
)
"""Utilisation metrics (namespace, name) with an ``InstanceId`` dimension: NVIDIA via the CloudWatch agent,
Gaudi and Neuron via the instance's own publisher."""


@dataclass
class AutoStopArgs:
    """Settings of the auto-stop safety net."""

    code_dir: str
    """The directory holding the function's code (``services/autostop``: ``__init__.py``, ``handler.py``)."""
    region: str
    """The AWS region (scopes the stop permission to instances there)."""
    account_id: Input[str] | None = None
    """The AWS account (scopes the stop permission); None looks it up."""
    idle_minutes: int = 15
    """Minutes an instance's accelerators must stay below the threshold (and it must be up) to be stopped."""
    gpu_idle_threshold_percent: float = 5.0
    """Utilisation (percent, busiest accelerator) below which an instance counts as idle."""
    metrics: Sequence[tuple[str, str]] = DEFAULT_METRICS
    """Utilisation metrics to read, as (namespace, metric name), each with an ``InstanceId`` dimension."""
    busy_metric: tuple[str, str] = (BUSY_NAMESPACE, BUSY_METRIC)
    """The busy heartbeat (namespace, metric name): 1 in the idle period spares an instance."""
    schedule_minutes: int = 5
    """How often the function runs."""
    log_group_name: Input[str] | None = None
    """The function's log group; None derives ``/tessera/<stack>/<name>``."""
    log_group_arn: Input[str] | None = None
    """ARN of an existing group named ``log_group_name`` (the data layer's, which outlives compute and keeps
    the audit's "no data store in compute" rule); None creates the group here."""
    log_retention_days: int = 30
    """How long its log events are kept, when the group is created here (a value CloudWatch Logs accepts)."""
    kms_key_arn: Input[str] | None = None
    """KMS key for the alerts topic and for a log group created here; its policy must let CloudWatch Logs
    (the group) and CloudWatch alarms (``cloudwatch.amazonaws.com``: the topic) use it. None: the topic is
    unencrypted (alarms cannot publish to a topic under the AWS-managed SNS key)."""
    alarm_actions: Sequence[Input[str]] = field(default_factory=list)
    """More SNS topic ARNs the "safety net failing" alarm notifies, besides the component's alerts topic."""

    def __post_init__(self) -> None:
        if self.idle_minutes < 1:
            raise ValueError(f"AutoStopArgs.idle_minutes must be at least 1, got {self.idle_minutes}")
        if not 0 < self.gpu_idle_threshold_percent < 100:
            raise ValueError("AutoStopArgs.gpu_idle_threshold_percent must be between 0 and 100")
        if not 1 <= self.schedule_minutes <= self.idle_minutes:
            raise ValueError(
                f"AutoStopArgs.schedule_minutes must be 1..idle_minutes ({self.idle_minutes}), "
                f"got {self.schedule_minutes}"
            )
        if not self.metrics:
            raise ValueError("AutoStopArgs.metrics must name at least one utilisation metric")
        check_retention("AutoStopArgs.log_retention_days", self.log_retention_days)
        if self.log_group_arn is not None and self.log_group_name is None:
            raise ValueError(
                "AutoStopArgs.log_group_arn needs log_group_name: the group's name, for the function"
            )
        handler = Path(self.code_dir) / "handler.py"
        if not handler.is_file():
            raise ValueError(
                f"AutoStopArgs.code_dir={self.code_dir!r} has no handler.py; pass services/autostop"
            )


def code_archive(code_dir: str) -> pulumi.AssetArchive:
    """The deployment zip: the directory's ``*.py`` files as the ``autostop`` package (no caches)."""
    files = sorted(Path(code_dir).glob("*.py"))
    return pulumi.AssetArchive({f"{PACKAGE}/{f.name}": pulumi.FileAsset(str(f)) for f in files})


def schedule_expression(minutes: int) -> str:
    """EventBridge's rate expression for every ``minutes`` minutes."""
    return "rate(1 minute)" if minutes == 1 else f"rate({minutes} minutes)"


def role_policy(*, region: str, account_id: str, log_group_arn: str) -> dict[str, object]:
    """The function's permissions: find instances, read utilisation, stop only tagged instances, log."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                # DescribeInstances has no resource-level permissions.
                "Sid": "FindInstances",
                "Effect": "Allow",
                "Action": ["ec2:DescribeInstances"],
                "Resource": "*",
            },
            {
                "Sid": "StopAutoStopInstances",
                "Effect": "Allow",
                "Action": ["ec2:StopInstances"],
                "Resource": f"arn:{partition_of(region)}:ec2:{region}:{account_id}:instance/*",
                "Condition": {"StringEquals": {f"ec2:ResourceTag/{AUTO_STOP_TAG}": AUTO_STOP_VALUE}},
            },
            {
                # Metric reads have no resource-level permissions either.
                "Sid": "ReadUtilisation",
                "Effect": "Allow",
                "Action": ["cloudwatch:GetMetricData", "cloudwatch:GetMetricStatistics"],
                "Resource": "*",
            },
            {
                "Sid": "WriteOwnLogs",
                "Effect": "Allow",
                "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                "Resource": f"{log_group_arn}:*",
            },
        ],
    }


class AutoStop(pulumi.ComponentResource):
    """A Lambda function, run on a schedule, that stops idle instances tagged ``tessera:auto-stop=true``."""

    function_name: pulumi.Output[str]
    function_arn: pulumi.Output[str]
    role_arn: pulumi.Output[str]
    log_group_name: pulumi.Output[str]
    schedule_rule_name: pulumi.Output[str]
    errors_alarm_name: pulumi.Output[str]
    alerts_topic_arn: pulumi.Output[str]

    def __init__(self, name: str, args: AutoStopArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tessera:infra:AutoStop", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        account_id: Input[str] = (
            args.account_id
            if args.account_id is not None
            else aws.get_caller_identity_output(opts=pulumi.InvokeOutputOptions(parent=self)).account_id
        )

        self.log_group: aws.cloudwatch.LogGroup | None = None
        log_group_name: Input[str]
        log_group_arn: Input[str]
        if args.log_group_arn is not None and args.log_group_name is not None:
            log_group_name, log_group_arn = args.log_group_name, args.log_group_arn
        else:
            self.log_group = aws.cloudwatch.LogGroup(
                f"{name}-logs",
                name=args.log_group_name or f"/tessera/{pulumi.get_stack()}/{name}",
                retention_in_days=args.log_retention_days,
                kms_key_id=args.kms_key_arn,
                opts=child,
            )
            log_group_name, log_group_arn = self.log_group.name, self.log_group.arn
        self.role = aws.iam.Role(
            f"{name}-role",
            description=f"tessera {name}: stop idle auto-stop instances",
            assume_role_policy=json.dumps(trust_policy("lambda.amazonaws.com")),
            force_detach_policies=True,
            opts=child,
        )
        self.policy_json = Output.all(account_id, log_group_arn).apply(
            lambda v: json.dumps(role_policy(region=args.region, account_id=v[0], log_group_arn=v[1]))
        )
        self.policy = aws.iam.RolePolicy(
            f"{name}-policy", role=self.role.name, policy=self.policy_json, opts=child
        )

        metrics = json.dumps([{"namespace": ns, "metric": metric} for ns, metric in args.metrics])
        busy_namespace, busy_metric = args.busy_metric
        self.function = aws.lambda_.Function(
            f"{name}-fn",
            description="tessera safety net: stop instances tagged tessera:auto-stop whose accelerators idle",
            runtime=RUNTIME,
            architectures=["arm64"],
            handler=HANDLER,
            code=code_archive(args.code_dir),
            role=self.role.arn,
            timeout=60,
            memory_size=128,
            environment=aws.lambda_.FunctionEnvironmentArgs(
                variables={
                    IDLE_MINUTES_ENV: str(args.idle_minutes),
                    THRESHOLD_ENV: f"{args.gpu_idle_threshold_percent:g}",
                    METRICS_ENV: metrics,
                    BUSY_METRIC_ENV: json.dumps({"namespace": busy_namespace, "metric": busy_metric}),
                }
            ),
            logging_config=aws.lambda_.FunctionLoggingConfigArgs(log_format="Text", log_group=log_group_name),
            # The policy must exist before the first scheduled run, or that run fails for lack of rights.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.policy]),
        )

        self.schedule = aws.cloudwatch.EventRule(
            f"{name}-schedule",
            description=f"run the tessera auto-stop safety net every {args.schedule_minutes} minutes",
            schedule_expression=schedule_expression(args.schedule_minutes),
            opts=child,
        )
        self.permission = aws.lambda_.Permission(
            f"{name}-invoke",
            action="lambda:InvokeFunction",
            function=self.function.name,
            principal="events.amazonaws.com",
            source_arn=self.schedule.arn,
            opts=child,
        )
        aws.cloudwatch.EventTarget(
            f"{name}-target",
            rule=self.schedule.name,
            arn=self.function.arn,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.permission]),
        )
        # A safety net that fails does so silently: alarm on errors for two runs in a row, and tell someone.
        self.alerts_topic = aws.sns.Topic(
            f"{name}-alerts",
            display_name=f"tessera {name}: the auto-stop safety net is failing",
            kms_master_key_id=args.kms_key_arn,
            opts=child,
        )
        self.errors_alarm = aws.cloudwatch.MetricAlarm(
            f"{name}-errors",
            alarm_description=f"tessera auto-stop function {name} is failing: idle instances are not stopped",
            namespace="AWS/Lambda",
            metric_name="Errors",
            dimensions={"FunctionName": self.function.name},
            statistic="Sum",
            period=args.schedule_minutes * 60,
            evaluation_periods=2,
            threshold=1,
            comparison_operator="GreaterThanOrEqualToThreshold",
            treat_missing_data="notBreaching",
            alarm_actions=[self.alerts_topic.arn, *args.alarm_actions],
            # ... and when it works again.
            ok_actions=[self.alerts_topic.arn, *args.alarm_actions],
            opts=child,
        )

        self.function_name = self.function.name
        self.function_arn = self.function.arn
        self.role_arn = self.role.arn
        self.log_group_name = Output.from_input(log_group_name)
        self.schedule_rule_name = self.schedule.name
        self.errors_alarm_name = self.errors_alarm.name
        self.alerts_topic_arn = self.alerts_topic.arn
        self.register_outputs(
            {
                "alerts_topic_arn": self.alerts_topic_arn,
                "function_name": self.function_name,
                "function_arn": self.function_arn,
                "role_arn": self.role_arn,
                "log_group_name": self.log_group_name,
                "schedule_rule_name": self.schedule_rule_name,
            }
        )
