"""Security and lifecycle invariants of a planned stack, checked over everything it declares.

`tessera plan` prints the findings and the tests require none, for the dev and the production stacks:
nothing reachable from the internet but the jump host's SSH from configured addresses; Grafana and the
database reachable only from their named peers; every bucket encrypted and private; IMDSv2 and encrypted
volumes on every instance; no secret in the program's inputs; least-privilege IAM; data stores protected
outside throw-away stacks; and no data store in the compute layer, so destroying compute loses no data.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from infra.iam import wildcard_violations
from stacks.offline import Declared, OfflineRun
from stacks.settings import Settings

#: Resource types that hold data and must survive a destroy of the compute layer.
DATA_STORE_TYPES = (
    "aws:s3/bucket:Bucket",
    "aws:rds/instance:Instance",
    "aws:sqs/queue:Queue",
    "aws:kms/key:Key",
    "aws:ecr/repository:Repository",
    "aws:cloudwatch/logGroup:LogGroup",
    "aws:ebs/volume:Volume",
)
#: Data stores that may live in the compute layer because they hold nothing but that box's scratch data.
COMPUTE_DATA_ALLOWED = ("aws:ebs/volume:Volume",)
OPEN = ("0.0.0.0/0", "::/0")
SECRET_KEYS = {"password", "masterPassword", "secretString", "secretBinary", "secretKey", "accessKey"}
SECRET_PATTERNS = (
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"aws_secret_access_key\s*=", re.IGNORECASE),
)


@dataclass(frozen=True)
class Finding:
    """One broken invariant: which rule, which resource, what is wrong."""

    rule: str
    resource: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.resource}: {self.detail}"


@dataclass(frozen=True)
class Ingress:
    """One ingress rule, whichever resource type declared it."""

    group_id: str
    from_port: int
    to_port: int
    cidrs: tuple[str, ...]
    source_groups: tuple[str, ...]
    declared_by: Declared


def _ports(value: Any) -> int:
    return int(value) if value is not None else -1


def ingress_rules(run: OfflineRun) -> list[Ingress]:
    """Every ingress rule: inline on security groups, and standalone rule resources."""
    rules: list[Ingress] = []
    for sg in run.of_type("aws:ec2/securityGroup:SecurityGroup") + run.of_type(
        "aws:ec2/defaultSecurityGroup:DefaultSecurityGroup"
    ):
        for rule in sg.inputs.get("ingress") or []:
            rules.append(
                Ingress(
                    str(sg.get("id")),
                    _ports(rule.get("fromPort")),
                    _ports(rule.get("toPort")),
                    tuple(rule.get("cidrBlocks") or []) + tuple(rule.get("ipv6CidrBlocks") or []),
                    tuple(rule.get("securityGroups") or []) + (("self",) if rule.get("self") else ()),
                    sg,
                )
            )
    for r in run.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"):
        cidrs = tuple(c for c in (r.inputs.get("cidrIpv4"), r.inputs.get("cidrIpv6")) if c)
        source = r.inputs.get("referencedSecurityGroupId")
        rules.append(
            Ingress(
                str(r.inputs.get("securityGroupId")),
                _ports(r.inputs.get("fromPort")),
                _ports(r.inputs.get("toPort")),
                cidrs,
                (str(source),) if source else (),
                r,
            )
        )
    for r in run.of_type("aws:ec2/securityGroupRule:SecurityGroupRule"):
        if r.inputs.get("type") != "ingress":
            continue
        source = r.inputs.get("sourceSecurityGroupId")
        rules.append(
            Ingress(
                str(r.inputs.get("securityGroupId")),
                _ports(r.inputs.get("fromPort")),
                _ports(r.inputs.get("toPort")),
                tuple(r.inputs.get("cidrBlocks") or []) + tuple(r.inputs.get("ipv6CidrBlocks") or []),
                (str(source),) if source else (),
                r,
            )
        )
    return rules


def owner_of(run: OfflineRun, resource: Declared) -> str | None:
    """The type of the nearest infra component a resource belongs to (``tessera:infra:JumpHost``...)."""
    for ancestor in run.ancestors(resource):
        if ancestor.type.startswith("tessera:infra:"):
            return ancestor.type
    return None


def _groups_of(run: OfflineRun, component_type: str) -> set[str]:
    return {
        str(sg.get("id"))
        for sg in run.of_type("aws:ec2/securityGroup:SecurityGroup")
        if owner_of(run, sg) == component_type
    }


def _label(r: Declared) -> str:
    return f"{r.type.split(':')[-1]} {r.name}"


def check_network_exposure(run: OfflineRun, settings: Settings | None = None) -> Iterator[Finding]:
    """No ingress from the internet but the jump host's SSH; Grafana and the database only from peers."""
    jump = _groups_of(run, "tessera:infra:JumpHost")
    grafana = _groups_of(run, "tessera:infra:Monitoring")
    database = _groups_of(run, "tessera:infra:Database")
    services = _groups_of(run, "tessera:infra:Network")
    allowed_ssh = set(settings.jump_host_allowed_cidrs) if settings else None
    for rule in ingress_rules(run):
        where = _label(rule.declared_by)
        if rule.group_id in jump:
            if (rule.from_port, rule.to_port) != (22, 22) or rule.source_groups:
                yield Finding(
                    "exposure", where, "the jump host accepts only SSH (tcp 22) from configured CIDRs"
                )
            for cidr in rule.cidrs:
                if cidr in OPEN:
                    yield Finding("exposure", where, f"jump host SSH open to {cidr}")
                elif allowed_ssh is not None and cidr not in allowed_ssh:
                    yield Finding("exposure", where, f"jump host SSH from {cidr}, not a configured address")
            continue
        if rule.cidrs:
            yield Finding(
                "exposure", where, f"ingress from CIDRs {list(rule.cidrs)}: only peers by security group"
            )
        if rule.group_id in grafana and not set(rule.source_groups) <= jump:
            yield Finding("exposure", where, "Grafana reachable from something other than the jump host")
        if rule.group_id in database:
            if not rule.source_groups or not set(rule.source_groups) <= services:
                yield Finding(
                    "exposure", where, "the database reachable from something other than a service group"
                )
            if (rule.from_port, rule.to_port) != (5432, 5432):
                yield Finding("exposure", where, "the database exposes ports other than 5432")
        if rule.group_id in services:
            yield Finding("exposure", where, "service security groups take no ingress")
    for db in run.of_type("aws:rds/instance:Instance"):
        if db.inputs.get("publiclyAccessible"):
            yield Finding("exposure", _label(db), "the database is publicly accessible")
    for instance in run.of_type("aws:ec2/instance:Instance"):
        if (
            instance.inputs.get("associatePublicIpAddress")
            and owner_of(run, instance) != "tessera:infra:JumpHost"
        ):
            yield Finding("exposure", _label(instance), "only the jump host may have a public address")


def _bucket_refs(run: OfflineRun, type_token: str) -> dict[str, Declared]:
    return {str(r.inputs.get("bucket")): r for r in run.of_type(type_token)}


def check_buckets(run: OfflineRun) -> Iterator[Finding]:
    """Every bucket: SSE-KMS, all public access blocked, TLS-only policy."""
    sse = _bucket_refs(
        run, "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
    )
    blocks = _bucket_refs(run, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
    policies = _bucket_refs(run, "aws:s3/bucketPolicy:BucketPolicy")
    for bucket in run.of_type("aws:s3/bucket:Bucket"):
        name = str(bucket.get("bucket"))
        where = _label(bucket)
        rules = (sse[name].inputs.get("rules") or []) if name in sse else []
        algorithms = {
            (rule.get("applyServerSideEncryptionByDefault") or {}).get("sseAlgorithm") for rule in rules
        }
        if not algorithms or not algorithms <= {"aws:kms", "aws:kms:dsse"}:
            yield Finding("encryption", where, "bucket without SSE-KMS default encryption")
        block = blocks.get(name)
        flags = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
        if block is None or not all(block.inputs.get(f) is True for f in flags):
            yield Finding("exposure", where, "bucket without a full public access block")
        policy = policies.get(name)
        if policy is None or not _denies_insecure_transport(json.loads(str(policy.inputs.get("policy")))):
            yield Finding("encryption", where, "bucket policy does not deny requests without TLS")


def _denies_insecure_transport(policy: dict[str, Any]) -> bool:
    for statement in policy.get("Statement", []):
        condition = statement.get("Condition", {}).get("Bool", {})
        if statement.get("Effect") == "Deny" and str(condition.get("aws:SecureTransport")).lower() == "false":
            return True
    return False


def _is_true(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


def check_instances(run: OfflineRun) -> Iterator[Finding]:
    """IMDSv2 on every instance and launch template; every EBS volume encrypted."""
    for r in run.of_type("aws:ec2/instance:Instance") + run.of_type("aws:ec2/launchTemplate:LaunchTemplate"):
        where = _label(r)
        if (r.inputs.get("metadataOptions") or {}).get("httpTokens") != "required":
            yield Finding("imdsv2", where, "instance metadata must require tokens (IMDSv2)")
        if r.type.endswith(":Instance"):
            devices = [r.inputs.get("rootBlockDevice") or {}, *(r.inputs.get("ebsBlockDevices") or [])]
            if not r.inputs.get("rootBlockDevice"):
                yield Finding("encryption", where, "root volume not declared (and so not encrypted)")
        else:
            devices = [(m.get("ebs") or {}) for m in r.inputs.get("blockDeviceMappings") or []]
            if not devices:
                yield Finding("encryption", where, "launch template declares no (encrypted) root volume")
        for device in devices:
            if device and not _is_true(device.get("encrypted")):
                yield Finding("encryption", where, "unencrypted EBS volume")
    for volume in run.of_type("aws:ebs/volume:Volume"):
        if not _is_true(volume.inputs.get("encrypted")):
            yield Finding("encryption", _label(volume), "unencrypted EBS volume")


#: How the engine marks a secret value in serialized inputs: ``{SIG: SECRET_SIG, "value": ...}``.
SIG, SECRET_SIG = "4dabf18193072939515e22adb298388d", "1b47061264138c4ac30d75fd1eb44270"


def _strings(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value.get(SIG) == SECRET_SIG:
        yield from _strings(value.get("value"), key)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v, key)
    else:
        yield key, value


def _decoded(key: str, value: str) -> str:
    if key in ("userData", "userDataBase64") or key.endswith("Base64"):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError:
            return value
        try:
            return gzip.decompress(raw).decode("utf-8", "replace")
        except OSError:
            return raw.decode("utf-8", "replace")
    return value


def check_secrets(run: OfflineRun) -> Iterator[Finding]:
    """No password, key or secret value in any resource input (user data included).

    A value fetched from a provider at deploy time (the ECR login token the image push uses) is not inline.
    """
    fetched = run.mocks.fetched_values
    for r in run.custom_resources():
        for key, value in _strings(r.inputs):
            if key in SECRET_KEYS and value not in (None, "", False) and value not in fetched:
                yield Finding("secrets", _label(r), f"inline secret in {key!r}: use Secrets Manager")
            if isinstance(value, str):
                text = _decoded(key, value)
                for pattern in SECRET_PATTERNS:
                    if pattern.search(text):
                        yield Finding(
                            "secrets", _label(r), f"{key!r} holds something that looks like a secret"
                        )


def check_encryption_at_rest(run: OfflineRun) -> Iterator[Finding]:
    """Database, queues and logs encrypted; queues have dead-letter queues."""
    for db in run.of_type("aws:rds/instance:Instance"):
        if not db.inputs.get("storageEncrypted"):
            yield Finding("encryption", _label(db), "database storage not encrypted")
    queues = run.of_type("aws:sqs/queue:Queue")
    dead_letter_arns = set()
    for q in queues:
        if q.inputs.get("redrivePolicy"):
            dead_letter_arns.add(json.loads(str(q.inputs["redrivePolicy"])).get("deadLetterTargetArn"))
    for q in queues:
        if not (q.inputs.get("kmsMasterKeyId") or q.inputs.get("sqsManagedSseEnabled")):
            yield Finding("encryption", _label(q), "queue without server-side encryption")
        if not q.inputs.get("redrivePolicy") and q.get("arn") not in dead_letter_arns:
            yield Finding("queues", _label(q), "work queue without a dead-letter queue")


def check_iam(run: OfflineRun) -> Iterator[Finding]:
    """Every IAM policy scoped to named resources (the few unscopable AWS actions aside)."""
    for r in run.of_type("aws:iam/rolePolicy:RolePolicy") + run.of_type("aws:iam/policy:Policy"):
        for problem in wildcard_violations(json.loads(str(r.inputs.get("policy")))):
            yield Finding("iam", _label(r), problem)
    for attachment in run.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment"):
        arn = str(attachment.inputs.get("policyArn"))
        if arn.startswith("arn:aws:iam::aws:policy/") and (
            "FullAccess" in arn or arn.endswith("/AdministratorAccess")
        ):
            yield Finding("iam", _label(attachment), f"broad managed policy {arn}")


def check_lifecycle(run: OfflineRun, settings: Settings | None) -> Iterator[Finding]:
    """Data stores protected outside throw-away stacks; no data store in the compute layer."""
    from stacks.cost import layer_of

    protect = settings.protect_data if settings else False
    for r in run.custom_resources():
        if r.type not in DATA_STORE_TYPES:
            continue
        layer = layer_of(run, r)
        if layer == "compute" and r.type not in COMPUTE_DATA_ALLOWED:
            yield Finding(
                "lifecycle", _label(r), "data store in the compute layer: a destroy of compute loses it"
            )
        if protect and layer == "data" and not r.protect:
            yield Finding("lifecycle", _label(r), "data store without protect outside a throw-away stack")
    if protect:
        for db in run.of_type("aws:rds/instance:Instance"):
            if not db.inputs.get("deletionProtection") or db.inputs.get("skipFinalSnapshot"):
                yield Finding(
                    "lifecycle", _label(db), "database without deletion protection and final snapshot"
                )
        for bucket in run.of_type("aws:s3/bucket:Bucket"):
            if bucket.inputs.get("forceDestroy"):
                yield Finding(
                    "lifecycle", _label(bucket), "force_destroy on a bucket outside a throw-away stack"
                )


def audit(run: OfflineRun, settings: Settings | None = None) -> list[Finding]:
    """Every broken invariant in a planned stack (an empty list is the goal)."""
    findings: list[Finding] = []
    findings += check_network_exposure(run, settings)
    findings += check_buckets(run)
    findings += check_instances(run)
    findings += check_secrets(run)
    findings += check_encryption_at_rest(run)
    findings += check_iam(run)
    findings += check_lifecycle(run, settings)
    return findings
