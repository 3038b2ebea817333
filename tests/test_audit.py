"""The audit finds what it is there to find: small programs that break one invariant each.

Every program is checked twice, through the two callers of the one set of rules (stacks/audit.py): the offline
audit `tessera plan` runs, and the CrossGuard policy pack (policy/) as `pulumi preview --policy-pack` runs it,
fed the same resources shaped as pulumi-policy's ``PolicyResource`` s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pulumi
import pulumi_aws as aws
import pytest
from crossguard import policy_resources, violations

from stacks.audit import audit
from stacks.offline import OfflineRun
from stacks.settings import Settings

#: Findings as text, ``[rule] Type name: detail``, whichever path reported them.
Audit = Callable[..., list[str]]
FINDING = re.compile(r"^\[(?P<rule>[^\]]+)\] (?P<type>\S+) (?P<name>\S+): (?P<detail>.*)$")


@pytest.fixture(params=["offline", "crossguard"])
def findings(request: pytest.FixtureRequest) -> Audit:
    """``findings(run, stack="dev")``: what the offline audit, or the policy pack, reports for ``run`` as
    part of ``stack`` (dev is a throw-away stack, prod-data is not)."""

    def offline_audit(run: OfflineRun, stack: str = "dev") -> list[str]:
        settings = Settings(stack=stack, region="us-east-1", throwaway=stack == "dev")
        return [str(f) for f in audit(run, settings)]

    def policy_pack(run: OfflineRun, stack: str = "dev") -> list[str]:
        return [message for _, message, _ in violations(policy_resources(run, stack))]

    return offline_audit if request.param == "offline" else policy_pack


def rules_of(found: list[str]) -> set[str]:
    return {m["rule"] for m in map(FINDING.match, found) if m}


def test_open_ingress_is_found(offline: Callable[..., OfflineRun], findings: Audit) -> None:
    def program() -> dict[str, Any]:
        aws.ec2.SecurityGroup(
            "open",
            vpc_id="vpc-1",
            ingress=[
                aws.ec2.SecurityGroupIngressArgs(
                    protocol="tcp", from_port=5432, to_port=5432, cidr_blocks=["0.0.0.0/0"]
                )
            ],
        )
        return {}

    assert "exposure" in rules_of(findings(offline(program)))


def test_bucket_without_encryption_or_block_is_found(
    offline: Callable[..., OfflineRun], findings: Audit
) -> None:
    found = findings(offline(lambda: {"b": aws.s3.Bucket("bare").bucket}))
    assert any("SSE-KMS" in f for f in found)
    assert any("public access block" in f for f in found)
    assert any("TLS" in f for f in found)


def test_imdsv1_and_unencrypted_volume_are_found(offline: Callable[..., OfflineRun], findings: Audit) -> None:
    def program() -> dict[str, Any]:
        aws.ec2.Instance(
            "old",
            ami="ami-1",
            instance_type="t3.micro",
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(volume_size=8, encrypted=False),
        )
        aws.ebs.Volume("plain", availability_zone="us-east-1a", size=10)
        return {}

    run = offline(program)
    found = findings(run)
    assert any("IMDSv2" in f for f in found)
    assert sum("unencrypted EBS" in f for f in found) == 2, found
    assert run.of_type("aws:ebs/volume:Volume")


def test_inline_secrets_are_found(offline: Callable[..., OfflineRun], findings: Audit) -> None:
    def program() -> dict[str, Any]:
        aws.rds.Instance(
            "db",
            engine="postgres",
            instance_class="db.t4g.micro",
            allocated_storage=20,
            username="u",
            password="hunter2hunter2",
            storage_encrypted=True,
        )
        aws.ec2.Instance(
            "box",
            ami="ami-1",
            instance_type="t3.micro",
            user_data="export AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP",
        )
        return {}

    secrets = [m for m in map(FINDING.match, findings(offline(program))) if m and m["rule"] == "secrets"]
    assert {m["name"] for m in secrets} == {"db", "box"}


def test_wildcard_iam_is_found(offline: Callable[..., OfflineRun], findings: Audit) -> None:
    def program() -> dict[str, Any]:
        role = aws.iam.Role("r", assume_role_policy=json.dumps({"Version": "2012-10-17", "Statement": []}))
        aws.iam.RolePolicy(
            "p",
            role=role.name,
            policy=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        return {}

    assert "iam" in rules_of(findings(offline(program)))


def test_queue_without_dead_letters_or_encryption_is_found(
    offline: Callable[..., OfflineRun], findings: Audit
) -> None:
    found = findings(offline(lambda: {"q": aws.sqs.Queue("q").url}))
    assert any("dead-letter" in f for f in found)
    assert any("server-side encryption" in f for f in found)


def test_unprotected_data_store_outside_throwaway_is_found(
    offline: Callable[..., OfflineRun], findings: Audit
) -> None:
    class DataLayer(pulumi.ComponentResource):
        def __init__(self) -> None:
            super().__init__("tessera:stacks:DataLayer", "d", None)
            aws.kms.Key("k", enable_key_rotation=True, opts=pulumi.ResourceOptions(parent=self))
            self.register_outputs({})

    run = offline(lambda: (DataLayer(), {})[1])
    assert "lifecycle" in rules_of(findings(run, "prod-data"))
    assert "lifecycle" not in rules_of(findings(run, "dev"))
