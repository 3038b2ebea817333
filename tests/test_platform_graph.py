"""What mocks cannot prove by running the program, checked over the resource graph it declares.

A training box that cannot reach PostgreSQL, a CloudWatch agent whose role cannot read the tags it names, a
Grafana that cannot draw its annotations, a GPU box pinned to a zone that does not offer its type: each of
these deploys under mocks and fails only on AWS. These tests read who is admitted where and who may do what.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stacks.graph import (
    check_agent_can_read_tags,
    check_database_reachable,
    graph_findings,
    role_actions,
)
from stacks.offline import Declared, OfflineRun, TesseraMocks, load_stack_config, run_offline
from stacks.plan import Plan, _program, render

ROOT = Path(__file__).resolve().parent.parent


def _run(*resources: Declared) -> OfflineRun:
    return OfflineRun(resources=list(resources), outputs={}, mocks=TesseraMocks())


def _database(admits: str) -> list[Declared]:
    component = Declared("tessera:infra:Database", "db", {}, {}, custom=False)
    group = Declared(
        "aws:ec2/securityGroup:SecurityGroup",
        "db-sg",
        {},
        {"id": "sg-db"},
        parent="db",
        parent_type="tessera:infra:Database",
    )
    rule = Declared(
        "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
        "db-from-peer",
        {"securityGroupId": "sg-db", "referencedSecurityGroupId": admits, "fromPort": 5432, "toPort": 5432},
        {},
    )
    return [component, group, rule]


# --- the database is reachable from everything configured to use it ------------------------------------


def test_every_database_client_of_dev_is_admitted_on_5432(dev: Plan) -> None:
    assert [str(f) for f in check_database_reachable(dev.run)] == []


def test_every_database_client_of_prod_compute_is_admitted_by_prod_data(
    prod_compute: Plan, prod_data: Plan
) -> None:
    # The database and its rules live in the data stack; the boxes in the compute stack.
    assert [str(f) for f in check_database_reachable(prod_compute.run, prod_data.run)] == []


def test_the_training_box_is_among_the_database_clients(dev: Plan) -> None:
    from stacks.graph import DATABASE_MARKER, compute_units, database_admitted_groups

    training = [u for u in compute_units(dev.run) if u.resource.inputs.get("tags", {}).get("tessera:role")]
    assert training and DATABASE_MARKER in training[0].config_text, "the trainer is configured with the DB"
    assert database_admitted_groups(dev.run) & set(training[0].security_group_ids)


def test_a_box_the_database_does_not_admit_is_found() -> None:
    box = Declared(
        "aws:ec2/instance:Instance",
        "box",
        {"vpcSecurityGroupIds": ["sg-box"], "userData": "TESSERA_DB_HOST=db.internal"},
        {},
    )
    findings = list(check_database_reachable(_run(*_database(admits="sg-other"), box)))
    assert [f.rule for f in findings] == ["database-unreachable"]
    assert "sg-box" in findings[0].detail
    assert list(check_database_reachable(_run(*_database(admits="sg-box"), box))) == []


def test_a_box_that_reads_its_database_settings_from_ssm_counts_as_a_client() -> None:
    parameter = Declared(
        "aws:ssm/parameter:Parameter",
        "config",
        {"value": json.dumps({"environment": {"TESSERA_DB_HOST": "db.internal"}})},
        {"name": "/tessera/dev/box/config"},
    )
    box = Declared(
        "aws:ec2/instance:Instance",
        "box",
        {"vpcSecurityGroupIds": ["sg-box"], "userData": "parameter='/tessera/dev/box/config'"},
        {},
    )
    assert [f.rule for f in check_database_reachable(_run(*_database("sg-other"), parameter, box))] == [
        "database-unreachable"
    ]


# --- every CloudWatch agent may read the tags its dimensions name ----------------------------------------


def test_fleet_and_training_agents_may_describe_their_tags(dev: Plan, prod_compute: Plan) -> None:
    assert [str(f) for f in check_agent_can_read_tags(dev.run)] == []
    assert [str(f) for f in check_agent_can_read_tags(prod_compute.run)] == []


def test_an_agent_whose_role_cannot_describe_tags_is_found() -> None:
    profile = Declared("aws:iam/instanceProfile:InstanceProfile", "p", {"role": "r"}, {"name": "p"})
    role = Declared("aws:iam/role:Role", "r", {}, {"name": "r", "arn": "arn:aws:iam::1:role/r"})
    policy = Declared(
        "aws:iam/rolePolicy:RolePolicy",
        "r-policy",
        {
            "role": "r",
            "policy": json.dumps(
                {"Statement": [{"Effect": "Allow", "Action": "sqs:ReceiveMessage", "Resource": "arn:q"}]}
            ),
        },
        {},
    )
    template = Declared(
        "aws:ec2/launchTemplate:LaunchTemplate",
        "lt",
        {
            "iamInstanceProfile": {"name": "p"},
            "userData": "",
            "networkInterfaces": [{"securityGroups": ["sg-1"]}],
        },
        {},
    )
    import base64

    agent = json.dumps(
        {"metrics": {"append_dimensions": {"AutoScalingGroupName": "${aws:AutoScalingGroupName}"}}}
    )
    script = f"echo {base64.b64encode(agent.encode()).decode()} | base64 -d > agent.json"
    template.inputs["userData"] = base64.b64encode(script.encode()).decode()
    assert [f.rule for f in check_agent_can_read_tags(_run(profile, role, policy, template))] == [
        "agent-cannot-read-tags"
    ]


# --- Grafana may call what its CloudWatch data source calls ----------------------------------------------

#: The metrics side of AWS's AmazonGrafanaCloudWatchAccess policy (what Grafana's CloudWatch data source
#: calls for metric queries, alarm annotations and dimension/region pickers).
GRAFANA_DATA_SOURCE_ACTIONS = {
    "cloudwatch:getmetricdata",
    "cloudwatch:listmetrics",
    "cloudwatch:getmetricstatistics",
    "cloudwatch:describealarms",
    "cloudwatch:describealarmsformetric",
    "cloudwatch:describealarmhistory",
    "ec2:describeinstances",
    "ec2:describetags",
    "ec2:describeregions",
    "tag:getresources",
}


def test_grafana_role_grants_what_its_cloudwatch_data_source_calls(dev: Plan) -> None:
    roles = [r for r in dev.run.of_type("aws:iam/role:Role") if "grafana" in r.name]
    assert len(roles) == 1
    missing = GRAFANA_DATA_SOURCE_ACTIONS - role_actions(dev.run, str(roles[0].get("name")))
    assert missing == set()


# --- the training box goes where its type is offered ------------------------------------------------------


def _training_instance(run: OfflineRun) -> Declared:
    [box] = [r for r in run.of_type("aws:ec2/instance:Instance") if r.name.endswith("-training-instance")]
    return box


def _private_subnets(run: OfflineRun) -> list[str]:
    return list(run.outputs["privateSubnetIds"])


def test_training_box_lands_in_a_subnet_whose_zone_offers_its_type() -> None:
    config = load_stack_config(str(ROOT / "Pulumi.dev.yaml"))
    first = run_offline(_program, config=config, stack="dev")
    zones = [first.mocks.subnet_zone(s) for s in _private_subnets(first)]
    # A zone of a private subnet other than the first one's: the program used to pin subnet 0.
    others = [z for z in zones if z != zones[0]]
    assert others, f"the dev stack's private subnets should span zones, got {zones}"
    offered = others[0]
    run = run_offline(
        _program, config=config, stack="dev", offerings={config["tessera:trainingInstanceType"]: [offered]}
    )
    box = _training_instance(run)
    assert run.mocks.subnet_zone(str(box.inputs["subnetId"])) == offered
    assert box.inputs.get("availabilityZone") == offered


def test_deployment_stops_naming_the_zones_when_no_subnet_offers_the_training_type() -> None:
    config = load_stack_config(str(ROOT / "Pulumi.dev.yaml"))
    with pytest.raises(Exception, match=r"tessera:trainingInstanceType: p3\.2xlarge is not offered") as err:
        run_offline(_program, config=config, stack="dev", offerings={"p3.2xlarge": ["us-east-1f"]})
    assert "us-east-1f" in str(err.value) and "tessera:azCount" in str(err.value)


# --- the plan shows it ----------------------------------------------------------------------------------


def test_plan_has_no_graph_findings_and_prints_capacity_warnings(dev: Plan) -> None:
    assert graph_findings(dev.run) == []
    text = render(dev)
    assert "Before `pulumi up` on a real account" in text
    assert "L-417A185B" in text  # the P-instance quota the dev training box needs


def test_a_fleet_spreads_only_over_subnets_whose_zone_offers_its_type() -> None:
    config = load_stack_config(str(ROOT / "Pulumi.dev.yaml"))
    fleet_type = config["tessera:fleets"]["model-runner"]["instanceType"]
    first = run_offline(_program, config=config, stack="dev")
    subnets = _private_subnets(first)
    zones = {s: first.mocks.subnet_zone(s) for s in subnets}
    offered = zones[subnets[-1]]
    run = run_offline(_program, config=config, stack="dev", offerings={fleet_type: [offered]})
    [group] = [g for g in run.of_type("aws:autoscaling/group:Group") if "model-runner" in g.name]
    assert group.inputs["vpcZoneIdentifiers"] == [s for s in subnets if zones[s] == offered]
    # The unrestricted run spread over every private subnet.
    [before] = [g for g in first.of_type("aws:autoscaling/group:Group") if "model-runner" in g.name]
    assert before.inputs["vpcZoneIdentifiers"] == subnets
