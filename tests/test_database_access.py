"""Who may reach the database, over the whole program: each service logs in as its own user with an IAM token
and may `rds-db:connect` as that user only; no service can read the master secret; the database bootstrap,
in the data layer, is the one principal that can. And the database's storage can grow past 100 GB."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from stacks.offline import Declared, OfflineRun
from stacks.plan import Plan, plan_stack
from stacks.program import DataView, service_environment
from stacks.services import DATABASE_BOOTSTRAP, SERVICES, database_users
from stacks.settings import ConfigError, Settings, getter_from_mapping, read_settings

ROOT = Path(__file__).resolve().parent.parent
RDS = "aws:rds/instance:Instance"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"


def _settings(**config: Any) -> Settings:
    return read_settings(
        getter_from_mapping({"aws:region": "us-east-1", "tessera:layer": "data", **config}), "t"
    )


def _statements(policy: Declared) -> list[dict[str, Any]]:
    statements: list[dict[str, Any]] = json.loads(policy.inputs["policy"])["Statement"]
    return statements


def _texts(value: Any) -> list[str]:
    """Every string inside ``value``, base64/gzip-encoded ones (user data) decoded as well."""
    found: list[str] = []
    if isinstance(value, dict):
        for item in value.values():
            found += _texts(item)
    elif isinstance(value, list):
        for item in value:
            found += _texts(item)
    elif isinstance(value, str):
        found.append(value)
        try:
            raw = base64.b64decode(value, validate=True)
            found.append(gzip.decompress(raw).decode() if raw[:2] == b"\x1f\x8b" else raw.decode())
        except (ValueError, OSError, UnicodeDecodeError):
            pass
    return found


# --- storage autoscaling ---------------------------------------------------------------------------------


def test_storage_ceiling_defaults_to_twice_the_start_and_at_least_100() -> None:
    assert _settings().db_max_allocated_storage_gb == 100
    assert _settings(**{"tessera:dbAllocatedStorageGb": 500}).db_max_allocated_storage_gb == 1000
    assert _settings(**{"tessera:dbMaxAllocatedStorageGb": 300}).db_max_allocated_storage_gb == 300


def test_a_ceiling_below_the_start_names_the_key() -> None:
    with pytest.raises(ConfigError, match="tessera:dbMaxAllocatedStorageGb=150 is below"):
        _settings(**{"tessera:dbAllocatedStorageGb": 200, "tessera:dbMaxAllocatedStorageGb": 150})


def test_a_database_above_100_gb_plans() -> None:
    config = {"aws:region": "us-east-1", "tessera:layer": "data", "tessera:dbAllocatedStorageGb": 400}
    plan = plan_stack("big", ROOT, config=config)
    (db,) = plan.run.of_type(RDS)
    assert (db.inputs["allocatedStorage"], db.inputs["maxAllocatedStorage"]) == (400, 800)


def test_production_storage_can_grow(prod_data: Plan) -> None:
    (db,) = prod_data.run.of_type(RDS)
    assert db.inputs["maxAllocatedStorage"] > db.inputs["allocatedStorage"]


# --- who holds what ----------------------------------------------------------------------------------------


def test_no_service_role_can_read_the_master_secret(dev: Plan, prod_data: Plan, prod_compute: Plan) -> None:
    for plan, secret, readers in (
        (dev, dev.run.outputs["databaseSecretArn"], ["tessera-db-bootstrap-policy"]),
        (prod_compute, prod_data.run.outputs["databaseSecretArn"], []),
    ):
        assert secret.startswith("arn:aws:secretsmanager:")
        assert [p.name for p in plan.run.of_type(ROLE_POLICY) if secret in p.inputs["policy"]] == readers
        # Nor any RDS-managed secret by another spelling.
        services = [p for p in plan.run.of_type(ROLE_POLICY) if p.name.startswith("tessera-role-")]
        assert services
        assert not [p.name for p in services if "rds!" in p.inputs["policy"]]


def test_the_bootstrap_is_the_only_principal_given_the_secret(dev: Plan) -> None:
    secret = dev.run.outputs["databaseSecretArn"]
    holders = sorted(
        r.name
        for r in dev.run.custom_resources()
        if r.type != RDS and any(secret in text for text in _texts(r.inputs))
    )
    # Its policy, and its function's environment; nothing a service runs with names the secret.
    assert holders == ["tessera-db-bootstrap-fn", "tessera-db-bootstrap-policy"]


def test_each_database_service_connects_as_its_own_user_only(
    dev: Plan, prod_data: Plan, prod_compute: Plan
) -> None:
    for plan, data in ((dev, dev), (prod_compute, prod_data)):
        prefix = data.run.outputs["databaseUserArnPrefix"]
        (db,) = data.run.of_type(RDS)
        assert prefix == f"arn:aws:rds-db:us-east-1:123456789012:dbuser:{db.outputs['resourceId']}/"
        connects: dict[str, list[str]] = {}
        for policy in plan.run.of_type(ROLE_POLICY):
            for statement in _statements(policy):
                if "rds-db:connect" in statement["Action"]:
                    connects.setdefault(policy.name, []).extend(statement["Resource"])
        expected = {
            f"tessera-role-{spec.name}-policy": [prefix + spec.database.user]
            for spec in SERVICES
            if spec.database
        }
        assert connects == expected, plan.stack


def test_services_get_their_user_and_no_secret(offline: Any) -> None:
    settings = _settings()
    outputs = {"databaseAddress": "db.internal", "databasePort": 5432, "databaseSecretArn": "arn:secret"}
    outputs["queueUrls"] = {q: f"https://sqs/{q}" for s in SERVICES for q in s.consumes + s.sends}
    outputs["bucketNames"] = {b.purpose: f"tessera-{b.purpose}" for s in SERVICES for b in s.reads + s.writes}
    data = DataView.of_outputs(outputs)
    run: OfflineRun = offline(lambda: {s.name: service_environment(s, settings, data) for s in SERVICES})
    for spec in SERVICES:
        env = run.outputs[spec.name]
        assert "arn:secret" not in json.dumps(env)
        if spec.database:
            assert env["TESSERA_DB_USER"] == spec.database.user
            assert env["TESSERA_DB_HOST"] == "db.internal"
        else:
            assert not [k for k in env if k.startswith("TESSERA_DB_")]


def test_the_bootstrap_runs_in_the_data_layer_and_is_admitted_by_the_database(
    dev: Plan, prod_data: Plan, prod_compute: Plan
) -> None:
    for plan, has_it in ((dev, True), (prod_data, True), (prod_compute, False)):
        invocations = plan.run.of_type("aws:lambda/invocation:Invocation")
        assert len(invocations) == int(has_it), plan.stack
        if has_it:
            assert json.loads(invocations[0].inputs["input"]) == {"users": database_users()}
    groups = dev.run.outputs["serviceSecurityGroupIds"]
    admitted = {
        r.inputs["referencedSecurityGroupId"]
        for r in dev.run.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")
        if r.inputs.get("fromPort") == 5432
    }
    assert groups[DATABASE_BOOTSTRAP] in admitted
    assert {groups[s.name] for s in SERVICES if s.database} <= admitted
    (fn,) = [
        f for f in dev.run.of_type("aws:lambda/function:Function") if f.inputs.get("packageType") == "Image"
    ]
    assert fn.inputs["vpcConfig"]["securityGroupIds"] == [groups[DATABASE_BOOTSTRAP]]
    assert set(fn.inputs["vpcConfig"]["subnetIds"]) == set(dev.run.outputs["privateSubnetIds"])


def test_database_identifiers_carry_the_stack(dev: Plan, prod_data: Plan) -> None:
    for plan in (dev, prod_data):
        (db,) = plan.run.of_type(RDS)
        assert db.inputs["identifier"] == f"tessera-{plan.stack}-db"
        groups = {g.inputs["name"] for g in plan.run.of_type("aws:cloudwatch/logGroup:LogGroup")}
        assert {f"/aws/rds/instance/tessera-{plan.stack}-db/{e}" for e in ("postgresql", "upgrade")} <= groups
