"""The auto-stop safety net: a scheduled Lambda function that stops idle instances tagged for auto-stop, and
starts the stopped training instance when training jobs wait on its queue.

It does not depend on the instances at all, so it catches a training box whose own idle agent, CloudWatch
agent or utilisation publisher has died (the box's idle alarm reads metrics that box publishes; silence is
also what this function looks for). The function's code is the ``services/autostop`` directory, which the
stack passes in as a path: infra never imports service code.

An instance counts as busy when its accelerators work or when it sent the busy heartbeat (a job running, data
staging, someone logged in: ``infra.training.BUSY_NAMESPACE``); silence on both counts as idle.

Whoever queues a training job (``tessera train submit``, the sight catalog's refresher), the next run starts
the stack's stopped training instance (:attr:`AutoStopArgs.job_queues`): no service role needs EC2 rights, and
a job waits at most ``schedule_minutes`` before its box starts. A training box with jobs waiting is given
``idle_minutes + start_grace_minutes`` from its start to boot and take one.

Its role may describe instances and read metrics everywhere (AWS offers no narrower scope for those), but
may stop only instances that carry ``tessera:auto-stop=true`` and its stack's ``tessera:stack`` (two stacks'
functions, each with its own idle period and queues, never stop each other's boxes), start only the
training instances of its stack (``tessera:role=training``, ``tessera:start-on-demand=true``,
``tessera:stack``), let EC2 use the key of their encrypted volumes while it starts them (``kms:CreateGrant``
for an AWS resource, via EC2 only: a start without it fails at launch), read only the job queues'
attributes, and write only to its own log group. When the function fails, its error alarm notifies the
alerts topic (:attr:`AutoStop.alerts_topic_arn`, encrypted with ``kms_key_arn``), which the stack outputs for
an operator to subscribe to.
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
ROLE_TAG = "tessera:role"
ROLE_TRAINING = "training"
START_ON_DEMAND_TAG = "tessera:start-on-demand"
START_ON_DEMAND_VALUE = "true"
STACK_TAG = "tessera:stack"
"""The training instance's functional tags (``infra/training.py``; ``tessera:stack`` is a default tag of the
stack's provider): the function may start only an instance that carries all three."""

PACKAGE = "autostop"
"""The package name the code has inside the deployment zip."""
HANDLER = f"{PACKAGE}.handler.handler"
RUNTIME = "python3.12"

IDLE_MINUTES_ENV = "TESSERA_AUTOSTOP_IDLE_MINUTES"
THRESHOLD_ENV = "TESSERA_AUTOSTOP_THRESHOLD_PERCENT"
METRICS_ENV = "TESSERA_AUTOSTOP_METRICS"
BUSY_METRIC_ENV = "TESSERA_AUTOSTOP_BUSY_METRIC"
JOB_QUEUE_URLS_ENV = "TESSERA_AUTOSTOP_JOB_QUEUE_URLS"
TRAINING_STACK_ENV = "TESSERA_AUTOSTOP_TRAINING_STACK"
START_GRACE_ENV = "TESSERA_AUTOSTOP_START_GRACE_MINUTES"

DEFAULT_METRICS: tuple[tuple[str, str], ...] = (
    (AGENT_NAMESPACE, NVIDIA_UTILIZATION_METRIC),
    (ACCELERATOR_NAMESPACE, ACCELERATOR_UTILIZATION_METRIC),
)
"""Utilisation metrics (namespace, name) with an ``InstanceId`` dimension: NVIDIA via the CloudWatch agent,
Gaudi and Neuron via the instance's own publisher."""


@dataclass(frozen=True)
class JobQueue:
    """A queue of training jobs: its visible messages make the function start the training instance."""

    url: Input[str]
    """Its URL (the function reads its attributes)."""
    arn: Input[str]
    """Its ARN (the function's role may read its attributes, nothing more)."""


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
    job_queues: Sequence[JobQueue] = ()
    """The training-jobs queue(s): while one holds visible messages the function starts a stopped training
    instance of ``training_stack``, and spares one for ``start_grace_minutes`` beyond the idle period from its
    start. Empty: it starts nothing, and its role may not."""
    training_stack: str | None = None
    """The ``tessera:stack`` tag of the instances it looks after (it stops only that stack's idle auto-stop
    instances, and starts only its training instance); None: the current Pulumi stack."""
    start_grace_minutes: int = 15
    """Minutes beyond ``idle_minutes`` a training instance with jobs waiting gets, from its start, to boot
    (image pull included) and take one before the idle rule may stop it."""
    training_volume_kms_key_arn: Input[str] | None = None
    """The KMS key of the training instances' encrypted volumes: starting an instance makes EC2 create a grant
    on it in the caller's name. None: the volumes use the AWS-managed EBS key (no grant needed)."""

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
        if self.start_grace_minutes < 0:
            raise ValueError(
                f"AutoStopArgs.start_grace_minutes must be 0 or more, got {self.start_grace_minutes}"
            )
        if self.training_stack is not None and not self.training_stack.strip():
            raise ValueError("AutoStopArgs.training_stack must be a stack name, or None for this stack")
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


def start_statements(
    *,
    region: str,
    account_id: str,
    training_stack: str,
    job_queue_arns: Sequence[str],
    volume_kms_key_arn: str | None = None,
) -> list[dict[str, object]]:
    """What starting the stack's training instance for queued jobs needs: count the jobs, start the instance
    (by its tags), and let EC2 use its volumes' key. Empty without queues."""
    if not job_queue_arns:
        return []
    partition = partition_of(region)
    statements: list[dict[str, object]] = [
        {
            "Sid": "CountQueuedJobs",
            "Effect": "Allow",
            "Action": ["sqs:GetQueueAttributes"],
            "Resource": list(job_queue_arns),
        },
        {
            "Sid": "StartTrainingInstancesOfThisStack",
            "Effect": "Allow",
            "Action": ["ec2:StartInstances"],
            "Resource": f"arn:{partition}:ec2:{region}:{account_id}:instance/*",
            "Condition": {
                "StringEquals": {
                    f"ec2:ResourceTag/{ROLE_TAG}": ROLE_TRAINING,
                    f"ec2:ResourceTag/{START_ON_DEMAND_TAG}": START_ON_DEMAND_VALUE,
                    f"ec2:ResourceTag/{STACK_TAG}": training_stack,
                }
            },
        },
    ]
    if volume_kms_key_arn is not None:
        dns_suffix = "amazonaws.com.cn" if partition == "aws-cn" else "amazonaws.com"
        statements.append(
            {
                # StartInstances has EC2 create a grant on the volumes' key in the caller's name; without it
                # the instance goes from pending back to stopped (Client.InternalError).
                "Sid": "LetEc2UseTheTrainingVolumesKey",
                "Effect": "Allow",
                "Action": ["kms:CreateGrant"],
                "Resource": volume_kms_key_arn,
                "Condition": {
                    "Bool": {"kms:GrantIsForAWSResource": "true"},
                    "StringEquals": {"kms:ViaService": f"ec2.{region}.{dns_suffix}"},
                },
            }
        )
    return statements


def role_policy(
    *,
    region: str,
    account_id: str,
    log_group_arn: str,
    training_stack: str,
    job_queue_arns: Sequence[str] = (),
    volume_kms_key_arn: str | None = None,
) -> dict[str, object]:
    """The function's permissions: find instances, read utilisation, stop only the instances of
    ``training_stack`` tagged for auto-stop, log; with job queues, also count their jobs and start only that
    stack's training instances (:func:`start_statements`)."""
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
                # Only this stack's boxes: another stack's function looks after its own, by its settings.
                "Condition": {
                    "StringEquals": {
                        f"ec2:ResourceTag/{AUTO_STOP_TAG}": AUTO_STOP_VALUE,
                        f"ec2:ResourceTag/{STACK_TAG}": training_stack,
                    }
                },
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
            *start_statements(
                region=region,
                account_id=account_id,
                training_stack=training_stack,
                job_queue_arns=job_queue_arns,
                volume_kms_key_arn=volume_kms_key_arn,
            ),
        ],
    }


class AutoStop(pulumi.ComponentResource):
    """A Lambda function, run on a schedule, that stops idle instances of its stack tagged
    ``tessera:auto-stop=true`` and starts its training instance for queued jobs."""

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
        training_stack = args.training_stack or pulumi.get_stack()
        queue_arns = [queue.arn for queue in args.job_queues]
        # The volumes' key matters only to an instance this function starts.
        volume_key = args.training_volume_kms_key_arn if args.job_queues else None
        self.policy_json = Output.all(
            account_id=account_id,
            log_group_arn=log_group_arn,
            queue_arns=queue_arns,
            volume_key=volume_key,
        ).apply(
            lambda v: json.dumps(
                role_policy(
                    region=args.region,
                    account_id=v["account_id"],
                    log_group_arn=v["log_group_arn"],
                    training_stack=training_stack,
                    job_queue_arns=v["queue_arns"],
                    volume_kms_key_arn=v["volume_key"],
                )
            )
        )
        self.policy = aws.iam.RolePolicy(
            f"{name}-policy", role=self.role.name, policy=self.policy_json, opts=child
        )

        metrics = json.dumps([{"namespace": ns, "metric": metric} for ns, metric in args.metrics])
        busy_namespace, busy_metric = args.busy_metric
        queue_urls = Output.json_dumps([queue.url for queue in args.job_queues])
        self.function = aws.lambda_.Function(
            f"{name}-fn",
            description=(
                "tessera safety net: stop this stack's instances tagged tessera:auto-stop whose accelerators "
                "idle; start the training instance for queued jobs"
            ),
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
                    JOB_QUEUE_URLS_ENV: queue_urls,
                    TRAINING_STACK_ENV: training_stack,
                    START_GRACE_ENV: str(args.start_grace_minutes),
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
