"""The audit finds what it is there to find: small programs that break one invariant each."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pulumi
import pulumi_aws as aws

from stacks.audit import audit
from stacks.offline import OfflineRun


def rules_of(run: OfflineRun) -> set[str]:
    return {f.rule for f in audit(run)}


def test_open_ingress_is_found(offline: Callable[..., OfflineRun]) -> None:
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

    assert "exposure" in rules_of(offline(program))


def test_bucket_without_encryption_or_block_is_found(offline: Callable[..., OfflineRun]) -> None:
    run = offline(lambda: {"b": aws.s3.Bucket("bare").bucket})
    findings = [str(f) for f in audit(run)]
    assert any("SSE-KMS" in f for f in findings)
    assert any("public access block" in f for f in findings)
    assert any("TLS" in f for f in findings)


def test_imdsv1_and_unencrypted_volume_are_found(offline: Callable[..., OfflineRun]) -> None:
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
    findings = [str(f) for f in audit(run)]
    assert any("IMDSv2" in f for f in findings)
    assert sum("unencrypted EBS" in f for f in findings) == 2, findings
    assert run.of_type("aws:ebs/volume:Volume")


def test_inline_secrets_are_found(offline: Callable[..., OfflineRun]) -> None:
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

    findings = [f for f in audit(offline(program)) if f.rule == "secrets"]
    assert {f.resource.split()[-1] for f in findings} == {"db", "box"}


def test_wildcard_iam_is_found(offline: Callable[..., OfflineRun]) -> None:
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

    assert "iam" in rules_of(offline(program))


def test_queue_without_dead_letters_or_encryption_is_found(offline: Callable[..., OfflineRun]) -> None:
    findings = [str(f) for f in audit(offline(lambda: {"q": aws.sqs.Queue("q").url}))]
    assert any("dead-letter" in f for f in findings)
    assert any("server-side encryption" in f for f in findings)


def test_unprotected_data_store_outside_throwaway_is_found(offline: Callable[..., OfflineRun]) -> None:
    from stacks.settings import Settings

    class DataLayer(pulumi.ComponentResource):
        def __init__(self) -> None:
            super().__init__("tessera:stacks:DataLayer", "d", None)
            aws.kms.Key("k", enable_key_rotation=True, opts=pulumi.ResourceOptions(parent=self))
            self.register_outputs({})

    run = offline(lambda: (DataLayer(), {})[1])
    prod = Settings(stack="p", region="us-east-1", throwaway=False)
    dev = Settings(stack="d", region="us-east-1", throwaway=True)
    assert any(f.rule == "lifecycle" for f in audit(run, prod))
    assert not any(f.rule == "lifecycle" for f in audit(run, dev))
