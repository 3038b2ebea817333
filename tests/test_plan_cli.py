"""`tessera plan` and `tessera tunnel`, as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import CommandError, grafana_tunnel, main
from stacks.cost import PriceTable
from stacks.plan import plan_stack
from stacks.settings import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_plan_prints_resources_costs_and_checks() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "plan", "--stack", "dev", "--width", "250"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in (
        "rds.Instance",
        "autoscaling.Group",
        "sqs.Queue",
        "ec2.NatGateway",
        "Everything running",
        "Compute destroyed",
        "Security and lifecycle checks: no findings",
        "Once deployed: `tessera tunnel grafana`",
        "Addresses in this offline plan are simulated",
    ):
        assert expected in out, expected
    prices = PriceTable.load()
    assert prices.recorded in out


def test_plan_of_an_unknown_stack_says_which_exist(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--stack", "nope"]) == 2
    err = capsys.readouterr().err
    assert "Pulumi.nope.yaml" in err and "dev" in err


def test_tunnel_command_from_outputs() -> None:
    outputs = {
        "grafanaPrivateIp": "10.40.3.7",
        "jumpHostPublicIp": "198.51.100.20",
        "jumpHostSshUser": "ec2-user",
    }
    assert grafana_tunnel(outputs, 3001) == [
        "ssh",
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-L",
        "3001:10.40.3.7:3000",
        "ec2-user@198.51.100.20",
    ]
    with pytest.raises(CommandError, match="prod-compute"):
        grafana_tunnel({"jumpHostPublicIp": "198.51.100.20"})


def _fake_pulumi(tmp_path: Path, outputs: dict[str, str], code: int = 0) -> dict[str, str]:
    script = tmp_path / "pulumi"
    script.write_text(
        f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\necho '{json.dumps(outputs)}'\nexit {code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}


def test_tunnel_reads_the_stack_outputs_through_pulumi(tmp_path: Path) -> None:
    env = _fake_pulumi(tmp_path, {"grafanaPrivateIp": "10.1.2.3", "jumpHostPublicIp": "203.0.113.9"})
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "tunnel", "grafana", "--stack", "prod-compute", "--print"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip() == "ssh -N -o ExitOnForwardFailure=yes -L 3000:10.1.2.3:3000 ec2-user@203.0.113.9"
    )
    assert (tmp_path / "args").read_text().split() == ["stack", "output", "--json", "--stack", "prod-compute"]


def test_tunnel_explains_a_failing_pulumi(tmp_path: Path) -> None:
    env = _fake_pulumi(tmp_path, {}, code=255)
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "tunnel", "grafana", "--print"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2
    assert "stack output --json" in done.stderr and "failed" in done.stderr


def test_a_setting_checked_against_the_data_stack_reads_as_one_message(tmp_path: Path) -> None:
    # The variant check needs the data stack's outputs, so it runs inside an Output: the engine wraps its
    # error in "While processing resource ..." layers; the plan must show the setting's message alone.
    for config in ROOT.glob("Pulumi*.yaml"):
        shutil.copy(config, tmp_path / config.name)
    compute = tmp_path / "Pulumi.prod-compute.yaml"
    compute.write_text(compute.read_text().replace("dl1.24xlarge", "g5.xlarge"))
    with pytest.raises(ConfigError) as raised:
        plan_stack("prod-compute", tmp_path)
    assert str(raised.value).startswith("tessera:trainingInstanceType: 'g5.xlarge' needs the 'cuda13'")
    assert "While processing" not in str(raised.value) and raised.value.__cause__ is None
