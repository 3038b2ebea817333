"""Stack configuration: defaults, and every bad value rejected with a message naming the key and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infra.training import ACCELERATOR_FAMILIES
from stacks.offline import load_stack_config
from stacks.settings import ConfigError, Settings, getter_from_mapping, read_settings

ROOT = Path(__file__).resolve().parent.parent
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFX2KoraH3YINa0MuJ4HXpSTJWh3sIXhc8hsAfRLzVci me@example.com"


def minimal(**extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "aws:region": "eu-west-1",
        "tessera:jumpHostAllowedCidrs": ["198.51.100.7/32"],
        "tessera:jumpHostPublicKey": KEY,
    }
    config.update(extra)
    return {k: v for k, v in config.items() if v is not None}


def read(config: dict[str, Any], stack: str = "test") -> Settings:
    return read_settings(getter_from_mapping(config), stack, accelerator_families=ACCELERATOR_FAMILIES)


def test_defaults_are_the_documented_ones() -> None:
    s = read(minimal())
    assert s.layer == "all" and s.environment == "test" and s.region == "eu-west-1"
    assert s.vpc_cidr == "10.40.0.0/16" and s.az_count == 2 and not s.nat_per_az
    assert s.training_instance_type == "p3.2xlarge" and s.training_idle_minutes == 15
    assert s.queue_max_receive_count == 3
    assert s.protect_data, "a stack protects its data unless it says it is throw-away"
    assert s.fleets["model-runner"].instance_type.startswith("g5")


@pytest.mark.parametrize("stack", ["dev", "prod-data", "prod-compute"])
def test_shipped_stack_files_are_valid(stack: str) -> None:
    s = read(load_stack_config(str(ROOT / f"Pulumi.{stack}.yaml")), stack)
    assert s.layer == {"dev": "all", "prod-data": "data", "prod-compute": "compute"}[stack]
    assert s.throwaway is (stack == "dev")


def test_prod_compute_trains_on_dl1() -> None:
    s = read(load_stack_config(str(ROOT / "Pulumi.prod-compute.yaml")), "prod-compute")
    assert s.training_instance_type == "dl1.24xlarge"
    assert s.data_stack and s.data_stack.endswith("/prod-data")


@pytest.mark.parametrize(
    ("change", "key", "fix"),
    [
        ({"aws:region": None}, "aws:region", "pulumi config set aws:region"),
        (
            {"tessera:jumpHostPublicKey": None},
            "tessera:jumpHostPublicKey",
            "pulumi config set tessera:jumpHostPublicKey",
        ),
        ({"tessera:jumpHostAllowedCidrs": None}, "tessera:jumpHostAllowedCidrs", "198.51.100.7/32"),
        (
            {"tessera:jumpHostAllowedCidrs": ["10.0.0.300/32"]},
            "tessera:jumpHostAllowedCidrs",
            "not a valid CIDR",
        ),
        ({"tessera:jumpHostAllowedCidrs": ["0.0.0.0/0"]}, "tessera:jumpHostAllowedCidrs", "whole internet"),
        ({"tessera:jumpHostAllowedCidrs": []}, "tessera:jumpHostAllowedCidrs", "non-empty list"),
        ({"tessera:vpcCidr": "8.8.0.0/16"}, "tessera:vpcCidr", "private IPv4 range"),
        ({"tessera:vpcCidr": "10.0.0.0/33"}, "tessera:vpcCidr", "not a valid CIDR"),
        (
            {"tessera:trainingInstanceType": "x9.24xlarge"},
            "tessera:trainingInstanceType",
            "unknown instance family",
        ),
        (
            {"tessera:trainingInstanceType": "t3.micro"},
            "tessera:trainingInstanceType",
            "unknown instance family",
        ),
        (
            {"tessera:fleets": {"model-runner": {"instanceType": "c6i.large"}}},
            "model-runner.instanceType",
            "GPU",
        ),
        ({"tessera:fleets": {"model-runer": {"maxSize": 2}}}, "tessera:fleets", "unknown fleet"),
        ({"tessera:fleets": {"model-runner": {"maxSize": -1}}}, "model-runner.maxSize", "from 0 to 100"),
        ({"tessera:azCount": 1}, "tessera:azCount", "from 2 to 6"),
        ({"tessera:azCount": "two"}, "tessera:azCount", "whole number"),
        ({"tessera:natPerAz": "maybe"}, "tessera:natPerAz", "true or false"),
        ({"tessera:layer": "everything"}, "tessera:layer", "all, data, compute"),
        ({"tessera:layer": "compute"}, "tessera:dataStack", "pulumi config set tessera:dataStack"),
        ({"tessera:dbInstanceClass": "t4g.micro"}, "tessera:dbInstanceClass", "db.t4g.micro"),
        ({"tessera:trainingIdleMinutes": 1}, "tessera:trainingIdleMinutes", "from 5 to 1440"),
        ({"tessera:trainingAmiId": "ubuntu-22.04"}, "tessera:trainingAmiId", "ami-0123456789abcdef0"),
    ],
)
def test_bad_configuration_names_the_key_and_the_fix(change: dict[str, Any], key: str, fix: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read(minimal(**change))
    message = str(caught.value)
    assert key in message
    assert fix in message


def test_data_layer_needs_no_jump_host_settings() -> None:
    s = read({"aws:region": "us-east-1", "tessera:layer": "data"})
    assert s.has_data and not s.has_compute
    assert s.jump_host_allowed_cidrs == ()


def test_fleet_overrides_merge_with_defaults() -> None:
    s = read(minimal(**{"tessera:fleets": {"model-runner": {"maxSize": 9}}}))
    assert s.fleets["model-runner"].max_size == 9
    assert s.fleets["model-runner"].instance_type == "g5.xlarge"
    assert "sky-generator" in s.fleets


def test_a_pinned_training_ami_reaches_the_training_instance(offline: Any) -> None:
    # The DLAMI look-up by name can find nothing (no image with the driver the trainer needs in a region):
    # the user pins one instead, and the box uses it as given.
    from stacks.plan import _program

    config = load_stack_config(str(ROOT / "Pulumi.dev.yaml"))
    assert read(minimal()).training_ami_id is None
    run = offline(_program, config={**config, "tessera:trainingAmiId": "ami-0123456789abcdef0"}, stack="dev")
    [box] = [r for r in run.of_type("aws:ec2/instance:Instance") if r.name.endswith("-training-instance")]
    assert box.inputs["ami"] == "ami-0123456789abcdef0"


def test_a_cpu_service_is_refused_a_gpu_instance() -> None:
    """A CPU service's fleet boots the plain Amazon Linux image: a GPU instance would idle without its
    driver (the sky generator once ran on g4dn/g5 this way)."""
    import json

    import pytest

    from stacks.settings import ConfigError, _fleets

    with pytest.raises(ConfigError, match=r"sky-generator\.instanceType.*CPU service"):
        _fleets("tessera:fleets", json.dumps({"sky-generator": {"instanceType": "g4dn.xlarge"}}))
    assert (
        _fleets("tessera:fleets", json.dumps({"sky-generator": {"instanceType": "c6i.large"}}))[
            "sky-generator"
        ].instance_type
        == "c6i.large"
    )


def test_the_gpu_fleet_takes_the_nvidia_families_of_the_accelerator_table() -> None:
    """One table says which families carry NVIDIA GPUs: the training instance's (infra/accelerators.py)."""
    import json

    from infra.accelerators import FAMILY_ACCELERATORS
    from stacks.settings import _fleets

    nvidia = [family for family, accelerator in FAMILY_ACCELERATORS.items() if accelerator == "nvidia"]
    assert "g5" in nvidia and "p6-b200" in nvidia
    for family in nvidia:
        fleets = _fleets("tessera:fleets", json.dumps({"model-runner": {"instanceType": f"{family}.xlarge"}}))
        assert fleets["model-runner"].instance_type == f"{family}.xlarge"
    for family in (f for f, a in FAMILY_ACCELERATORS.items() if a != "nvidia"):
        with pytest.raises(ConfigError, match=r"model-runner\.instanceType.*GPU service"):
            _fleets("tessera:fleets", json.dumps({"model-runner": {"instanceType": f"{family}.xlarge"}}))
