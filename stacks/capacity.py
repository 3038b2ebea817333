"""Where a stack's instance types can run, and what they need from the account's vCPU quotas.

Two things stop a correct program on a real account that no mock sees: an instance type that is not offered
in the zones of the stack's subnets (the launch fails with ``Unsupported``), and an on-demand vCPU quota of
0 — the default for the GPU (G/VT, P), DL, Trn and Inf classes on a new account. ``tessera plan`` warns about
both, offline, from ``stacks/capacity.toml``: a table of vCPUs per instance type and of the zones (by zone
ID, which names the same zone in every account) that offer each type, recorded from AWS's
``DescribeInstanceTypes`` / ``DescribeInstanceTypeOfferings`` as moto ships them
(``python -m stacks.capacity --refresh`` writes it again). On a real ``pulumi up`` the program asks AWS
itself (``get_instance_type_offerings``, see :func:`infra.instances.subnet_offering`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stacks.services import SERVICES
from stacks.settings import Settings

TABLE_PATH = Path(__file__).with_name("capacity.toml")
REGIONS = ("us-east-1", "us-east-2", "us-west-2", "eu-west-1", "eu-central-1")
"""Regions the recorded table covers."""
BASELINE_TYPE = "m5.large"
SOURCE_PREFIX = "AWS DescribeInstanceTypes/DescribeInstanceTypeOfferings as shipped in moto"
"""A type every general-purpose zone offers: a type offered in fewer zones than it is partial."""


@dataclass(frozen=True)
class Quota:
    """One EC2 on-demand vCPU quota (Service Quotas, service code ``ec2``)."""

    code: str
    name: str
    #: New accounts start at 0 vCPUs for this class: nothing launches until an increase is granted.
    zero_by_default: bool


STANDARD = Quota("L-1216C47A", "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances", False)
_G_AND_VT = Quota("L-DB2E81BA", "Running On-Demand G and VT instances", True)
#: Instance class (the leading letters of the family: ``g`` of g5, ``gr`` of gr6) -> its quota; every class
#: not named here counts against the standard quota.
QUOTAS: dict[str, Quota] = {
    "g": _G_AND_VT,
    "gr": _G_AND_VT,
    "vt": _G_AND_VT,
    "p": Quota("L-417A185B", "Running On-Demand P instances", True),
    "dl": Quota("L-6E869C2A", "Running On-Demand DL instances", True),
    "trn": Quota("L-2C3B7624", "Running On-Demand Trn instances", True),
    "inf": Quota("L-1945791B", "Running On-Demand Inf instances", True),
}

#: vCPUs of types AWS no longer lists in ``DescribeInstanceTypes`` for new accounts (so the recorded source
#: lacks them), from AWS's instance type pages.
_RETIRED_VCPUS = {"p3.2xlarge": 8, "p3.8xlarge": 32, "p3.16xlarge": 64, "dl1.24xlarge": 96}


def quota_of(instance_type: str) -> Quota:
    """The on-demand vCPU quota that ``instance_type`` counts against (``g5.xlarge`` -> G and VT)."""
    match = re.match(r"[a-z]+", instance_type)
    return QUOTAS.get(match.group() if match else "", STANDARD)


@dataclass(frozen=True)
class CapacityTable:
    """The recorded table: vCPUs per type, and per region the zone IDs that offer each type."""

    source: str
    recorded: str
    vcpus: dict[str, int]
    #: region -> the zone IDs of the region that offer :data:`BASELINE_TYPE` (its general-purpose zones).
    zones: dict[str, tuple[str, ...]]
    #: region -> instance type -> zone IDs that offer it (empty: not offered in the region).
    offerings: dict[str, dict[str, tuple[str, ...]]]


def load_table(path: Path = TABLE_PATH) -> CapacityTable:
    """Read ``stacks/capacity.toml``."""
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    meta = doc.get("meta", {})
    return CapacityTable(
        source=str(meta.get("source", "")),
        recorded=str(meta.get("recorded", "")),
        vcpus={str(k): int(v) for k, v in doc.get("vcpus", {}).items()},
        zones={str(r): tuple(z) for r, z in doc.get("zones", {}).items()},
        offerings={
            str(region): {str(t): tuple(z) for t, z in types.items()}
            for region, types in doc.get("offerings", {}).items()
        },
    )


@dataclass(frozen=True)
class InstanceUse:
    """One place a stack runs an instance type, and how many at most."""

    instance_type: str
    count: int
    what: str
    #: The program places it in one subnet chosen for its type (the training box), rather than spreading
    #: over every subnet (fleets, which launch only where the type is offered).
    placed: bool = False


def instance_uses(settings: Settings) -> list[InstanceUse]:
    """Every instance type the stack's compute layer runs, with its maximum count."""
    if not settings.has_compute:
        return []
    uses = [
        InstanceUse(settings.jump_host_instance_type, 1, "the jump host"),
        InstanceUse(settings.grafana_instance_type, 1, "Grafana"),
    ]
    for spec in SERVICES:
        fleet = settings.fleets.get(spec.name)
        if spec.runs_on == "fleet" and fleet is not None and fleet.max_size > 0:
            uses.append(InstanceUse(fleet.instance_type, fleet.max_size, f"the {spec.name} fleet"))
    if settings.training_enabled:
        uses.append(InstanceUse(settings.training_instance_type, 1, "the training instance", placed=True))
    return uses


def _zones(ids: Iterable[str]) -> str:
    return ", ".join(sorted(ids))


def offering_warnings(settings: Settings, table: CapacityTable) -> list[str]:
    """Types the table says are not offered in the region, or only in some of its zones."""
    region = settings.region
    if region not in table.offerings:
        return [
            f"no offline offerings table for {region} (stacks/capacity.toml covers "
            f"{', '.join(table.offerings)}): `pulumi up` checks each instance type with "
            "get_instance_type_offerings"
        ]
    all_zones = table.zones.get(region, ())
    warnings = []
    seen: set[tuple[str, str]] = set()
    for use in instance_uses(settings):
        if (use.instance_type, use.what) in seen:
            continue
        seen.add((use.instance_type, use.what))
        offered = table.offerings[region].get(use.instance_type)
        if offered is None:
            warnings.append(
                f"{use.instance_type} ({use.what}) is not in the offline offerings table for {region}; "
                "`pulumi up` checks it with get_instance_type_offerings"
            )
        elif not offered:
            warnings.append(
                f"{use.instance_type} ({use.what}) is not offered in {region} ({table.source}, recorded "
                f"{table.recorded}): AWS lists it for no zone there, so `pulumi up` cannot launch it; choose "
                "another instance type or region"
            )
        elif len(offered) < len(all_zones):
            where = (
                "`pulumi up` places it in a private subnet whose zone offers it and stops, naming those "
                "zones, if none does (raise tessera:azCount to add zones)"
                if use.placed
                else "`pulumi up` spreads it only over private subnets in those zones and stops, naming "
                "them, if the stack has none (raise tessera:azCount to add zones)"
            )
            warnings.append(
                f"{use.instance_type} ({use.what}) is offered in {len(offered)} of {len(all_zones)} "
                f"{region} zones ({_zones(offered)}); which zones a stack's subnets use depends on the "
                f"account: {where}"
            )
    return warnings


def quota_warnings(settings: Settings, table: CapacityTable) -> list[str]:
    """vCPU quotas the stack needs that new accounts start at 0."""
    needed: dict[Quota, int] = {}
    unknown: list[str] = []
    for use in instance_uses(settings):
        quota = quota_of(use.instance_type)
        if not quota.zero_by_default:
            continue
        vcpus = table.vcpus.get(use.instance_type)
        if vcpus is None:
            unknown.append(use.instance_type)
            continue
        needed[quota] = needed.get(quota, 0) + vcpus * use.count
    warnings = [
        f"quota '{quota.name}' ({quota.code}) must allow {vcpus} vCPUs in {settings.region} for this "
        "stack at full size, and is 0 on a new account: check with `aws service-quotas get-service-quota "
        f"--service-code ec2 --quota-code {quota.code}`, raise with `aws service-quotas "
        "request-service-quota-increase --service-code ec2 "
        f"--quota-code {quota.code} --desired-value {vcpus}`"
        for quota, vcpus in needed.items()
    ]
    if unknown:
        warnings.append(
            f"vCPUs of {', '.join(sorted(set(unknown)))} are not in stacks/capacity.toml: their quota "
            "need is not estimated"
        )
    return warnings


def capacity_warnings(settings: Settings, table: CapacityTable | None = None) -> list[str]:
    """Everything the plan should warn about before a real ``pulumi up``: offerings, then quotas."""
    table = table or load_table()
    return offering_warnings(settings, table) + quota_warnings(settings, table)


# --- recording the table ---------------------------------------------------------------------------------


def _moto_resources() -> Path:
    import moto.ec2

    return Path(moto.ec2.__file__).parent / "resources"


def _load_gz(path: Path) -> object:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def recorded_types() -> list[str]:
    """The types the table records: every type priced in stacks/prices.toml and every stack's types."""
    from stacks.settings import DEFAULT_FLEETS, Settings

    prices = tomllib.loads(Path(__file__).with_name("prices.toml").read_text(encoding="utf-8"))
    types = set(prices.get("ec2", {}))
    defaults = Settings(stack="x", region="us-east-1")
    types.update({defaults.training_instance_type, defaults.jump_host_instance_type})
    types.update(f.instance_type for f in DEFAULT_FLEETS.values())
    return sorted(types)


def record_table(types: Sequence[str], regions: Sequence[str] = REGIONS) -> str:
    """The TOML text of the table for ``types`` in ``regions``, from moto's copy of AWS's EC2 listings."""
    import moto

    resources = _moto_resources()
    described = _load_gz(resources / "instance_types.json.gz")
    assert isinstance(described, dict)
    lines = [
        "# Instance types tessera's stacks use: vCPUs, and the zones (by zone ID) that offer each type.",
        "# Written by `python -m stacks.capacity --refresh` (needs the `local` extra); do not edit by hand.",
        "[meta]",
        f'source = "{SOURCE_PREFIX} {moto.__version__}"',
        f'recorded = "{_today()}"',
        "",
        "[vcpus]",
    ]
    for t in types:
        info = described.get(t)
        vcpus = info["VCpuInfo"]["DefaultVCpus"] if info else _RETIRED_VCPUS.get(t)
        if vcpus is not None:
            lines.append(f'"{t}" = {int(vcpus)}')
    zone_lines = [
        "",
        f"# Per region, the zones that offer {BASELINE_TYPE} (its general-purpose zones).",
        "[zones]",
    ]
    offer_lines: list[str] = []
    for region in regions:
        listing = _load_gz(
            resources / "instance_type_offerings" / "availability-zone-id" / f"{region}.json.gz"
        )
        assert isinstance(listing, list)
        by_type: dict[str, set[str]] = {}
        for row in listing:
            by_type.setdefault(row["InstanceType"], set()).add(row["Location"])
        # The region's general-purpose zones: those that offer the baseline type. Legacy zones that offer
        # almost nothing (use1-az3) would make every type look partial.
        every = sorted(by_type.get(BASELINE_TYPE, ()))
        zone_lines.append(f'"{region}" = {json.dumps(every)}')
        offer_lines += ["", f'[offerings."{region}"]']
        offer_lines += [f'"{t}" = {json.dumps(sorted(by_type.get(t, ())))}' for t in types]
    return "\n".join(lines + zone_lines + offer_lines) + "\n"


def _today() -> str:
    import datetime

    return datetime.datetime.now(datetime.UTC).date().isoformat()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stacks.capacity --refresh``: write stacks/capacity.toml again."""
    parser = argparse.ArgumentParser(prog="python -m stacks.capacity", description=__doc__.splitlines()[0])
    parser.add_argument("--refresh", action="store_true", help="record the table again from moto's data")
    args = parser.parse_args(argv)
    if not args.refresh:
        parser.print_help()
        return 0
    TABLE_PATH.write_text(record_table(recorded_types()), encoding="utf-8")
    sys.stdout.write(f"wrote {TABLE_PATH}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
