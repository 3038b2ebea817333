"""One least-privilege IAM role per service, built from an explicit list of what the service may touch.

A service never gets a managed policy or a wildcard: :class:`ServiceAccess` names every queue, bucket
prefix, secret, key, repository and log group, and the inline policy grants only the actions each use needs.
:func:`wildcard_violations` is the auditor's check, shared with whole-program tests.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws
from pulumi import Input, Output

CONSUME_QUEUE_ACTIONS = [
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibility",
    "sqs:GetQueueAttributes",
    "sqs:GetQueueUrl",
]
SEND_QUEUE_ACTIONS = ["sqs:SendMessage", "sqs:GetQueueAttributes", "sqs:GetQueueUrl"]
READ_OBJECT_ACTIONS = ["s3:GetObject"]
WRITE_OBJECT_ACTIONS = ["s3:PutObject", "s3:AbortMultipartUpload"]
SECRET_ACTIONS = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
KMS_ACTIONS = ["kms:Decrypt", "kms:GenerateDataKey"]
ECR_PULL_ACTIONS = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"]
DATABASE_CONNECT_ACTIONS = ["rds-db:connect"]
LOG_ACTIONS = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
CLOUDWATCH_READ_ACTIONS = [
    "cloudwatch:GetMetricData",
    "cloudwatch:ListMetrics",
    "cloudwatch:GetMetricStatistics",
    "cloudwatch:DescribeAlarms",
]

# Actions AWS offers no resource scoping for, so Resource "*" is the only way to grant them.
# cloudwatch:PutMetricData is allowed only together with a cloudwatch:namespace condition.
UNSCOPABLE_ACTIONS = frozenset(
    a.lower()
    for a in [
        "ecr:GetAuthorizationToken",
        "cloudwatch:PutMetricData",
        "cloudwatch:DescribeAlarmsForMetric",
        # Grafana's CloudWatch data source finds dimension values by tag; the tagging API has no resources.
        "tag:GetResources",
        *CLOUDWATCH_READ_ACTIONS,
    ]
)
UNSCOPABLE_ACTION_PATTERNS = ("ec2:describe*",)  # read-only EC2 describes
NAMESPACE_CONDITIONED_ACTIONS = frozenset({"cloudwatch:putmetricdata"})


@dataclass(frozen=True)
class BucketGrant:
    """Access to the objects of one bucket under one key prefix."""

    bucket_arn: Input[str]
    """ARN of the bucket (``arn:aws:s3:::name``)."""
    prefix: str = "*"
    """Key prefix, e.g. ``"models/"``; ``"*"`` (the default) means every key in the bucket."""

    def __post_init__(self) -> None:
        if self.prefix.startswith("/"):
            raise ValueError(f"BucketGrant prefix {self.prefix!r}: S3 keys do not start with '/'; drop it")

    @property
    def key_pattern(self) -> str:
        """The key pattern IAM matches: the prefix followed by ``*``."""
        return self.prefix.rstrip("*") + "*"


@dataclass(frozen=True)
class ServiceAccess:
    """Exactly what one service may touch; anything not listed here is denied."""

    consume_queue_arns: Sequence[Input[str]] = ()
    """Queues the service receives from and deletes from (and extends visibility on)."""
    send_queue_arns: Sequence[Input[str]] = ()
    """Queues the service sends to."""
    read_buckets: Sequence[BucketGrant] = ()
    """Bucket prefixes the service reads (GetObject, and ListBucket limited to the prefix)."""
    write_buckets: Sequence[BucketGrant] = ()
    """Bucket prefixes the service writes (PutObject, AbortMultipartUpload); writing grants no reading."""
    secret_arns: Sequence[Input[str]] = ()
    """Secrets Manager secrets the service reads."""
    database_user_arns: Sequence[Input[str]] = ()
    """Database users the service logs in as with an IAM token
    (``arn:aws:rds-db:<region>:<account>:dbuser:<DbiResourceId>/<user>``)."""
    kms_key_arns: Sequence[Input[str]] = ()
    """KMS keys the service decrypts with and generates data keys from (SSE-KMS buckets, queues, secrets)."""
    ecr_repository_arns: Sequence[Input[str]] = ()
    """ECR repositories the service (its instance) pulls images from."""
    log_group_arns: Sequence[Input[str]] = ()
    """CloudWatch log groups the service writes streams to (ARNs without the trailing ``:*``)."""
    metrics_namespaces: Sequence[str] = ()
    """CloudWatch namespaces the service publishes custom metrics to."""
    cloudwatch_read: bool = False
    """Read metrics and alarms (Grafana's CloudWatch data source)."""
    extra_statements: Sequence[Input[dict[str, Any]]] = ()
    """Further statements for the rare special case; each must carry its own Sid."""

    def __post_init__(self) -> None:
        unnamed = [s for s in self.extra_statements if isinstance(s, dict) and not s.get("Sid")]
        if unnamed:
            raise ValueError(f"every extra statement needs a Sid; missing on {unnamed}")


@dataclass
class ServiceRoleArgs:
    """Settings of one service role."""

    service: str
    """Service name, e.g. ``"model-runner"``; used in descriptions."""
    access: ServiceAccess
    """What the role may touch."""
    trusted_service: str = "ec2.amazonaws.com"
    """The one AWS service principal allowed to assume the role."""
    instance_profile: bool = True
    """Create an EC2 instance profile for the role."""
    max_session_duration_s: int = 3600
    """Longest session the role's credentials last, in seconds (3600 to 43200)."""

    def __post_init__(self) -> None:
        if not 3600 <= self.max_session_duration_s <= 43200:
            raise ValueError(f"max_session_duration_s must be 3600..43200, got {self.max_session_duration_s}")


def _statement(sid: str, actions: Sequence[str], resources: Sequence[Input[str]] | str) -> dict[str, Any]:
    return {
        "Sid": sid,
        "Effect": "Allow",
        "Action": list(actions),
        "Resource": resources if isinstance(resources, str) else list(resources),
    }


def access_statements(access: ServiceAccess) -> list[Input[dict[str, Any]]]:
    """The policy statements :class:`ServiceAccess` grants, in a stable order (Inputs left unresolved)."""
    statements: list[Input[dict[str, Any]]] = []
    if access.consume_queue_arns:
        statements.append(_statement("ConsumeQueues", CONSUME_QUEUE_ACTIONS, access.consume_queue_arns))
    if access.send_queue_arns:
        statements.append(_statement("SendToQueues", SEND_QUEUE_ACTIONS, access.send_queue_arns))
    if access.read_buckets:
        objects = [Output.concat(g.bucket_arn, "/", g.key_pattern) for g in access.read_buckets]
        statements.append(_statement("ReadObjects", READ_OBJECT_ACTIONS, objects))
        for i, grant in enumerate(access.read_buckets):
            statement = _statement(f"ListReadBucket{i}", ["s3:ListBucket"], [grant.bucket_arn])
            if grant.key_pattern != "*":
                # Listing stays inside the granted prefix; without the condition every key name shows.
                statement["Condition"] = {"StringLike": {"s3:prefix": [grant.key_pattern]}}
            statements.append(statement)
    if access.write_buckets:
        objects = [Output.concat(g.bucket_arn, "/", g.key_pattern) for g in access.write_buckets]
        statements.append(_statement("WriteObjects", WRITE_OBJECT_ACTIONS, objects))
    if access.secret_arns:
        statements.append(_statement("ReadSecrets", SECRET_ACTIONS, access.secret_arns))
    if access.database_user_arns:
        statements.append(
            _statement("ConnectAsDatabaseUser", DATABASE_CONNECT_ACTIONS, access.database_user_arns)
        )
    if access.kms_key_arns:
        statements.append(_statement("UseKeys", KMS_ACTIONS, access.kms_key_arns))
    if access.ecr_repository_arns:
        statements.append(_statement("PullImages", ECR_PULL_ACTIONS, access.ecr_repository_arns))
        statements.append(_statement("EcrLogin", ["ecr:GetAuthorizationToken"], "*"))
    if access.log_group_arns:
        streams = [Output.concat(arn, ":*") for arn in access.log_group_arns]
        statements.append(_statement("WriteLogs", LOG_ACTIONS, streams))
    if access.metrics_namespaces:
        statement = _statement("PutMetrics", ["cloudwatch:PutMetricData"], "*")
        statement["Condition"] = {"StringEquals": {"cloudwatch:namespace": list(access.metrics_namespaces)}}
        statements.append(statement)
    if access.cloudwatch_read:
        statements.append(_statement("ReadCloudWatch", CLOUDWATCH_READ_ACTIONS, "*"))
    statements.extend(access.extra_statements)
    return statements


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _unscopable(action: str, statement: dict[str, Any]) -> bool:
    action = action.lower()
    if action in NAMESPACE_CONDITIONED_ACTIONS:
        conditions = statement.get("Condition") or {}
        return any("cloudwatch:namespace" in (block or {}) for block in conditions.values())
    return action in UNSCOPABLE_ACTIONS or any(fnmatch.fnmatch(action, p) for p in UNSCOPABLE_ACTION_PATTERNS)


def wildcard_violations(policy: dict[str, Any]) -> list[str]:
    """Statements of an IAM policy that grant more than they name; an empty list means the policy is tight.

    Flags Allow statements with Action ``"*"`` or ``"<service>:*"``, with NotAction or NotResource,
    ``rds-db:connect`` on a wildcard database user, and with
    Resource ``"*"`` for any action outside the allow-list of actions AWS cannot scope
    (ecr:GetAuthorizationToken, cloudwatch:PutMetricData with a ``cloudwatch:namespace`` condition, the
    CloudWatch read actions, read-only ``ec2:Describe*``).
    """
    found: list[str] = []
    for index, statement in enumerate(_as_list(policy.get("Statement"))):
        if statement.get("Effect") != "Allow":
            continue  # a Deny with wildcards only takes rights away
        label = f"statement {statement.get('Sid') or index!r}"
        for key in ("NotAction", "NotResource"):
            if key in statement:
                found.append(f"{label}: Allow with {key} grants everything not listed")
        actions = [str(a) for a in _as_list(statement.get("Action"))]
        for action in actions:
            if action == "*" or action.endswith(":*"):
                found.append(f"{label}: Action {action!r} grants every action")
        if any(a.lower() in ("rds-db:connect", "rds-db:*") for a in actions):
            # A wildcard in a dbuser ARN lets the role log in as any database user, the master included.
            users = [str(r) for r in _as_list(statement.get("Resource")) if "*" in str(r)]
            if users:
                found.append(f"{label}: rds-db:connect as any user of {', '.join(users)}")
        if "*" in _as_list(statement.get("Resource")):
            broad = [a for a in actions if not _unscopable(a, statement)]
            if broad:
                found.append(f"{label}: Resource '*' for actions that can be scoped: {', '.join(broad)}")
    return found


def trust_policy(service_principal: str) -> dict[str, Any]:
    """The trust policy of a role that only ``service_principal`` (``ec2.amazonaws.com``...) may assume."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "TrustedService",
                "Effect": "Allow",
                "Principal": {"Service": service_principal},
                "Action": "sts:AssumeRole",
            }
        ],
    }


class ServiceRole(pulumi.ComponentResource):
    """An IAM role (and instance profile) that lets one service touch exactly what its access lists."""

    role_arn: pulumi.Output[str]
    role_name: pulumi.Output[str]
    instance_profile_name: pulumi.Output[str] | None
    policy_json: pulumi.Output[str] | None
    """The inline policy document as JSON (None when the access lists nothing)."""

    def __init__(self, name: str, args: ServiceRoleArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tessera:infra:ServiceRole", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        trust = trust_policy(args.trusted_service)
        self.role = aws.iam.Role(
            f"{name}-role",
            description=f"tessera {args.service}: least-privilege service role",
            assume_role_policy=Output.json_dumps(trust),
            max_session_duration=args.max_session_duration_s,
            force_detach_policies=True,
            opts=child,
        )
        statements = access_statements(args.access)
        self.policy: aws.iam.RolePolicy | None = None
        self.policy_json = None
        if statements:  # IAM rejects a policy without statements
            self.policy_json = Output.json_dumps({"Version": "2012-10-17", "Statement": statements})
            self.policy = aws.iam.RolePolicy(
                f"{name}-policy", role=self.role.name, policy=self.policy_json, opts=child
            )
        self.profile: aws.iam.InstanceProfile | None = None
        self.instance_profile_name = None
        if args.instance_profile:
            self.profile = aws.iam.InstanceProfile(f"{name}-profile", role=self.role.name, opts=child)
            self.instance_profile_name = self.profile.name
        self.role_arn = self.role.arn
        self.role_name = self.role.name
        self.register_outputs(
            {
                "role_arn": self.role_arn,
                "role_name": self.role_name,
                "instance_profile_name": self.instance_profile_name,
            }
        )
