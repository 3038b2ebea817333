"""The platform database: private, encrypted, password in Secrets Manager, reachable only from named peers,
its logs in managed groups; and the bootstrap, the only holder of the master secret."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pulumi
import pytest

from infra.database import (
    Database,
    DatabaseArgs,
    bootstrap_function_name,
    database_identifier,
)
from infra.database_bootstrap import DatabaseBootstrap, DatabaseBootstrapArgs
from infra.iam import wildcard_violations
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
            "resource_id": db.resource_id,
            "user_arn_prefix": db.user_arn_prefix,
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
    # SG, subnet group, parameter group, two log groups, instance, one rule per peer
    assert len(children) == 6 + len(PEERS)
    assert all(r.protect for r in children)


LOG_GROUP = "aws:cloudwatch/logGroup:LogGroup"


def test_identifier_and_final_snapshot_carry_the_stack(offline: Callable[..., OfflineRun]) -> None:
    assert database_identifier("tessera", "prod-data") == "tessera-prod-data-db"
    assert database_identifier("tessera", "My_Stack.2") == "tessera-my-stack-2-db"
    identifiers = {}
    for stack in ("dev", "prod-data"):
        (db,) = _database(offline, identifier=database_identifier("tessera", stack)).of_type(RDS)
        identifiers[stack] = (db.inputs["identifier"], db.inputs["finalSnapshotIdentifier"])
    assert identifiers == {
        "dev": ("tessera-dev-db", "tessera-dev-db-final"),
        "prod-data": ("tessera-prod-data-db", "tessera-prod-data-db-final"),
    }
    with pytest.raises(ValueError, match="identifier"):
        DatabaseArgs(
            vpc_id="v",
            subnet_ids=SUBNETS,
            client_security_group_ids=PEERS,
            kms_key_arn=KEY_ARN,
            identifier="Bad_Name",
        )


def test_exported_logs_go_to_encrypted_groups_with_retention_made_first(
    offline: Callable[..., OfflineRun],
) -> None:
    options: dict[str, pulumi.ResourceOptions] = {}

    def program() -> dict[str, Any]:
        def record(args: pulumi.ResourceTransformationArgs) -> None:
            options[args.name] = args.opts

        pulumi.runtime.register_stack_transformation(record)
        db = Database(
            "catalog",
            DatabaseArgs(
                vpc_id="vpc-0abc",
                subnet_ids=SUBNETS,
                client_security_group_ids=PEERS,
                kms_key_arn=KEY_ARN,
                identifier="tessera-dev-db",
                log_retention_days=90,
            ),
        )
        return {"groups": db.log_group_arns}

    run = offline(program)
    (db,) = run.of_type(RDS)
    groups = {g.inputs["name"]: g for g in run.of_type(LOG_GROUP)}
    assert set(groups) == {
        f"/aws/rds/instance/tessera-dev-db/{export}" for export in db.inputs["enabledCloudwatchLogsExports"]
    }
    for group in groups.values():
        assert group.inputs["kmsKeyId"] == KEY_ARN
        assert group.inputs["retentionInDays"] == 90
    depends_on = options["catalog-postgres"].depends_on
    assert isinstance(depends_on, list)
    assert {d._name for d in depends_on} == {g.name for g in groups.values()}


def test_storage_autoscaling_ceiling(offline: Callable[..., OfflineRun]) -> None:
    (db,) = _database(offline, allocated_storage_gb=200, max_allocated_storage_gb=1000).of_type(RDS)
    assert (db.inputs["allocatedStorage"], db.inputs["maxAllocatedStorage"]) == (200, 1000)
    with pytest.raises(ValueError, match="max_allocated_storage_gb"):
        DatabaseArgs(
            vpc_id="v",
            subnet_ids=SUBNETS,
            client_security_group_ids=PEERS,
            kms_key_arn=KEY_ARN,
            allocated_storage_gb=200,
        )


def test_iam_user_arns_name_the_instance_resource_id(run: OfflineRun) -> None:
    (db,) = run.of_type(RDS)
    prefix = run.outputs["user_arn_prefix"]
    assert prefix == f"arn:aws:rds-db:us-east-1:123456789012:dbuser:{db.outputs['resourceId']}/"
    assert run.outputs["resource_id"] == db.outputs["resourceId"]


SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:rds!db-1"
BOOT_LOGS = "arn:aws:logs:us-east-1:123456789012:log-group:/tessera/dev/db-bootstrap"
USERS = [{"user": "model_runner", "writes": ["model_runner"], "reads": ["registry"]}]
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/db-bootstrap@sha256:" + "ab" * 32


def _bootstrap(offline: Callable[..., OfflineRun], **kwargs: Any) -> OfflineRun:
    def program() -> dict[str, Any]:
        boot = DatabaseBootstrap(
            "boot",
            DatabaseBootstrapArgs(
                **{
                    "function_name": "tessera-dev-db-bootstrap",
                    "image_uri": IMAGE,
                    "repository_name": "db-bootstrap-repo",
                    "region": "us-east-1",
                    "account_id": "123456789012",
                    "subnet_ids": SUBNETS,
                    "security_group_id": "sg-0boot",
                    "host": "tessera-dev-db.c0ffee.us-east-1.rds.amazonaws.com",
                    "port": 5432,
                    "master_secret_arn": SECRET,
                    "kms_key_arn": KEY_ARN,
                    "log_group_name": "/tessera/dev/db-bootstrap",
                    "log_group_arn": BOOT_LOGS,
                    "users": USERS,
                    **kwargs,
                }
            ),
        )
        return {"role": boot.role_arn}

    return offline(program)


def test_the_bootstrap_alone_reads_the_master_secret(offline: Callable[..., OfflineRun]) -> None:
    run = _bootstrap(offline)
    (policy,) = run.of_type("aws:iam/rolePolicy:RolePolicy")
    doc = json.loads(policy.inputs["policy"])
    assert wildcard_violations(doc) == []
    reads = [s for s in doc["Statement"] if any(a.startswith("secretsmanager:") for a in s["Action"])]
    assert [s["Resource"] for s in reads] == [SECRET]
    (role,) = run.of_type("aws:iam/role:Role")
    trust = json.loads(role.inputs["assumeRolePolicy"])
    assert [s["Principal"] for s in trust["Statement"]] == [{"Service": "lambda.amazonaws.com"}]


def test_the_bootstrap_runs_its_image_in_the_vpc(offline: Callable[..., OfflineRun]) -> None:
    run = _bootstrap(offline)
    (fn,) = run.of_type("aws:lambda/function:Function")
    assert (fn.inputs["packageType"], fn.inputs["imageUri"]) == ("Image", IMAGE)
    assert fn.inputs["vpcConfig"]["subnetIds"] == SUBNETS
    assert fn.inputs["vpcConfig"]["securityGroupIds"] == ["sg-0boot"]
    assert fn.inputs["environment"]["variables"]["TESSERA_DB_MASTER_SECRET_ARN"] == SECRET
    assert fn.inputs["loggingConfig"]["logGroup"] == "/tessera/dev/db-bootstrap"
    (pull,) = run.of_type("aws:ecr/repositoryPolicy:RepositoryPolicy")
    (statement,) = json.loads(pull.inputs["policy"])["Statement"]
    assert statement["Condition"] == {
        "StringEquals": {
            "aws:sourceArn": "arn:aws:lambda:us-east-1:123456789012:function:tessera-dev-db-bootstrap"
        }
    }


def test_the_bootstrap_is_invoked_again_when_users_or_image_change(
    offline: Callable[..., OfflineRun],
) -> None:
    def invocation(run: OfflineRun) -> Any:
        (inv,) = run.of_type("aws:lambda/invocation:Invocation")
        return inv

    base = invocation(_bootstrap(offline))
    assert json.loads(base.inputs["input"]) == {"users": USERS}
    assert base.inputs["triggers"]["image"] == IMAGE
    other_users = invocation(_bootstrap(offline, users=[{**USERS[0], "reads": []}]))
    other_image = invocation(_bootstrap(offline, image_uri=IMAGE.replace("ab", "cd")))
    assert other_users.inputs["input"] != base.inputs["input"]
    assert other_users.inputs["triggers"] != base.inputs["triggers"]
    assert other_image.inputs["triggers"] != base.inputs["triggers"]
    with pytest.raises(ValueError, match="writes"):
        _bootstrap(offline, users=[{"user": "x", "grants": "all"}])


@pytest.mark.parametrize("stack", ["dev", "prod-data", "a" * 80, "team-" + "x" * 70 + "-prod"])
def test_physical_names_fit_aws_limits_and_stay_distinct_for_long_stacks(stack: str) -> None:
    identifier = database_identifier("tessera", stack)
    function = bootstrap_function_name("tessera", stack)
    assert len(identifier) <= 63 and re.fullmatch(r"[a-z](?!.*--)[a-z0-9-]*[a-z0-9]", identifier)
    assert len(function) <= 64 and function.endswith("-db-bootstrap")
    other = database_identifier("tessera", stack + "-b")
    assert other != identifier
