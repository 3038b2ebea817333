"""Capacity warnings of `tessera plan`: instance types offered in too few zones, and vCPU quotas that new
accounts start at 0 — both from the recorded table stacks/capacity.toml."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from infra.training import ACCELERATOR_FAMILIES
from stacks.capacity import (
    TABLE_PATH,
    CapacityTable,
    capacity_warnings,
    instance_uses,
    load_table,
    quota_of,
    record_table,
    recorded_types,
)
from stacks.offline import load_stack_config
from stacks.settings import FleetSettings, Settings, getter_from_mapping, read_settings

ROOT = Path(__file__).resolve().parent.parent


def stack_settings(stack: str) -> Settings:
    config = load_stack_config(str(ROOT / f"Pulumi.{stack}.yaml"))
    return read_settings(getter_from_mapping(config), stack, accelerator_families=ACCELERATOR_FAMILIES)


TABLE = CapacityTable(
    source="test table",
    recorded="2026-01-01",
    vcpus={"g5.xlarge": 4, "p4d.24xlarge": 96, "t3.micro": 2, "t3.small": 2, "c6i.large": 2, "p3.2xlarge": 8},
    zones={"us-east-1": ("use1-az1", "use1-az2", "use1-az4")},
    offerings={
        "us-east-1": {
            "g5.xlarge": ("use1-az1", "use1-az2", "use1-az4"),
            "t3.micro": ("use1-az1", "use1-az2", "use1-az4"),
            "t3.small": ("use1-az1", "use1-az2", "use1-az4"),
            "c6i.large": ("use1-az1", "use1-az2", "use1-az4"),
            "p4d.24xlarge": ("use1-az2",),
            "p3.2xlarge": (),
        }
    },
)


def settings(**changes: object) -> Settings:
    base = Settings(
        stack="t",
        region="us-east-1",
        fleets={
            "model-runner": FleetSettings("g5.xlarge", 3),
            "sky-generator": FleetSettings("g5.xlarge", 1),
            "fits-classifier": FleetSettings("c6i.large", 2),
        },
        training_instance_type="p4d.24xlarge",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("instance_type", "code"),
    [
        ("g5.xlarge", "L-DB2E81BA"),
        ("gr6.4xlarge", "L-DB2E81BA"),
        ("g4dn.xlarge", "L-DB2E81BA"),
        ("p3.2xlarge", "L-417A185B"),
        ("p3dn.24xlarge", "L-417A185B"),
        ("p5en.48xlarge", "L-417A185B"),
        ("dl1.24xlarge", "L-6E869C2A"),
        ("trn1n.32xlarge", "L-2C3B7624"),
        ("inf2.xlarge", "L-1945791B"),
        ("c6i.large", "L-1216C47A"),
        ("t3.micro", "L-1216C47A"),
    ],
)
def test_each_family_counts_against_its_quota(instance_type: str, code: str) -> None:
    assert quota_of(instance_type).code == code


def test_quota_warnings_sum_vcpus_at_full_size_per_quota() -> None:
    warnings = capacity_warnings(settings(), TABLE)
    # Fleets at max size: (3 + 1) x 4 vCPUs of G; the training box: 96 of P. Standard types: no warning.
    [g] = [w for w in warnings if "L-DB2E81BA" in w]
    assert "16 vCPUs" in g and "--desired-value 16" in g
    [p] = [w for w in warnings if "L-417A185B" in w]
    assert "96 vCPUs" in p
    assert not any("L-1216C47A" in w for w in warnings)


def test_a_type_offered_in_some_zones_says_where_and_what_the_program_does() -> None:
    [partial] = [w for w in capacity_warnings(settings(), TABLE) if w.startswith("p4d.24xlarge")]
    assert "1 of 3" in partial and "use1-az2" in partial
    assert "places it in a private subnet whose zone offers it" in partial


def test_a_type_not_offered_in_the_region_is_called_out() -> None:
    [gone] = [
        w
        for w in capacity_warnings(settings(training_instance_type="p3.2xlarge"), TABLE)
        if w.startswith("p3.2xlarge")
    ]
    assert "is not offered in us-east-1" in gone and "test table" in gone


def test_types_offered_everywhere_and_data_stacks_give_no_warnings() -> None:
    quiet = settings(training_enabled=False, fleets={"fits-classifier": FleetSettings("c6i.large", 2)})
    assert capacity_warnings(quiet, TABLE) == []
    assert capacity_warnings(settings(layer="data"), TABLE) == []


def test_unknown_region_and_type_are_checked_at_deploy() -> None:
    [region] = capacity_warnings(settings(region="ap-south-2"), TABLE)[:1]
    assert "no offline offerings table for ap-south-2" in region
    unknown = capacity_warnings(settings(training_instance_type="p5.48xlarge"), TABLE)
    assert any("p5.48xlarge" in w and "not in the offline offerings table" in w for w in unknown)
    assert any("vCPUs of p5.48xlarge" in w for w in unknown)


def test_shipped_stacks_are_all_in_the_recorded_table() -> None:
    table = load_table()
    for stack in ("dev", "prod-compute"):
        s = stack_settings(stack)
        for use in instance_uses(s):
            assert use.instance_type in table.vcpus, f"{stack}: {use.instance_type} has no vCPU count"
            assert use.instance_type in table.offerings[s.region], (
                f"{stack}: {use.instance_type} not recorded"
            )


def test_shipped_stacks_warn_about_their_gpu_quotas() -> None:
    dev = capacity_warnings(stack_settings("dev"))
    assert any("L-417A185B" in w and "8 vCPUs" in w for w in dev)  # one p3.2xlarge
    prod = capacity_warnings(stack_settings("prod-compute"))
    assert any("L-6E869C2A" in w and "96 vCPUs" in w for w in prod)  # one dl1.24xlarge


def test_recorded_table_matches_its_source() -> None:
    moto = pytest.importorskip("moto")
    recorded = TABLE_PATH.read_text(encoding="utf-8")
    if f"moto {moto.__version__}" not in recorded:
        pytest.skip(
            f"the table was recorded from another moto than {moto.__version__}: refresh it to compare"
        )
    fresh = record_table(recorded_types())

    def without_date(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("recorded =")]

    assert without_date(recorded) == without_date(fresh), "run `python -m stacks.capacity --refresh`"
