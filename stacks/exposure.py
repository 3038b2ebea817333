"""Who can reach what: every ingress rule of a stack, whichever resource declared it (:func:`ingress_rules`),
and the audit rule over them (:func:`check_network_exposure`): nothing reachable from the internet but the
jump host's SSH from configured addresses (and the catalog's opt-in public HTTPS); Grafana and the database
only from their named peers. ``stacks/graph.py`` reads the same rules; the other audit rules are
``stacks/audit.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from stacks.offline import Declared, OfflineRun
from stacks.records import Context, Finding, Record, as_list, as_mapping, is_known, of_type, records_of

OPEN = ("0.0.0.0/0", "::/0")
"""Addresses that mean the whole internet."""


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
    return int(value) if value is not None and is_known(value) else -1


def _strs(value: Any) -> tuple[str, ...]:
    return tuple(v for v in as_list(value) if isinstance(v, str))


def _ingress_of(records: Sequence[Record]) -> list[Ingress]:
    rules: list[Ingress] = []
    groups = of_type(
        records, "aws:ec2/securityGroup:SecurityGroup", "aws:ec2/defaultSecurityGroup:DefaultSecurityGroup"
    )
    for sg in groups:
        for rule in map(as_mapping, as_list(sg.get("ingress"))):
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
