"""Security and lifecycle invariants of a planned stack, checked over everything it declares.

`tessera plan` prints the findings and the tests require none, for the dev and the production stacks:
nothing reachable from the internet but the jump host's SSH from configured addresses; Grafana and the
database reachable only from their named peers; every bucket encrypted and private; IMDSv2 and encrypted
volumes on every instance; no secret in the program's inputs; least-privilege IAM; data stores protected
outside throw-away stacks; and no data store in the compute layer, so destroying compute loses no data.

Each rule is one function over plain resource :class:`Record` s, so the same code runs in two places: the
offline audit (:func:`audit`, records from an :class:`~stacks.offline.OfflineRun`) and the CrossGuard
policy pack in ``policy/`` that ``pulumi preview --policy-pack policy`` runs (records from the stack's
``PolicyResource`` s, :func:`records_from_policy`). During a preview some values are not known yet (the id
of a security group about to be created); a rule never reports what it cannot know, and a reference whose
value is unknown is followed through the engine's property dependencies instead. The records are
``stacks/records.py``; the network-exposure rule, with the ingress rules the graph reads too, is
``stacks/exposure.py``.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from infra.iam import wildcard_violations
from stacks.exposure import Ingress, check_network_exposure, ingress_rules, owner_of
from stacks.offline import OfflineRun
from stacks.records import (
    SECRET_SIG,
    SIG,
    UNKNOWN,
    Context,
    Finding,
    Record,
    as_list,
    as_mapping,
    is_known,
    of_type,
    records_from_policy,
    records_of,
)
from stacks.settings import Settings

# The records (stacks/records.py) and the exposure rule's ingress (stacks/exposure.py) are imported from here
# too: the policy pack builds its records with the rules, the graph reads the ingress rules.
__all__ = [
    "DATA_STORE_TYPES",
    "RULES",
    "Context",
    "Finding",
    "Ingress",
    "Record",
    "Rule",
    "audit",
    "ingress_rules",
    "owner_of",
    "records_from_policy",
    "records_of",
    "run_rules",
]

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
SECRET_KEYS = {"password", "masterPassword", "secretString", "secretBinary", "secretKey", "accessKey"}
SECRET_PATTERNS = (
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"aws_secret_access_key\s*=", re.IGNORECASE),
)


# --- buckets ---------------------------------------------------------------------------------------------


def _by_bucket(records: Sequence[Record], type_token: str) -> list[tuple[frozenset[str], Record]]:
    return [(frozenset().union(*r.references("bucket")), r) for r in of_type(records, type_token)]


def _for_bucket(children: list[tuple[frozenset[str], Record]], bucket: Record) -> Record | None:
    return next((child for refs, child in children if refs & bucket.aliases), None)


def check_buckets(records: Sequence[Record], context: Context) -> Iterator[Finding]:
    """Every bucket: SSE-KMS, all public access blocked, TLS-only policy."""
    sse = _by_bucket(
        records, "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
    )
    blocks = _by_bucket(records, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
    policies = _by_bucket(records, "aws:s3/bucketPolicy:BucketPolicy")
    for bucket in of_type(records, "aws:s3/bucket:Bucket"):
        encryption = _for_bucket(sse, bucket)
        rules = as_list(encryption.get("rules")) if encryption else []
        algorithms = {
            as_mapping(as_mapping(rule).get("applyServerSideEncryptionByDefault")).get("sseAlgorithm")
            for rule in rules
        }
        # An algorithm is unknown only while a preview's resources do not exist yet.
        if UNKNOWN not in algorithms and (not algorithms or not algorithms <= {"aws:kms", "aws:kms:dsse"}):
            yield bucket.finding("encryption", "bucket without SSE-KMS default encryption")
        block = _for_bucket(blocks, bucket)
        flags = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
        if block is None or not all(block.get(f) is True for f in flags):
            yield bucket.finding("exposure", "bucket without a full public access block")
        policy = _for_bucket(policies, bucket)
        document = policy.get("policy") if policy else None
        if not is_known(document):
            continue  # built from values a preview does not know yet
        if document is None or not _denies_insecure_transport(json.loads(str(document))):
            yield bucket.finding("encryption", "bucket policy does not deny requests without TLS")


def _denies_insecure_transport(policy: dict[str, Any]) -> bool:
    for statement in policy.get("Statement", []):
        condition = statement.get("Condition", {}).get("Bool", {})
        if statement.get("Effect") == "Deny" and str(condition.get("aws:SecureTransport")).lower() == "false":
            return True
    return False


def _is_true(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


# --- instances -------------------------------------------------------------------------------------------


def check_instances(records: Sequence[Record], context: Context) -> Iterator[Finding]:
    """IMDSv2 on every instance and launch template; every EBS volume encrypted."""
    for r in of_type(records, "aws:ec2/instance:Instance", "aws:ec2/launchTemplate:LaunchTemplate"):
        if as_mapping(r.get("metadataOptions")).get("httpTokens") != "required":
            yield r.finding("imdsv2", "instance metadata must require tokens (IMDSv2)")
        if r.type.endswith(":Instance"):
            devices = [
                as_mapping(r.get("rootBlockDevice")),
                *map(as_mapping, as_list(r.get("ebsBlockDevices"))),
            ]
            if not r.get("rootBlockDevice"):
                yield r.finding("encryption", "root volume not declared (and so not encrypted)")
        else:
            devices = [as_mapping(as_mapping(m).get("ebs")) for m in as_list(r.get("blockDeviceMappings"))]
            if not devices:
                yield r.finding("encryption", "launch template declares no (encrypted) root volume")
        for device in devices:
            if device and is_known(device.get("encrypted")) and not _is_true(device.get("encrypted")):
                yield r.finding("encryption", "unencrypted EBS volume")
    for volume in of_type(records, "aws:ebs/volume:Volume"):
        if is_known(volume.get("encrypted")) and not _is_true(volume.get("encrypted")):
            yield volume.finding("encryption", "unencrypted EBS volume")


# --- secrets ---------------------------------------------------------------------------------------------


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


def check_secrets(records: Sequence[Record], context: Context) -> Iterator[Finding]:
    """No password, key or secret value in any resource input (user data included).

    A value fetched from a provider at deploy time (the ECR login token the image push uses) is not inline.
    """
    for r in records:
        if not r.custom:
            continue
        for key, value in _strings(r.props):
            if not is_known(value):
                continue
            if key in SECRET_KEYS and value not in (None, "", False) and value not in context.fetched:
                yield r.finding("secrets", f"inline secret in {key!r}: use Secrets Manager")
            if isinstance(value, str):
                text = _decoded(key, value)
                for pattern in SECRET_PATTERNS:
                    if pattern.search(text):
                        yield r.finding("secrets", f"{key!r} holds something that looks like a secret")


# --- encryption at rest, queues --------------------------------------------------------------------------


def check_encryption_at_rest(records: Sequence[Record], context: Context) -> Iterator[Finding]:
    """Database, queues and logs encrypted; queues have dead-letter queues."""
    for db in of_type(records, "aws:rds/instance:Instance"):
        if not db.get("storageEncrypted"):
            yield db.finding("encryption", "database storage not encrypted")
    queues = of_type(records, "aws:sqs/queue:Queue")
    dead_letters: set[str] = set()
    for q in queues:
        redrive = q.get("redrivePolicy")
        if isinstance(redrive, str) and redrive:
            dead_letters.add(str(json.loads(redrive).get("deadLetterTargetArn")))
        elif redrive is UNKNOWN:  # computed from the dead-letter queue's ARN: follow the dependency
            dead_letters.update(*q.deps.get("redrivePolicy", ()))
    for q in queues:
        if not (q.get("kmsMasterKeyId") or q.get("sqsManagedSseEnabled")):
            yield q.finding("encryption", "queue without server-side encryption")
        if not q.get("redrivePolicy") and not q.aliases & dead_letters:
            yield q.finding("queues", "work queue without a dead-letter queue")


# --- IAM -------------------------------------------------------------------------------------------------


def check_iam(records: Sequence[Record], context: Context) -> Iterator[Finding]:
    """Every IAM policy scoped to named resources (the few unscopable AWS actions aside)."""
    for r in of_type(records, "aws:iam/rolePolicy:RolePolicy", "aws:iam/policy:Policy"):
        document = r.get("policy")
        if not is_known(document):
            continue  # names ARNs a preview does not know yet
        for problem in wildcard_violations(json.loads(str(document))):
            yield r.finding("iam", problem)
    for attachment in of_type(records, "aws:iam/rolePolicyAttachment:RolePolicyAttachment"):
        arn = str(attachment.get("policyArn"))
        if arn.startswith("arn:aws:iam::aws:policy/") and (
            "FullAccess" in arn or arn.endswith("/AdministratorAccess")
        ):
            yield attachment.finding("iam", f"broad managed policy {arn}")


# --- lifecycle -------------------------------------------------------------------------------------------


def check_lifecycle(records: Sequence[Record], context: Context) -> Iterator[Finding]:
    """Data stores protected outside throw-away stacks; no data store in the compute layer."""
    protect = context.settings.protect_data if context.settings else False
    for r in records:
        if r.type not in DATA_STORE_TYPES or not r.custom:
            continue
        if r.layer == "compute" and r.type not in COMPUTE_DATA_ALLOWED:
            yield r.finding("lifecycle", "data store in the compute layer: a destroy of compute loses it")
        if protect and r.layer == "data" and not r.protect:
            yield r.finding("lifecycle", "data store without protect outside a throw-away stack")
    if protect:
        for db in of_type(records, "aws:rds/instance:Instance"):
            protection = db.get("deletionProtection")
            if (is_known(protection) and protection is not True) or db.get("skipFinalSnapshot") is True:
                yield db.finding("lifecycle", "database without deletion protection and final snapshot")
        for bucket in of_type(records, "aws:s3/bucket:Bucket"):
            if bucket.get("forceDestroy") is True:
                yield bucket.finding("lifecycle", "force_destroy on a bucket outside a throw-away stack")


# --- the rules, and the offline audit --------------------------------------------------------------------

RuleCheck = Callable[[Sequence[Record], Context], Iterator[Finding]]


@dataclass(frozen=True)
class Rule:
    """One rule: its policy name (in the CrossGuard pack), what it requires, and its check."""

    name: str
    description: str
    check: RuleCheck


#: Every rule, in the order the audit reports them; the policy pack makes one stack policy of each.
RULES: tuple[Rule, ...] = (
    Rule(
        "tessera-network-exposure",
        "Nothing reachable from the internet but the jump host's SSH from configured addresses; Grafana and "
        "the database only from their named peers; no public database, no public address but the jump host.",
        check_network_exposure,
    ),
    Rule(
        "tessera-buckets",
        "Every S3 bucket: SSE-KMS, a full public access block, a TLS-only policy.",
        check_buckets,
    ),
    Rule(
        "tessera-instances",
        "IMDSv2 on every instance and launch template; every EBS volume encrypted.",
        check_instances,
    ),
    Rule(
        "tessera-secrets",
        "No password, key or secret value in any resource input (user data included).",
        check_secrets,
    ),
    Rule(
        "tessera-encryption-at-rest",
        "The database and every queue encrypted; every work queue has a dead-letter queue.",
        check_encryption_at_rest,
    ),
    Rule(
        "tessera-iam", "Every IAM policy scoped to named resources; no broad AWS managed policy.", check_iam
    ),
    Rule(
        "tessera-lifecycle",
        "Data stores protected (RDS deletion protection and final snapshot) outside throw-away stacks; no "
        "data store in the compute layer.",
        check_lifecycle,
    ),
)


def run_rules(records: Sequence[Record], context: Context) -> list[Finding]:
    """Every rule over ``records``."""
    return [finding for rule in RULES for finding in rule.check(records, context)]


def audit(run: OfflineRun, settings: Settings | None = None) -> list[Finding]:
    """Every broken invariant in a planned stack (an empty list is the goal)."""
    return run_rules(records_of(run), Context(settings, frozenset(run.mocks.fetched_values)))
