"""Facts about a planned stack that mocks cannot prove by running it: who can reach whom, who may do what.

A box that cannot reach its database, or a CloudWatch agent whose role cannot read the tags it names, passes
every mock and fails only on AWS. These checks read the declared resource graph instead: each compute unit
(an EC2 instance, a launch template, a Lambda function in the VPC) with its security groups, its IAM role,
and the text that configures it (user data, the SSM parameter its user data reads, its environment).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from stacks.audit import Finding, ingress_rules, owner_of
from stacks.offline import Declared, OfflineRun

POSTGRES_PORT = 5432
DATABASE_COMPONENT = "tessera:infra:Database"
#: What a unit's configuration says when it connects to the database (stacks/program.service_environment).
DATABASE_MARKER = "TESSERA_DB_HOST"
#: A CloudWatch agent dimension that the agent resolves from the instance's tags (ec2:DescribeTags).
TAG_DIMENSION_MARKER = "${aws:AutoScalingGroupName}"


@dataclass(frozen=True)
class ComputeUnit:
    """Something that runs code in the VPC: its security groups, its role and its configuration text."""

    resource: Declared
    security_group_ids: tuple[str, ...]
    #: The IAM role's name (instances and launch templates, through their instance profile) or ARN (Lambda).
    role: str | None
    config_text: str

    @property
    def label(self) -> str:
        """``Instance tessera-training-instance``, as findings name resources."""
        return f"{self.resource.type.split(':')[-1]} {self.resource.name}"


_BASE64_WORD = re.compile(r"[A-Za-z0-9+/]{40,}={0,2}")


def _decoded(text: str) -> str:
    """``text`` base64-decoded when it is base64, with every base64 blob inside it decoded and appended
    (user data ships files such as the agent's configuration that way)."""
    with contextlib.suppress(binascii.Error, UnicodeDecodeError, ValueError):
        text = base64.b64decode(text, validate=True).decode()
    inner = []
    for word in _BASE64_WORD.findall(text):
        try:
            inner.append(base64.b64decode(word, validate=True).decode())
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
    return "\n".join([text, *inner])


def _parameter_values(run: OfflineRun, text: str) -> str:
    """The values of the SSM parameters whose names ``text`` mentions (the box reads them at boot)."""
    values = []
    for parameter in run.of_type("aws:ssm/parameter:Parameter"):
        name = parameter.get("name")
        if name and str(name) in text:
            values.append(str(parameter.inputs.get("value") or ""))
    return "\n".join(values)


def _profile_roles(run: OfflineRun) -> dict[str, str]:
    return {
        str(p.get("name")): str(p.inputs.get("role"))
        for p in run.of_type("aws:iam/instanceProfile:InstanceProfile")
    }


def compute_units(run: OfflineRun) -> list[ComputeUnit]:
    """Every instance, launch template and VPC Lambda function the stack declares."""
    profiles = _profile_roles(run)
    units = []
    for r in run.of_type("aws:ec2/instance:Instance"):
        text = _decoded(str(r.inputs.get("userData") or ""))
        units.append(
            ComputeUnit(
                r,
                tuple(str(g) for g in r.inputs.get("vpcSecurityGroupIds") or ()),
                profiles.get(str(r.inputs.get("iamInstanceProfile"))),
                text + "\n" + _parameter_values(run, text),
            )
        )
    for r in run.of_type("aws:ec2/launchTemplate:LaunchTemplate"):
        groups = [str(g) for g in r.inputs.get("vpcSecurityGroupIds") or ()]
        for interface in r.inputs.get("networkInterfaces") or ():
            groups += [str(g) for g in interface.get("securityGroups") or ()]
        text = _decoded(str(r.inputs.get("userData") or ""))
        profile = (r.inputs.get("iamInstanceProfile") or {}).get("name")
        units.append(
            ComputeUnit(
                r, tuple(groups), profiles.get(str(profile)), text + "\n" + _parameter_values(run, text)
            )
        )
    for r in run.of_type("aws:lambda/function:Function"):
        vpc = r.inputs.get("vpcConfig") or {}
        environment = (r.inputs.get("environment") or {}).get("variables") or {}
        units.append(
            ComputeUnit(
                r,
                tuple(str(g) for g in vpc.get("securityGroupIds") or ()),
                str(r.inputs.get("role")) if r.inputs.get("role") else None,
                json.dumps(environment, sort_keys=True),
            )
        )
    return units


def database_admitted_groups(run: OfflineRun, port: int = POSTGRES_PORT) -> set[str]:
    """The security groups the database's own security group admits on ``port``."""
    database_groups = {
        str(sg.get("id"))
        for sg in run.of_type("aws:ec2/securityGroup:SecurityGroup")
        if owner_of(run, sg) == DATABASE_COMPONENT
    }
    return {
        source
        for rule in ingress_rules(run)
        if rule.group_id in database_groups and rule.from_port <= port <= rule.to_port
        for source in rule.source_groups
    }


def check_database_reachable(run: OfflineRun, data_run: OfflineRun | None = None) -> Iterator[Finding]:
    """Every compute unit configured to use the database carries a group the database admits on 5432.

    ``data_run`` is the data stack's run when the database lives in another stack than the compute.
    """
    admitted = database_admitted_groups(data_run or run)
    for unit in compute_units(run):
        if DATABASE_MARKER in unit.config_text and not admitted.intersection(unit.security_group_ids):
            yield Finding(
                "database-unreachable",
                unit.label,
                f"is configured with the database ({DATABASE_MARKER}) but none of its security groups "
                f"{list(unit.security_group_ids)} is admitted by the database's security group on "
                f"{POSTGRES_PORT}; give it its service's security group",
            )


def _statements(policy: Any) -> Iterable[dict[str, Any]]:
    document = json.loads(policy) if isinstance(policy, str) else policy
    statements = (document or {}).get("Statement") or []
    return [statements] if isinstance(statements, dict) else statements


def role_actions(run: OfflineRun, role: str) -> set[str]:
    """Every action the role's inline policies allow (lower case), the role named by name or ARN."""
    names = {role}
    for r in run.of_type("aws:iam/role:Role"):
        if role in (str(r.get("name")), str(r.get("arn"))):
            names |= {str(r.get("name")), str(r.get("arn"))}
    actions: set[str] = set()
    for policy in run.of_type("aws:iam/rolePolicy:RolePolicy"):
        if str(policy.inputs.get("role")) not in names:
            continue
        for statement in _statements(policy.inputs.get("policy")):
            if statement.get("Effect") != "Allow":
                continue
            listed = statement.get("Action") or []
            actions |= {a.lower() for a in ([listed] if isinstance(listed, str) else listed)}
    return actions


def check_agent_can_read_tags(run: OfflineRun) -> Iterator[Finding]:
    """A CloudWatch agent told to add a tag-derived dimension runs under a role allowed ec2:DescribeTags.

    Without it the agent cannot resolve ``${aws:AutoScalingGroupName}`` and the fleet's GPU and memory
    panels stay empty.
    """
    for unit in compute_units(run):
        if TAG_DIMENSION_MARKER not in unit.config_text:
            continue
        if unit.role is None or "ec2:describetags" not in role_actions(run, unit.role):
            yield Finding(
                "agent-cannot-read-tags",
                unit.label,
                f"its CloudWatch agent adds {TAG_DIMENSION_MARKER} but its role "
                f"({unit.role or 'none'}) may not call ec2:DescribeTags",
            )


#: The S3 service principal: the sender of bucket event notifications.
S3_PRINCIPAL = "s3.amazonaws.com"
#: The AWS managed key of SQS: its key policy cannot be changed, so S3 can never send to a queue using it.
AWS_MANAGED_SQS_KEY = "alias/aws/sqs"


def _listed(value: Any) -> list[str]:
    return [str(v) for v in ([value] if isinstance(value, str) else value or [])]


def _condition_values(statement: dict[str, Any], key: str) -> set[str]:
    """Every value a statement's conditions give ``key`` (under any operator)."""
    found: set[str] = set()
    for clauses in (statement.get("Condition") or {}).values():
        for name, value in (clauses or {}).items():
            if name.lower() == key.lower():
                found.update(_listed(value))
    return found


def queue_senders(policy: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(principal, statement) for each statement of a queue policy that allows sqs:SendMessage."""
    senders = []
    for statement in _statements(policy):
        actions = {a.lower() for a in _listed(statement.get("Action"))}
        if statement.get("Effect") == "Allow" and actions & {"sqs:sendmessage", "sqs:*", "*"}:
            principal = statement.get("Principal")
            senders.append(({"*": principal} if isinstance(principal, str) else principal or {}, statement))
    return senders


def _s3_may_send(policy: Any, bucket_arn: str) -> bool:
    for principal, statement in queue_senders(policy):
        if S3_PRINCIPAL in _listed(principal.get("Service")) and bucket_arn in _condition_values(
            statement, "aws:SourceArn"
        ):
            return True
    return False


def _key_lets_s3_send(key: Declared | None) -> bool:
    """Whether a customer managed key's policy lets the S3 service make and read SQS data keys."""
    if key is None:
        return False
    granted: set[str] = set()
    for statement in _statements(key.inputs.get("policy")):
        principal = statement.get("Principal") or {}
        services = _listed(principal.get("Service")) if isinstance(principal, dict) else []
        if statement.get("Effect") == "Allow" and S3_PRINCIPAL in services:
            granted |= {a.lower() for a in _listed(statement.get("Action"))}
    wildcard = {"kms:*", "*"}
    return bool(granted & (wildcard | {"kms:generatedatakey", "kms:generatedatakey*"})) and bool(
        granted & (wildcard | {"kms:decrypt", "kms:decrypt*"})
    )


def check_s3_notifications_deliverable(run: OfflineRun) -> Iterator[Finding]:
    """Every S3 event notification to a queue can be delivered on AWS.

    Under mocks any notification "works". On AWS S3 sends to the queue as the S3 service: the queue's policy
    must allow ``s3.amazonaws.com`` to send for that bucket (``aws:SourceArn``), the notification must be
    created after that policy (S3 validates the destination then, and refuses it otherwise), and the
    queue's encryption must be one S3 can use: SSE-SQS, or a customer managed key whose policy lets S3 call
    ``kms:GenerateDataKey`` and ``kms:Decrypt`` (never the AWS managed ``alias/aws/sqs``).
    """
    queues = {str(q.get("arn")): q for q in run.of_type("aws:sqs/queue:Queue")}
    policies = {str(p.inputs.get("queueUrl")): p for p in run.of_type("aws:sqs/queuePolicy:QueuePolicy")}
    buckets = {str(b.get("bucket")): b for b in run.of_type("aws:s3/bucket:Bucket")}
    keys = {
        ref: k
        for k in run.of_type("aws:kms/key:Key")
        for ref in (str(k.get("arn")), str(k.get("keyId")), str(k.get("id")))
    }
    for notification in run.of_type("aws:s3/bucketNotification:BucketNotification"):
        label = f"BucketNotification {notification.name}"
        name = str(notification.inputs.get("bucket"))
        bucket = buckets.get(name)
        bucket_arn = str(bucket.get("arn")) if bucket else f"arn:aws:s3:::{name}"
        for target in notification.inputs.get("queues") or []:
            arn = str(target.get("queueArn"))
            queue = queues.get(arn)
            if queue is None:
                yield Finding("s3-notification", label, f"sends to {arn}, which this stack does not declare")
                continue
            policy = policies.get(str(queue.get("url")))
            if policy is None or not _s3_may_send(policy.inputs.get("policy"), bucket_arn):
                yield Finding(
                    "s3-notification",
                    label,
                    f"sends to queue {queue.name}, whose policy does not let {S3_PRINCIPAL} send for "
                    f"{bucket_arn} (aws:SourceArn); S3 refuses the configuration",
                )
            elif (policy.type, policy.name) not in notification.depends_on:
                yield Finding(
                    "s3-notification",
                    label,
                    f"does not depend on {policy.name}: S3 validates queue {queue.name} when the "
                    "configuration is put and refuses it if the policy is not in place yet",
                )
            key = str(queue.inputs.get("kmsMasterKeyId") or "")
            if not key:
                continue
            if key.endswith(AWS_MANAGED_SQS_KEY):  # the alias or its ARN
                yield Finding(
                    "s3-notification",
                    label,
                    f"sends to queue {queue.name}, encrypted with {AWS_MANAGED_SQS_KEY}, which S3 cannot "
                    "use; use SSE-SQS or a customer managed key that lets S3 use it",
                )
            elif not _key_lets_s3_send(keys.get(key)):
                yield Finding(
                    "s3-notification",
                    label,
                    f"sends to queue {queue.name}, encrypted with {key}, whose key policy does not let "
                    f"{S3_PRINCIPAL} call kms:GenerateDataKey and kms:Decrypt; S3 drops every event",
                )


def graph_findings(run: OfflineRun, data_run: OfflineRun | None = None) -> list[Finding]:
    """Every reachability and permission finding of the graph checks above."""
    return [
        *check_database_reachable(run, data_run),
        *check_agent_can_read_tags(run),
        *check_s3_notifications_deliverable(run),
    ]
