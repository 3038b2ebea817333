"""The whole Pulumi program, for the dev stack and the production pair, under mocks.

Each stack's config file is the one shipped in the repo; the program is the one `pulumi up` runs. The
security and lifecycle invariants are checked by stacks.audit (zero findings), and the outputs users and
the compute layer read are checked here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from stacks.audit import DATA_STORE_TYPES, audit, ingress_rules, owner_of
from stacks.cost import layer_of
from stacks.plan import Plan
from stacks.services import SERVICE_NAMES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["dev", "prod-data", "prod-compute"])
def any_stack(request: pytest.FixtureRequest, shipped_plan: Callable[[str], Plan]) -> Plan:
    return shipped_plan(request.param)


def test_no_security_or_lifecycle_findings(any_stack: Plan) -> None:
    assert [str(f) for f in audit(any_stack.run, any_stack.settings)] == []


def test_only_the_jump_host_takes_traffic_from_outside(dev: Plan) -> None:
    rules = ingress_rules(dev.run)
    with_cidrs = [r for r in rules if r.cidrs]
    assert with_cidrs, "the jump host's SSH rule must be among the declared rules"
    for rule in with_cidrs:
        assert owner_of(dev.run, rule.declared_by) == "tessera:infra:JumpHost"
        assert (rule.from_port, rule.to_port) == (22, 22)
        assert set(rule.cidrs) == set(dev.settings.jump_host_allowed_cidrs)


def test_grafana_and_database_only_from_named_peers(dev: Plan) -> None:
    run = dev.run
    groups = {
        kind: {
            str(sg.get("id"))
            for sg in run.of_type("aws:ec2/securityGroup:SecurityGroup")
            if owner_of(run, sg) == kind
        }
        for kind in (
            "tessera:infra:JumpHost",
            "tessera:infra:Monitoring",
            "tessera:infra:Database",
            "tessera:infra:Network",
        )
    }
    by_group: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
    for rule in ingress_rules(run):
        by_group.setdefault(rule.group_id, []).append((rule.from_port, rule.source_groups))
    grafana_ports = {
        port
        for g in groups["tessera:infra:Monitoring"]
        for port, sources in by_group.get(g, [])
        if set(sources) <= groups["tessera:infra:JumpHost"]
    }
    assert 3000 in grafana_ports
    db_sources = {
        s for g in groups["tessera:infra:Database"] for _, sources in by_group.get(g, []) for s in sources
    }
    assert db_sources and db_sources <= groups["tessera:infra:Network"]


def test_data_stores_live_in_the_data_layer_only(dev: Plan, prod_compute: Plan) -> None:
    stores = [
        r
        for r in dev.run.custom_resources()
        if r.type in DATA_STORE_TYPES and r.type != "aws:ebs/volume:Volume"
    ]
    assert {r.type for r in stores} >= {
        "aws:s3/bucket:Bucket",
        "aws:rds/instance:Instance",
        "aws:sqs/queue:Queue",
    }
    assert {layer_of(dev.run, r) for r in stores} == {"data"}
    # The production compute stack, which `pulumi destroy` removes to save money, holds none of them.
    compute_types = {r.type for r in prod_compute.run.custom_resources()}
    assert not compute_types & (set(DATA_STORE_TYPES) - {"aws:ebs/volume:Volume"})
    assert "aws:autoscaling/group:Group" in compute_types and "aws:ec2/instance:Instance" in compute_types


def test_production_data_is_protected_and_dev_is_not(prod_data: Plan, dev: Plan) -> None:
    for plan, protected in ((prod_data, True), (dev, False)):
        stores = [r for r in plan.run.custom_resources() if r.type in DATA_STORE_TYPES]
        assert stores
        assert {r.protect for r in stores} == {protected}, plan.stack
        db = plan.run.of_type("aws:rds/instance:Instance")[0]
        assert bool(db.inputs.get("deletionProtection")) is protected
    buckets = prod_data.run.of_type("aws:s3/bucket:Bucket")
    assert not any(b.inputs.get("forceDestroy") for b in buckets)


def test_stack_outputs_name_what_users_and_the_compute_layer_need(dev: Plan) -> None:
    out = dev.run.outputs
    assert set(out["bucketNames"]) == {"imagery", "results", "models", "datasets", "logs"}
    assert set(out["queueUrls"]) >= {"image-requests", "region-requests", "training-jobs"}
    assert all(url.startswith("https://sqs.us-east-1.amazonaws.com/") for url in out["queueUrls"].values())
    assert out["databaseEndpoint"].endswith(":5432")
    assert out["databaseSecretArn"].startswith("arn:aws:secretsmanager:")
    assert set(out["imageRefs"]) == set(SERVICE_NAMES)
    assert all("@sha256:" in ref or ":" in ref.rsplit("/", 1)[-1] for ref in out["imageRefs"].values())
    grafana_ip, jump_ip = out["grafanaPrivateIp"], out["jumpHostPublicIp"]
    assert (
        out["grafanaTunnelCommand"]
        == f"ssh -N -o ExitOnForwardFailure=yes -L 3000:{grafana_ip}:3000 ec2-user@{jump_ip}"
    )


def test_compute_stack_reads_the_data_stack_by_reference(prod_compute: Plan, prod_data: Plan) -> None:
    refs = prod_compute.run.of_type("pulumi:pulumi:StackReference")
    assert [r.name for r in refs] == ["organization/tessera/prod-data"]
    # The fleets run in the data stack's private subnets and pull its images.
    private = set(prod_data.run.outputs["privateSubnetIds"])
    for group in prod_compute.run.of_type("aws:autoscaling/group:Group"):
        assert set(group.inputs["vpcZoneIdentifiers"]) == private


def test_every_service_has_its_own_role_and_only_its_queues(dev: Plan) -> None:
    policies = {
        p.name: json.loads(p.inputs["policy"]) for p in dev.run.of_type("aws:iam/rolePolicy:RolePolicy")
    }
    queue_arns = dev.run.outputs["queueUrls"]
    assert queue_arns
    runner = next(doc for name, doc in policies.items() if "model-runner" in name)
    resources = json.dumps(runner)
    assert "image-requests" in resources and "region-requests" in resources
    assert "training-jobs" not in resources and "sky-requests" not in resources
    roles = dev.run.of_type("aws:iam/role:Role")
    assert len(roles) >= len(SERVICE_NAMES)


def test_training_instance_stops_itself_and_prod_trains_on_gaudi(dev: Plan, prod_compute: Plan) -> None:
    for plan, accelerator in ((dev, "nvidia"), (prod_compute, "gaudi")):
        training = [
            i
            for i in plan.run.of_type("aws:ec2/instance:Instance")
            if owner_of(plan.run, i) == "tessera:infra:TrainingInstance"
        ]
        assert len(training) == 1
        assert training[0].inputs["instanceInitiatedShutdownBehavior"] == "stop"
        assert plan.run.outputs["trainingAccelerator"] == accelerator
        assert not plan.run.of_type("aws:ec2/instanceState:InstanceState")


def test_dev_costs_less_with_compute_destroyed(dev: Plan) -> None:
    running, data_only = dev.cost.total_monthly(), dev.cost.total_monthly(("data",))
    assert 0 < data_only < running
    assert dev.cost.unpriced == []


def test_the_autostop_safety_net_is_deployed_with_compute(dev: Plan, prod_compute: Plan) -> None:
    for plan in (dev, prod_compute):
        (function,) = [f for f in plan.run.of_type("aws:lambda/function:Function") if "autostop" in f.name]
        assert layer_of(plan.run, function) == "compute"
        assert plan.run.outputs["autostopFunctionName"]
        assert plan.run.of_type("aws:cloudwatch/eventRule:EventRule")
        stops = [
            statement
            for policy in plan.run.of_type("aws:iam/rolePolicy:RolePolicy")
            for statement in json.loads(policy.inputs["policy"])["Statement"]
            if "ec2:StopInstances" in statement["Action"] and "autostop" in policy.name
        ]
        assert stops and all("ec2:ResourceTag/tessera:auto-stop" in json.dumps(s["Condition"]) for s in stops)
