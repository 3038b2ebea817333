"""The catalog database: private, encrypted, password in Secrets Manager, reachable only from named peers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pulumi
import pytest

from infra.database import Database, DatabaseArgs
from stacks.offline import OfflineRun

RDS = "aws:rds/instance:Instance"
SG = "aws:ec2/securityGroup:SecurityGroup"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/0000-db"
PEERS = {"catalog-api": "sg-0api", "model-runner": "sg-0runner"}
SUBNETS = ["subnet-0a", "subnet-0b"]


def _database(
    offline: Callable[..., OfflineRun], opts: dict[str, Any] | None = None, **kwargs: Any
) -> OfflineRun:
    def program() -> dict[str, Any]:
        db = Database(
            "catalog",
            DatabaseArgs(
                vpc_id="vpc-0abc",
                subnet_ids=SUBNETS,
                client_security_group_ids=PEERS,
                kms_key_arn=KEY_ARN,
                **kwargs,
            ),
            opts=pulumi.ResourceOptions(**(opts or {})),
        )
        return {
            "address": db.address,
            "port": db.port,
            "endpoint": db.endpoint,
            "secret_arn": db.secret_arn,
            "sg": db.security_group_id,
            "identifier": db.instance_identifier,
        }

    return offline(program)


@pytest.fixture
def run(offline: Callable[..., OfflineRun]) -> OfflineRun:
    return _database(offline)


def test_not_publicly_accessible(run: OfflineRun) -> None:
    (db,) = run.of_type(RDS)
    assert db.inputs["publiclyAccessible"] is False


def test_encrypted_with_the_key(run: OfflineRun) -> None:
    (db,) = run.of_type(RDS)
    assert db.inputs["storageEncrypted"] is True
    assert db.inputs["kmsKeyId"] == KEY_ARN
    assert db.inputs["performanceInsightsEnabled"] is True
    assert db.inputs["performanceInsightsKmsKeyId"] == KEY_ARN


def test_password_managed_by_secrets_manager(run: OfflineRun) -> None:
    (db,) = run.of_type(RDS)
    assert db.inputs["manageMasterUserPassword"] is True
    assert db.inputs["masterUserSecretKmsKeyId"] == KEY_ARN
    for resource in run.resources:
        assert not [k for k in resource.inputs if "password" in k.lower() and k != "manageMasterUserPassword"]
    assert run.outputs["secret_arn"].startswith("arn:aws:secretsmanager:")


def test_ingress_only_from_named_peer_groups(run: OfflineRun) -> None:
    (db,) = run.of_type(RDS)
    assert db.inputs["vpcSecurityGroupIds"] == [run.outputs["sg"]]
    group = run.by_id(run.outputs["sg"])
    assert group is not None and group.type == SG
    assert not group.inputs.get("ingress")
    rules = [r for r in run.of_type(INGRESS) if r.inputs["securityGroupId"] == run.outputs["sg"]]
    assert sorted(r.inputs["referencedSecurityGroupId"] for r in rules) == sorted(PEERS.values())
    for rule in rules:
        assert (rule.inputs["ipProtocol"], rule.inputs["fromPort"], rule.inputs["toPort"]) == (
            "tcp",
            5432,
            5432,
        )
        assert not {"cidrIpv4", "cidrIpv6", "prefixListId"} & set(rule.inputs)
    # No other way in: no legacy rules, no rules elsewhere on the group.
    assert not run.of_type("aws:ec2/securityGroupRule:SecurityGroupRule")
    assert len(run.of_type(INGRESS)) == len(PEERS)


def test_deletion_protection_and_final_snapshot_by_default(run: OfflineRun) -> None:
    (db,) = run.of_type(RDS)
    assert db.inputs["deletionProtection"] is True
    assert db.inputs["skipFinalSnapshot"] is False
    assert db.inputs["finalSnapshotIdentifier"] == "catalog-final"
    assert db.inputs["copyTagsToSnapshot"] is True
    assert db.inputs["backupRetentionPeriod"] == 7


def test_throwaway_database_skips_final_snapshot(offline: Callable[..., OfflineRun]) -> None:
    (db,) = _database(offline, deletion_protection=False).of_type(RDS)
    assert db.inputs["deletionProtection"] is False
    assert db.inputs["skipFinalSnapshot"] is True


def test_parameter_group_forces_tls_and_logs_slow_statements(run: OfflineRun) -> None:
    (db,) = run.of_type(RDS)
    (params,) = run.of_type("aws:rds/parameterGroup:ParameterGroup")
    assert db.inputs["parameterGroupName"] == params.outputs["id"]
    assert params.inputs["family"] == "postgres17"
    values = {p["name"]: p["value"] for p in params.inputs["parameters"]}
    assert values["rds.force_ssl"] == "1"
    assert int(values["log_min_duration_statement"]) > 0


def test_engine_and_operations(run: OfflineRun) -> None:
    (db,) = run.of_type(RDS)
    assert (db.inputs["engine"], db.inputs["engineVersion"]) == ("postgres", "17")
    assert db.inputs["instanceClass"] == "db.t4g.micro"
    assert db.inputs["iamDatabaseAuthenticationEnabled"] is True
    assert db.inputs["autoMinorVersionUpgrade"] is True
    assert db.inputs["maxAllocatedStorage"] > db.inputs["allocatedStorage"]
    assert set(db.inputs["enabledCloudwatchLogsExports"]) == {"postgresql", "upgrade"}
    (subnets,) = run.of_type("aws:rds/subnetGroup:SubnetGroup")
    assert subnets.inputs["subnetIds"] == SUBNETS
    assert db.inputs["dbSubnetGroupName"] == subnets.outputs["id"]
    assert run.outputs["identifier"] == "catalog"
    assert run.outputs["endpoint"].startswith(run.outputs["address"])


def test_bad_arguments_are_rejected(offline: Callable[..., OfflineRun]) -> None:
    with pytest.raises(ValueError, match="set subnet_ids"):
        DatabaseArgs(vpc_id="v", subnet_ids=["s"], client_security_group_ids=PEERS, kms_key_arn=KEY_ARN)
    with pytest.raises(ValueError, match="set backup_retention_days"):
        DatabaseArgs(
            vpc_id="v",
            subnet_ids=SUBNETS,
            client_security_group_ids=PEERS,
            kms_key_arn=KEY_ARN,
            backup_retention_days=0,
        )


def test_protect_reaches_every_child(offline: Callable[..., OfflineRun]) -> None:
    run = _database(offline, opts={"protect": True})
    children = [r for r in run.resources if r.type != "tessera:infra:Database"]
    assert len(children) == 4 + len(PEERS)  # SG, subnet group, parameter group, instance, one rule per peer
    assert all(r.protect for r in children)
