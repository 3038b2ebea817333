"""The VPC: who can reach what, where traffic leaves, and what is recorded."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from typing import Any

import pulumi
import pytest

from infra.network import Network, NetworkArgs, subnet_cidrs
from stacks.offline import Declared, OfflineRun

SUBNET = "aws:ec2/subnet:Subnet"
ROUTE = "aws:ec2/route:Route"
ROUTE_TABLE = "aws:ec2/routeTable:RouteTable"
ASSOCIATION = "aws:ec2/routeTableAssociation:RouteTableAssociation"
IGW = "aws:ec2/internetGateway:InternetGateway"
NAT = "aws:ec2/natGateway:NatGateway"
SG = "aws:ec2/securityGroup:SecurityGroup"
EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
SG_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/0000-net"
SERVICES = ["model-runner", "catalog-api"]


def _network(
    offline: Callable[..., OfflineRun],
    opts: dict[str, Any] | None = None,
    stack: str = "dev",
    **kwargs: Any,
) -> OfflineRun:
    args = {
        "cidr_block": "10.40.0.0/16",
        "service_names": SERVICES,
        "flow_log_kms_key_arn": KEY_ARN,
        **kwargs,
    }

    def program() -> dict[str, Any]:
        net = Network("net", NetworkArgs(**args), opts=pulumi.ResourceOptions(**(opts or {})))
        return {
            "vpc_id": net.vpc_id,
            "vpc_cidr": net.vpc_cidr,
            "azs": net.availability_zones,
            "public": net.public_subnet_ids,
            "private": net.private_subnet_ids,
            "sgs": net.service_security_group_ids,
            "nat_count": net.nat_gateway_count,
            "flow_log_group": net.flow_log_group_name,
        }

    return offline(program, stack=stack)


def _subnets(run: OfflineRun, key: str) -> list[Declared]:
    subnets = [run.by_id(i) for i in run.outputs[key]]
    assert all(s is not None and s.type == SUBNET for s in subnets)
    return [s for s in subnets if s is not None]


def _routes_of_subnet(run: OfflineRun, subnet: Declared) -> list[Declared]:
    (association,) = [a for a in run.of_type(ASSOCIATION) if a.inputs["subnetId"] == subnet.outputs["id"]]
    table_id = association.inputs["routeTableId"]
    return [r for r in run.of_type(ROUTE) if r.inputs["routeTableId"] == table_id]


def test_spans_requested_availability_zones(offline: Callable[..., OfflineRun]) -> None:
    run = _network(offline, az_count=3)
    assert run.outputs["azs"] == ["us-east-1a", "us-east-1b", "us-east-1c"]
    for key in ("public", "private"):
        zones = [s.inputs["availabilityZone"] for s in _subnets(run, key)]
        assert sorted(zones) == ["us-east-1a", "us-east-1b", "us-east-1c"]


def test_fewer_than_two_zones_is_rejected() -> None:
    with pytest.raises(ValueError, match="set az_count to 2 or more"):
        NetworkArgs(az_count=1)


def test_subnets_are_disjoint_and_inside_the_vpc() -> None:
    vpc = ipaddress.IPv4Network("10.40.0.0/20")
    public, private = subnet_cidrs(str(vpc), 3)
    blocks = [ipaddress.IPv4Network(c) for c in public + private]
    assert len(blocks) == 6 and all(b.subnet_of(vpc) for b in blocks)
    assert all(not a.overlaps(b) for i, a in enumerate(blocks) for b in blocks[i + 1 :])


def test_private_subnets_have_no_route_to_the_internet_gateway(offline: Callable[..., OfflineRun]) -> None:
    run = _network(offline)
    (igw,) = run.of_type(IGW)
    nat_ids = {n.outputs["id"] for n in run.of_type(NAT)}
    for subnet in _subnets(run, "private"):
        routes = _routes_of_subnet(run, subnet)
        assert all(r.inputs.get("gatewayId") != igw.outputs["id"] for r in routes)
        # Egress goes through NAT instead (and the check above is not vacuous: the table has routes).
        default = [r for r in routes if r.inputs["destinationCidrBlock"] == "0.0.0.0/0"]
        assert len(default) == 1 and default[0].inputs["natGatewayId"] in nat_ids
    # Public subnets do route to the IGW, so a wiring slip that swapped the tables would be caught.
    for subnet in _subnets(run, "public"):
        assert any(r.inputs.get("gatewayId") == igw.outputs["id"] for r in _routes_of_subnet(run, subnet))


def test_no_subnet_maps_public_ips(offline: Callable[..., OfflineRun]) -> None:
    run = _network(offline)
    subnets = run.of_type(SUBNET)
    assert len(subnets) == 4
    assert all(s.inputs.get("mapPublicIpOnLaunch") is False for s in subnets)


def test_one_nat_in_dev(offline: Callable[..., OfflineRun]) -> None:
    run = _network(offline, az_count=3, nat_per_az=False)
    assert len(run.of_type(NAT)) == 1
    assert run.outputs["nat_count"] == 1
    (nat,) = run.of_type(NAT)
    assert nat.inputs["subnetId"] in run.outputs["public"]


def test_one_nat_per_az_each_serving_its_own_zone(offline: Callable[..., OfflineRun]) -> None:
    run = _network(offline, az_count=3, nat_per_az=True)
    nats = {n.outputs["id"]: n for n in run.of_type(NAT)}
    assert len(nats) == 3 and run.outputs["nat_count"] == 3
    for subnet in _subnets(run, "private"):
        (default,) = [
            r for r in _routes_of_subnet(run, subnet) if r.inputs["destinationCidrBlock"] == "0.0.0.0/0"
        ]
        nat_subnet = run.by_id(nats[default.inputs["natGatewayId"]].inputs["subnetId"])
        assert nat_subnet is not None
        assert nat_subnet.inputs["availabilityZone"] == subnet.inputs["availabilityZone"]


def test_s3_gateway_endpoint_on_private_route_tables(offline: Callable[..., OfflineRun]) -> None:
    run = _network(offline)
    (endpoint,) = run.of_type("aws:ec2/vpcEndpoint:VpcEndpoint")
    assert endpoint.inputs["vpcEndpointType"] == "Gateway"
    assert endpoint.inputs["serviceName"] == "com.amazonaws.us-east-1.s3"
    private_tables = {
        a.inputs["routeTableId"]
        for a in run.of_type(ASSOCIATION)
        if a.inputs["subnetId"] in run.outputs["private"]
    }
    assert len(private_tables) == 2
    assert set(endpoint.inputs["routeTableIds"]) == private_tables


def test_flow_logs_record_all_traffic_to_an_encrypted_group(offline: Callable[..., OfflineRun]) -> None:
    run = _network(offline, flow_log_retention_days=365)
    (flow_log,) = run.of_type("aws:ec2/flowLog:FlowLog")
    assert flow_log.inputs["vpcId"] == run.outputs["vpc_id"]
    assert flow_log.inputs["trafficType"] == "ALL"
    group = run.named("aws:cloudwatch/logGroup:LogGroup", "net-flow-logs")
    assert flow_log.inputs["logDestination"] == group.outputs["arn"]
    assert group.inputs["name"] == run.outputs["flow_log_group"] == "/tessera/dev/net/vpc-flow-logs"
    assert group.inputs["retentionInDays"] == 365
    assert group.inputs["kmsKeyId"] == KEY_ARN

    role = run.named("aws:iam/role:Role", "net-flow-logs-role")
    assert flow_log.inputs["iamRoleArn"] == role.outputs["arn"]
    trust = json.loads(role.inputs["assumeRolePolicy"])["Statement"]
    assert [s["Principal"] for s in trust] == [{"Service": "vpc-flow-logs.amazonaws.com"}]
    assert trust[0]["Condition"]["StringEquals"] == {"aws:SourceAccount": "123456789012"}
    (policy,) = run.of_type("aws:iam/rolePolicy:RolePolicy")
    assert policy.inputs["role"] == role.outputs["name"]
    resources = [r for s in json.loads(policy.inputs["policy"])["Statement"] for r in s["Resource"]]
    assert resources and all(r.startswith(group.outputs["arn"]) for r in resources)


@pytest.mark.parametrize(
    "cidr",
    [
        "8.8.0.0/16",
        "100.64.0.0/16",
        "10.0.0.0/8",
        "10.0.0.0/15",
        "10.0.0.0/25",
        "10.0.0.1/16",
        "fd00::/56",
        "x",
    ],
)
def test_invalid_cidr_is_rejected_naming_the_setting(cidr: str) -> None:
    with pytest.raises(ValueError, match=r"NetworkArgs\.cidr_block=.*set cidr_block"):
        NetworkArgs(cidr_block=cidr)


@pytest.mark.parametrize("cidr", ["10.0.0.0/16", "172.20.0.0/20", "192.168.10.0/24"])
def test_private_cidrs_from_16_to_24_are_accepted(cidr: str) -> None:
    assert NetworkArgs(cidr_block=cidr).cidr_block == cidr


def test_service_security_groups_allow_no_ingress(offline: Callable[..., OfflineRun]) -> None:
    run = _network(offline)
    sg_ids = run.outputs["sgs"]
    assert set(sg_ids) == set(SERVICES)
    for sg_id in sg_ids.values():
        group = run.by_id(sg_id)
        assert group is not None and group.type == SG
        assert not group.inputs.get("ingress")
        assert group.inputs["vpcId"] == run.outputs["vpc_id"]
    assert not [r for r in run.of_type(INGRESS) if r.inputs["securityGroupId"] in sg_ids.values()]
    assert not [r for r in run.of_type(SG_RULE) if r.inputs["securityGroupId"] in sg_ids.values()]


def test_service_security_groups_egress_https_and_postgres_in_vpc(offline: Callable[..., OfflineRun]) -> None:
    run = _network(offline)
    for sg_id in run.outputs["sgs"].values():
        rules = {
            (r.inputs["fromPort"], r.inputs["toPort"], r.inputs["cidrIpv4"])
            for r in run.of_type(EGRESS)
            if r.inputs["securityGroupId"] == sg_id
        }
        assert rules == {(443, 443, "0.0.0.0/0"), (5432, 5432, "10.40.0.0/16")}


def test_default_security_group_is_locked_down(offline: Callable[..., OfflineRun]) -> None:
    run = _network(offline)
    (default,) = run.of_type("aws:ec2/defaultSecurityGroup:DefaultSecurityGroup")
    assert default.inputs["vpcId"] == run.outputs["vpc_id"]
    assert not default.inputs.get("ingress") and not default.inputs.get("egress")


def test_protect_reaches_every_child(offline: Callable[..., OfflineRun]) -> None:
    run = _network(offline, opts={"protect": True})
    children = [r for r in run.resources if r.type != "tessera:infra:Network"]
    assert len(children) > 20
    assert all(r.protect for r in children)


def test_flow_log_group_carries_the_stack_so_stacks_share_an_account(
    offline: Callable[..., OfflineRun],
) -> None:
    # Log group names are unique per account and region: prod-data beside dev must not collide.
    names = {
        stack: _network(offline, stack=stack).outputs["flow_log_group"] for stack in ("dev", "prod-data")
    }
    assert names == {
        "dev": "/tessera/dev/net/vpc-flow-logs",
        "prod-data": "/tessera/prod-data/net/vpc-flow-logs",
    }
