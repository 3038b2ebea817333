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
value is unknown is followed through the engine's property dependencies instead.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from infra.iam import wildcard_violations
from stacks.cost import LAYER_TYPES
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
    """One broken invariant: which rule, which resource, what is wrong (``urn``: the resource's, if known)."""

    rule: str
    resource: str
    detail: str
    urn: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"[{self.rule}] {self.resource}: {self.detail}"


# --- records: what every rule reads ----------------------------------------------------------------------


class Unknown:
    """A value the engine does not know yet (a preview of a resource about to be created)."""

    def __repr__(self) -> str:
        return "<unknown>"


#: The one unknown value; truthy, never equal to a known value, never a string.
UNKNOWN = Unknown()

#: The engine's sentinels for unknown values, as the policy SDK hands them over (pulumi-policy's proxy.py).
UNKNOWN_SENTINELS = frozenset(
    {
        "1c4a061d-8072-4f0a-a4cb-0ff528b18fe7",  # boolean
        "3eeb2bf0-c639-47a8-9e75-3b44932eb421",  # number
        "04da6b54-80e4-46f7-96ec-b56ff0331ba9",  # string
        "6a19a0b0-7e62-4c92-b797-7f8e31da9cc2",  # array
        "030794c1-ac77-496b-92df-f27374a8bd58",  # asset
        "e48ece36-62e2-4504-bad9-02848725956a",  # archive
        "dd056dcd-154b-4c76-9bd3-c8f88648b5ff",  # object
    }
)


@dataclass(frozen=True)
class Record:
    """One declared resource as the rules see it, wherever it came from.

    ``props`` holds inputs and outputs by engine key (camelCase), :data:`UNKNOWN` where not known yet;
    ``ancestors`` the type tokens of its parents, nearest first; ``deps`` (policy path only) the aliases of
    the resources each property's value was computed from; ``source`` the object it was made from.
    """

    type: str
    name: str
    props: Mapping[str, Any]
    ancestors: tuple[str, ...] = ()
    protect: bool = False
    custom: bool = True
    urn: str = ""
    deps: Mapping[str, tuple[frozenset[str], ...]] = field(default_factory=dict)
    source: Any = field(default=None, compare=False, repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        """A property by its engine key."""
        return self.props.get(key, default)

    @property
    def aliases(self) -> frozenset[str]:
        """What another resource's property holds when it points at this one: its id (or ARN, or name for
        a bucket) once known, and its URN (what the engine's dependencies name)."""
        names = {self.urn} if self.urn else set()
        for key in ("id", "arn", "bucket") if self.type.startswith("aws:s3/bucket") else ("id", "arn"):
            value = self.props.get(key)
            if isinstance(value, str) and value:
                names.add(value)
        return frozenset(names)

    @property
    def ref(self) -> str:
        """The id once known, else the URN: one string that names this resource."""
        value = self.props.get("id")
        return value if isinstance(value, str) and value else self.urn

    def references(self, key: str) -> tuple[frozenset[str], ...]:
        """The resources (as alias sets) property ``key`` points at: its known values, or, where the engine
        recorded the resources the value was computed from, those."""
        value = self.props.get(key)
        if self.deps.get(key):
            if isinstance(value, str) and len(self.deps[key]) == 1:
                return (self.deps[key][0] | {value},)
            return self.deps[key]
        values = value if isinstance(value, list) else [value]
        return tuple(frozenset({v}) for v in values if isinstance(v, str) and v)

    @property
    def owner(self) -> str | None:
        """The type of the nearest infra component it belongs to (``tessera:infra:JumpHost``...)."""
        return next((a for a in self.ancestors if a.startswith("tessera:infra:")), None)

    @property
    def layer(self) -> str:
        """'data', 'compute', or 'stack' (providers and references), from its place in the program."""
        for kind in (self.type, *self.ancestors):
            if kind in LAYER_TYPES:
                return LAYER_TYPES[kind]
        return "stack"

    @property
    def label(self) -> str:
        return f"{self.type.split(':')[-1]} {self.name}"

    def finding(self, rule: str, detail: str) -> Finding:
        return Finding(rule, self.label, detail, self.urn)


def records_of(run: OfflineRun) -> list[Record]:
    """Every resource of an offline run as a record (props: its inputs, then its mocked outputs over them)."""
    return [
        Record(
            type=r.type,
            name=r.name,
            props={**r.inputs, **r.outputs},
            ancestors=tuple(a.type for a in run.ancestors(r)),
            protect=r.protect,
            custom=r.custom,
            urn=f"urn:offline:{r.type}::{r.name}",
            source=r,
        )
        for r in run.resources
    ]


def _raw(value: Any) -> Any:
    # The policy SDK wraps dicts and lists in proxies that raise on unknown values; "__target" unwraps one.
    if isinstance(value, Mapping | Sequence) and not isinstance(value, str | bytes):
        try:
            return value["__target"]  # type: ignore[call-overload]
        except (KeyError, TypeError, IndexError):
            return value
    return value


def plain(value: Any) -> Any:
    """A policy SDK value as plain dicts and lists, with :data:`UNKNOWN` for every unknown and the secrets
    the engine marks unwrapped (as the SDK hands them over)."""
    value = _raw(value)
    if isinstance(value, Mapping) and value.get(SIG) == SECRET_SIG:
        return plain(value.get("value"))
    if isinstance(value, Mapping):
        return {str(k): plain(_raw(value)[k]) for k in value}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [plain(v) for v in value]
    if isinstance(value, str) and value in UNKNOWN_SENTINELS:
        return UNKNOWN
    return value


def _is_component(type_token: str) -> bool:
    return type_token == "pulumi:pulumi:Stack" or type_token.startswith("tessera:")


def records_from_policy(resources: Iterable[Any]) -> list[Record]:
    """Records from a stack validation's ``args.resources`` (pulumi-policy ``PolicyResource`` s: type, name,
    props, urn, opts, parent, property_dependencies); read by attribute, so plain objects of that shape do."""
    resources = list(resources)
    props = {id(r): plain(r.props) for r in resources}

    def aliases(r: Any) -> frozenset[str]:
        found = props.get(id(r))
        record = Record(r.resource_type, r.name, found if found is not None else plain(r.props), urn=r.urn)
        return record.aliases

    records = []
    for r in resources:
        ancestors = []
        parent = getattr(r, "parent", None)
        while parent is not None:
            ancestors.append(parent.resource_type)
            parent = getattr(parent, "parent", None)
        deps = {
            key: tuple(aliases(d) for d in depends_on)
            for key, depends_on in (getattr(r, "property_dependencies", None) or {}).items()
            if depends_on
        }
        opts = getattr(r, "opts", None)
        records.append(
            Record(
                type=r.resource_type,
                name=r.name,
                props=props[id(r)],
                ancestors=tuple(ancestors),
                protect=bool(getattr(opts, "protect", False)),
                custom=not _is_component(r.resource_type),
                urn=r.urn,
                deps=deps,
                source=r,
            )
        )
    return records


def of_type(records: Iterable[Record], *type_tokens: str) -> list[Record]:
    """The custom resources of the given types."""
    return [r for r in records if r.type in type_tokens and r.custom]


def _known(value: Any) -> bool:
    return value is not UNKNOWN


def _dict(value: Any) -> Mapping[str, Any]:
    """A nested object, or an empty one where there is none (or it is not known yet)."""
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


# --- network exposure ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ingress:
    """One ingress rule, whichever resource type declared it.

    ``group_id`` and ``source_groups`` are the ids as declared; ``group_refs`` and ``source_refs`` what
    they point at, to match against :attr:`Record.aliases` when ids are not known yet.
    """

    group_id: str
    from_port: int
    to_port: int
    cidrs: tuple[str, ...]
    source_groups: tuple[str, ...]
    record: Record
    group_refs: frozenset[str] = frozenset()
    source_refs: tuple[frozenset[str], ...] = ()

    @property
    def declared_by(self) -> Any:
        """The resource that declared the rule (a :class:`~stacks.offline.Declared` offline)."""
        return self.record.source if self.record.source is not None else self.record


def _ports(value: Any) -> int:
    return int(value) if value is not None and _known(value) else -1


def _strs(value: Any) -> tuple[str, ...]:
    return tuple(v for v in _list(value) if isinstance(v, str))


def _ingress_of(records: Sequence[Record]) -> list[Ingress]:
    rules: list[Ingress] = []
    groups = of_type(
        records, "aws:ec2/securityGroup:SecurityGroup", "aws:ec2/defaultSecurityGroup:DefaultSecurityGroup"
    )
    for sg in groups:
        for rule in map(_dict, _list(sg.get("ingress"))):
            sources = _strs(rule.get("securityGroups"))
            rules.append(
                Ingress(
                    sg.ref,
                    _ports(rule.get("fromPort")),
                    _ports(rule.get("toPort")),
                    _strs(rule.get("cidrBlocks")) + _strs(rule.get("ipv6CidrBlocks")),
                    sources + (("self",) if rule.get("self") is True else ()),
                    sg,
                    sg.aliases,
                    tuple(frozenset({s}) for s in sources)
                    + ((sg.aliases,) if rule.get("self") is True else ()),
                )
            )
    for r in of_type(records, "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"):
        cidrs = tuple(c for c in (r.get("cidrIpv4"), r.get("cidrIpv6")) if isinstance(c, str) and c)
        source = r.get("referencedSecurityGroupId")
        rules.append(
            Ingress(
                str(r.get("securityGroupId")),
                _ports(r.get("fromPort")),
                _ports(r.get("toPort")),
                cidrs,
                (str(source),) if source else (),
                r,
                frozenset().union(*r.references("securityGroupId")),
                r.references("referencedSecurityGroupId"),
            )
        )
    for r in of_type(records, "aws:ec2/securityGroupRule:SecurityGroupRule"):
        if r.get("type") != "ingress":
            continue
        source = r.get("sourceSecurityGroupId")
        rules.append(
            Ingress(
                str(r.get("securityGroupId")),
                _ports(r.get("fromPort")),
                _ports(r.get("toPort")),
                _strs(r.get("cidrBlocks")) + _strs(r.get("ipv6CidrBlocks")),
                (str(source),) if source else (),
                r,
                frozenset().union(*r.references("securityGroupId")),
                r.references("sourceSecurityGroupId"),
            )
        )
    return rules


def ingress_rules(source: OfflineRun | Sequence[Record]) -> list[Ingress]:
    """Every ingress rule: inline on security groups, and standalone rule resources."""
    return _ingress_of(records_of(source) if isinstance(source, OfflineRun) else source)


def owner_of(run: OfflineRun, resource: Declared) -> str | None:
    """The type of the nearest infra component a resource belongs to (``tessera:infra:JumpHost``...)."""
    for ancestor in run.ancestors(resource):
        if ancestor.type.startswith("tessera:infra:"):
            return ancestor.type
    return None


def _group_aliases(records: Sequence[Record], component_type: str) -> frozenset[str]:
    return frozenset().union(
        *(
            sg.aliases
            for sg in of_type(records, "aws:ec2/securityGroup:SecurityGroup")
            if sg.owner == component_type
        )
    )


def _within(refs: Iterable[frozenset[str]], aliases: frozenset[str]) -> bool:
    """Every reference points into ``aliases``."""
    return all(ref & aliases for ref in refs)


@dataclass(frozen=True)
class Context:
    """What a rule may need besides the records: the stack's settings, values fetched at deploy time."""

    settings: Settings | None = None
    #: Strings a provider function returned (the ECR login token): fetched at deploy time, not inline.
    fetched: Collection[str] = frozenset()


def check_network_exposure(records: Sequence[Record], context: Context) -> Iterator[Finding]:
    """No ingress from the internet but the jump host's SSH (and, when configured, the catalog's public HTTPS
    from its configured addresses); Grafana and the database only from peers."""
    settings = context.settings
    jump = _group_aliases(records, "tessera:infra:JumpHost")
    grafana = _group_aliases(records, "tessera:infra:Monitoring")
    database = _group_aliases(records, "tessera:infra:Database")
    services = _group_aliases(records, "tessera:infra:Network")
    allowed_ssh = set(settings.jump_host_allowed_cidrs) if settings else None
    # The one opt-in exception: the sight catalog's public HTTPS listener, when its certificate, domain and
    # client addresses are configured (infra/catalog.py); only tcp 443, only from those addresses.
    public = _group_aliases(records, "tessera:infra:CatalogPublicEndpoint")
    allowed_https = (
        set(settings.catalog_public.allowed_cidrs) if settings and settings.catalog_public else set()
    )
    for rule in _ingress_of(records):
        where = rule.record
        if rule.group_refs & public:
            if (rule.from_port, rule.to_port) != (443, 443) or rule.source_refs:
                yield where.finding(
                    "exposure",
                    "the catalog's public load balancer accepts only tcp 443 from configured CIDRs",
                )
            for cidr in rule.cidrs:
                if cidr not in allowed_https:
                    yield where.finding("exposure", f"catalog HTTPS from {cidr}, not a configured address")
            continue
        if rule.group_refs & jump:
            if (rule.from_port, rule.to_port) != (22, 22) or rule.source_refs:
                yield where.finding(
                    "exposure", "the jump host accepts only SSH (tcp 22) from configured CIDRs"
                )
            for cidr in rule.cidrs:
                if cidr in OPEN:
                    yield where.finding("exposure", f"jump host SSH open to {cidr}")
                elif allowed_ssh is not None and cidr not in allowed_ssh:
                    yield where.finding("exposure", f"jump host SSH from {cidr}, not a configured address")
            continue
        if rule.cidrs:
            yield where.finding(
                "exposure", f"ingress from CIDRs {list(rule.cidrs)}: only peers by security group"
            )
        if rule.group_refs & grafana and not _within(rule.source_refs, jump):
            yield where.finding("exposure", "Grafana reachable from something other than the jump host")
        if rule.group_refs & database:
            if not rule.source_refs or not _within(rule.source_refs, services):
                yield where.finding(
                    "exposure", "the database reachable from something other than a service group"
                )
            if (rule.from_port, rule.to_port) != (5432, 5432):
                yield where.finding("exposure", "the database exposes ports other than 5432")
        if rule.group_refs & services:
            yield where.finding("exposure", "service security groups take no ingress")
    for db in of_type(records, "aws:rds/instance:Instance"):
        if db.get("publiclyAccessible") is True:
            yield db.finding("exposure", "the database is publicly accessible")
    for instance in of_type(records, "aws:ec2/instance:Instance"):
        if instance.get("associatePublicIpAddress") is True and instance.owner != "tessera:infra:JumpHost":
            yield instance.finding("exposure", "only the jump host may have a public address")


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
        rules = _list(encryption.get("rules")) if encryption else []
        algorithms = {
            _dict(_dict(rule).get("applyServerSideEncryptionByDefault")).get("sseAlgorithm") for rule in rules
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
        if not _known(document):
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
        if _dict(r.get("metadataOptions")).get("httpTokens") != "required":
            yield r.finding("imdsv2", "instance metadata must require tokens (IMDSv2)")
        if r.type.endswith(":Instance"):
            devices = [_dict(r.get("rootBlockDevice")), *map(_dict, _list(r.get("ebsBlockDevices")))]
            if not r.get("rootBlockDevice"):
                yield r.finding("encryption", "root volume not declared (and so not encrypted)")
        else:
            devices = [_dict(_dict(m).get("ebs")) for m in _list(r.get("blockDeviceMappings"))]
            if not devices:
                yield r.finding("encryption", "launch template declares no (encrypted) root volume")
        for device in devices:
            if device and _known(device.get("encrypted")) and not _is_true(device.get("encrypted")):
                yield r.finding("encryption", "unencrypted EBS volume")
    for volume in of_type(records, "aws:ebs/volume:Volume"):
        if _known(volume.get("encrypted")) and not _is_true(volume.get("encrypted")):
            yield volume.finding("encryption", "unencrypted EBS volume")


# --- secrets ---------------------------------------------------------------------------------------------

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


def check_secrets(records: Sequence[Record], context: Context) -> Iterator[Finding]:
    """No password, key or secret value in any resource input (user data included).

    A value fetched from a provider at deploy time (the ECR login token the image push uses) is not inline.
    """
    for r in records:
        if not r.custom:
            continue
        for key, value in _strings(r.props):
            if not _known(value):
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
        if not _known(document):
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
            if (_known(protection) and protection is not True) or db.get("skipFinalSnapshot") is True:
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
