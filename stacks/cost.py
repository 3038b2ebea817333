"""Estimated cost of a planned stack, from the small price table in ``stacks/prices.toml``.

Only charges that accrue by the hour or the month are estimated (instances, volumes, NAT gateways, public
IPv4 addresses, the database, KMS keys, secrets, alarms); usage-based charges (S3, SQS requests, data
transfer, log ingestion) are listed as such. Worker fleets are counted at their maximum size for
"everything running" — they scale to zero when their queues are empty.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stacks.offline import Declared, OfflineRun

PRICES_FILE = Path(__file__).with_name("prices.toml")
LAYER_TYPES = {"tessera:stacks:DataLayer": "data", "tessera:stacks:ComputeLayer": "compute"}


@dataclass(frozen=True)
class PriceTable:
    """Prices in USD: EC2 and RDS per hour by type, other charges by name."""

    ec2: dict[str, float]
    rds: dict[str, float]
    other: dict[str, float]
    source: str
    recorded: str
    region: str
    hours_per_month: float = 730.0

    @staticmethod
    def load(path: Path = PRICES_FILE) -> PriceTable:
        """Read the price table file."""
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
        meta = doc["meta"]
        return PriceTable(
            ec2={k: float(v) for k, v in doc["ec2"].items()},
            rds={k: float(v) for k, v in doc["rds"].items()},
            other={k: float(v) for k, v in doc["other"].items()},
            source=str(meta["source"]),
            recorded=str(meta["recorded"]),
            region=str(meta["region"]),
            hours_per_month=float(meta.get("hours_per_month", 730)),
        )


@dataclass
class CostLine:
    """The estimated cost of one resource while it exists (and, for compute, while it runs)."""

    resource: Declared
    layer: str
    hourly: float = 0.0
    monthly_fixed: float = 0.0
    note: str = ""
    unknown: list[str] = field(default_factory=list)

    def monthly(self, hours: float) -> float:
        """Cost per month: hourly charges over the month plus fixed monthly charges."""
        return self.hourly * hours + self.monthly_fixed


@dataclass
class CostEstimate:
    """Every resource's cost line and the totals a user decides with."""

    lines: list[CostLine]
    prices: PriceTable

    def total_hourly(self, layers: tuple[str, ...] = ("data", "compute")) -> float:
        """Per hour, summed over the given layers, monthly charges spread over the month."""
        hours = self.prices.hours_per_month
        return sum(line.monthly(hours) for line in self.lines if line.layer in layers) / hours

    def total_monthly(self, layers: tuple[str, ...] = ("data", "compute")) -> float:
        """Per month, summed over the given layers."""
        return sum(line.monthly(self.prices.hours_per_month) for line in self.lines if line.layer in layers)

    @property
    def unpriced(self) -> list[str]:
        """Instance types or classes the price table lacks (their cost is not in the totals)."""
        return sorted({u for line in self.lines for u in line.unknown})


def layer_of(run: OfflineRun, resource: Declared) -> str:
    """'data', 'compute', or 'stack' (providers and references, which cost nothing)."""
    for ancestor in [resource, *run.ancestors(resource)]:
        if ancestor.type in LAYER_TYPES:
            return LAYER_TYPES[ancestor.type]
    return "stack"


def _volume_gb(devices: list[dict[str, Any]] | None, nested: str | None = None) -> float:
    total = 0.0
    for device in devices or []:
        spec = device.get(nested, {}) if nested else device
        total += float((spec or {}).get("volumeSize") or 0)
    return total


def estimate(run: OfflineRun, prices: PriceTable | None = None) -> CostEstimate:
    """Price every resource of an offline run."""
    prices = prices or PriceTable.load()
    other = prices.other
    lines: list[CostLine] = []
    for r in run.resources:
        if not r.custom:
            continue
        line = CostLine(r, layer_of(run, r))
        _price(run, r, line, prices, other)
        lines.append(line)
    return CostEstimate(lines, prices)


def _ec2(prices: PriceTable, instance_type: str | None, line: CostLine) -> float:
    if instance_type is None:
        return 0.0
    if instance_type not in prices.ec2:
        line.unknown.append(instance_type)
        return 0.0
    return prices.ec2[instance_type]


def _price(run: OfflineRun, r: Declared, line: CostLine, prices: PriceTable, other: dict[str, float]) -> None:
    t, get = r.type, r.outputs.get
    gp3 = other["ebs_gp3_gb_month"]
    if t == "aws:ec2/instance:Instance":
        line.hourly = _ec2(prices, get("instanceType"), line)
        gb = _volume_gb([get("rootBlockDevice") or {}]) + _volume_gb(get("ebsBlockDevices"))
        line.monthly_fixed = gb * gp3
        line.note = f"{get('instanceType')} while running; {gb:.0f} GB of volumes always"
    elif t == "aws:ebs/volume:Volume":
        line.monthly_fixed = float(get("size") or 0) * gp3
        line.note = f"{get('size')} GB {get('type') or 'gp3'}"
    elif t == "aws:autoscaling/group:Group":
        template = _launch_template(run, r)
        max_size = int(get("maxSize") or 0)
        if template is None:
            line.note = "launch template not found"
            return
        per_instance = _ec2(prices, template.get("instanceType"), line)
        gb = _volume_gb(template.get("blockDeviceMappings"), "ebs")
        line.hourly = max_size * (per_instance + gb * gp3 / prices.hours_per_month)
        line.note = (
            f"{template.get('instanceType')} x {get('minSize', 0)}-{max_size}: counted at {max_size} "
            f"(${per_instance:.3f}/h each); $0 while the queues are empty"
        )
    elif t == "aws:ec2/natGateway:NatGateway":
        line.hourly = other["nat_gateway_hour"]
        line.note = "plus data processed"
    elif t == "aws:ec2/eip:Eip":
        line.hourly = other["public_ipv4_hour"]
        line.note = "public IPv4 address"
    elif t == "aws:rds/instance:Instance":
        klass = str(get("instanceClass"))
        hourly = prices.rds.get(klass)
        if hourly is None:
            line.unknown.append(klass)
            hourly = 0.0
        multi = bool(get("multiAz"))
        line.hourly = hourly * (2 if multi else 1)
        storage = float(get("allocatedStorage") or 0)
        secret = other["secret_month"] if get("manageMasterUserPassword") else 0.0
        line.monthly_fixed = storage * other["rds_storage_gb_month"] * (2 if multi else 1) + secret
        line.note = f"{klass}{' Multi-AZ' if multi else ''}, {storage:.0f} GB, managed secret"
    elif t == "aws:kms/key:Key":
        line.monthly_fixed = other["kms_key_month"]
    elif t == "aws:secretsmanager/secret:Secret":
        line.monthly_fixed = other["secret_month"]
    elif t == "aws:cloudwatch/metricAlarm:MetricAlarm":
        line.monthly_fixed = other["alarm_month"]
    elif t.startswith(
        ("aws:s3/bucket:", "aws:sqs/queue:", "aws:ecr/repository:", "aws:cloudwatch/logGroup:")
    ):
        line.note = "usage-based"


def _launch_template(run: OfflineRun, group: Declared) -> Declared | None:
    spec = group.outputs.get("launchTemplate") or {}
    mixed = group.outputs.get("mixedInstancesPolicy") or {}
    if not spec and mixed:
        spec = (mixed.get("launchTemplate") or {}).get("launchTemplateSpecification") or {}
    template_id = spec.get("id") or spec.get("launchTemplateId")
    if template_id is None:
        return None
    return run.by_id(str(template_id))
