"""The VPC: public subnets for the NAT gateways, the jump host and (when configured) the sight catalog's
public load balancer; private subnets for everything else; flow logs; one egress-only security group per
service."""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

from infra.encryption import partition_of
from infra.logs import check_retention

# RFC 1918 private address space: a VPC outside it could collide with public addresses it must reach.
PRIVATE_RANGES = tuple(ipaddress.IPv4Network(c) for c in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_SERVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_SMALLEST_SUBNET_PREFIX = 28  # AWS refuses subnets smaller than /28


def subnet_cidrs(vpc_cidr: str, az_count: int) -> tuple[list[str], list[str]]:
    """Carve ``az_count`` private and ``az_count`` public subnets of equal size out of ``vpc_cidr``.

    Private subnets come first (lowest addresses), public ones after them. Returns (public, private).
    """
    network = ipaddress.ip_network(vpc_cidr)
    new_prefix = network.prefixlen + math.ceil(math.log2(2 * az_count))
    if new_prefix > _SMALLEST_SUBNET_PREFIX:
        raise ValueError(
            f"NetworkArgs.cidr_block={vpc_cidr} is too small for {2 * az_count} subnets ({az_count} AZs "
            f"x public and private, each at least /{_SMALLEST_SUBNET_PREFIX}); set cidr_block to a "
            "larger block (a smaller prefix length) or lower az_count"
        )
    blocks = [str(s) for s in network.subnets(new_prefix=new_prefix)]
    return blocks[az_count : 2 * az_count], blocks[:az_count]


def check_vpc_cidr(cidr: str) -> ipaddress.IPv4Network:
    """Raise ValueError naming ``NetworkArgs.cidr_block`` unless ``cidr`` is RFC 1918, /16 to /24."""
    try:
        network = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise ValueError(
            f"NetworkArgs.cidr_block={cidr!r} is not a network address ({exc}); set cidr_block to an "
            "RFC 1918 block such as 10.40.0.0/16"
        ) from None
    if not isinstance(network, ipaddress.IPv4Network) or not any(
        network.subnet_of(r) for r in PRIVATE_RANGES
    ):
        raise ValueError(
            f"NetworkArgs.cidr_block={cidr} is not private (RFC 1918) address space; set cidr_block inside "
            "10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16, e.g. 10.40.0.0/16"
        )
    if not 16 <= network.prefixlen <= 24:
        raise ValueError(
            f"NetworkArgs.cidr_block={cidr} has prefix /{network.prefixlen}; set cidr_block to a block "
            "from /16 to /24 (AWS allows no larger VPC block, and smaller ones leave no room for subnets)"
        )
    return network


@dataclass
class NetworkArgs:
    """Shape of the VPC."""

    cidr_block: str = "10.40.0.0/16"
    """VPC address block: RFC 1918, prefix /16 to /24; subnets are carved from it."""
    az_count: int = 2
    """Availability zones to span (at least 2, so one zone's failure leaves the rest running)."""
    nat_per_az: bool = False
    """One NAT gateway per AZ (production: survives a zone outage) or one shared NAT (dev: cheaper)."""
    service_names: Sequence[str] = field(default_factory=tuple)
    """One egress-only security group per name; other components use them as the database's peers."""
    flow_log_retention_days: int = 90
    """Days the VPC flow logs are kept (a value CloudWatch Logs accepts)."""
    flow_log_kms_key_arn: pulumi.Input[str] | None = None
    """KMS key that encrypts the flow-log group; its policy must let CloudWatch Logs use it."""

    def __post_init__(self) -> None:
        check_vpc_cidr(self.cidr_block)
        if self.az_count < 2:
            raise ValueError(
                f"NetworkArgs.az_count={self.az_count}; set az_count to 2 or more so that the subnets, NAT "
                "and database standby can span more than one availability zone"
            )
        subnet_cidrs(self.cidr_block, self.az_count)
        check_retention("NetworkArgs.flow_log_retention_days", self.flow_log_retention_days)
        for svc in self.service_names:
            if not _SERVICE_NAME.match(svc):
                raise ValueError(
                    f"NetworkArgs.service_names has {svc!r}; set every service name to lowercase letters, "
                    "digits and hyphens"
                )
        if len(set(self.service_names)) != len(self.service_names):
            raise ValueError(f"NetworkArgs.service_names lists a name twice: {list(self.service_names)}")


def _zone_picker(index: int, wanted: int) -> Callable[[Sequence[str]], str]:
    """A function that picks zone ``index`` of the region's available zones, or says there are too few."""

    def pick(names: Sequence[str]) -> str:
        if len(names) < wanted:
            raise ValueError(
                f"NetworkArgs.az_count={wanted} but the region has only {len(names)} available zones "
                f"({list(names)}); set az_count to at most {len(names)}"
            )
        return names[index]

    return pick


def _flow_logs_trust_policy(log_group_arn: str) -> str:
    # The log group's ARN names partition, region and account: only this account's flow logs assume it.
    _, partition, _, region, account, *_ = log_group_arn.split(":")
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": "vpc-flow-logs.amazonaws.com"},
                    "Action": "sts:AssumeRole",
                    "Condition": {
                        "StringEquals": {"aws:SourceAccount": account},
                        "ArnLike": {
                            "aws:SourceArn": f"arn:{partition}:ec2:{region}:{account}:vpc-flow-log/*"
                        },
                    },
                }
            ],
        }
    )


def _flow_logs_write_policy(log_group_arn: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "WriteFlowLogsToTheirGroupOnly",
                    "Effect": "Allow",
                    "Action": ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
                    "Resource": [log_group_arn, f"{log_group_arn}:*"],
                }
            ],
        }
    )


class Network(pulumi.ComponentResource):
    """A VPC across ``az_count`` AZs: public (NAT only) and private subnets, S3 endpoint, flow logs."""

    vpc_id: pulumi.Output[str]
    vpc_cidr: pulumi.Output[str]
    availability_zones: pulumi.Output[list[str]]
    public_subnet_ids: list[pulumi.Output[str]]
    private_subnet_ids: list[pulumi.Output[str]]
    private_route_table_ids: list[pulumi.Output[str]]
    service_security_group_ids: dict[str, pulumi.Output[str]]
    nat_gateway_count: int
    flow_log_group_name: pulumi.Output[str]

    def __init__(self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tessera:infra:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        count = args.az_count
        public_cidrs, private_cidrs = subnet_cidrs(args.cidr_block, count)

        zones = aws.get_availability_zones_output(state="available", opts=pulumi.InvokeOptions(parent=self))
        zone_names = [zones.names.apply(_zone_picker(i, count)) for i in range(count)]
        self.availability_zones = pulumi.Output.all(*zone_names).apply(list)
        region = aws.get_region_output(opts=pulumi.InvokeOptions(parent=self)).region

        self.vpc = aws.ec2.Vpc(
            f"{name}-vpc",
            cidr_block=args.cidr_block,
            # Interface endpoints and RDS endpoints resolve through the VPC's DNS.
            enable_dns_support=True,
            enable_dns_hostnames=True,
            opts=child,
        )
        # Adopting the default security group strips its rules: nothing can use it to reach anything.
        self.default_security_group = aws.ec2.DefaultSecurityGroup(
            f"{name}-default-sg", vpc_id=self.vpc.id, opts=child
        )
        self.internet_gateway = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=self.vpc.id, opts=child)

        self.public_subnets: list[aws.ec2.Subnet] = []
        self.private_subnets: list[aws.ec2.Subnet] = []
        for i in range(count):
            for tier, cidrs, subnets in (
                ("public", public_cidrs, self.public_subnets),
                ("private", private_cidrs, self.private_subnets),
            ):
                subnets.append(
                    aws.ec2.Subnet(
                        f"{name}-{tier}-{i}",
                        vpc_id=self.vpc.id,
                        cidr_block=cidrs[i],
                        availability_zone=zone_names[i],
                        # Nothing gets a public address by accident; public subnets host only NAT gateways.
                        map_public_ip_on_launch=False,
                        opts=child,
                    )
                )

        self.public_route_table = aws.ec2.RouteTable(f"{name}-public-rt", vpc_id=self.vpc.id, opts=child)
        aws.ec2.Route(
            f"{name}-public-default",
            route_table_id=self.public_route_table.id,
            destination_cidr_block="0.0.0.0/0",
            gateway_id=self.internet_gateway.id,
            opts=child,
        )
        for i, subnet in enumerate(self.public_subnets):
            aws.ec2.RouteTableAssociation(
                f"{name}-public-rta-{i}",
                subnet_id=subnet.id,
                route_table_id=self.public_route_table.id,
                opts=child,
            )

        # One NAT (dev) is a single point of failure for egress; one per AZ keeps each zone independent.
        nat_count = count if args.nat_per_az else 1
        self.nat_gateways: list[aws.ec2.NatGateway] = []
        for i in range(nat_count):
            eip = aws.ec2.Eip(f"{name}-nat-eip-{i}", domain="vpc", opts=child)
            self.nat_gateways.append(
                aws.ec2.NatGateway(
                    f"{name}-nat-{i}",
                    allocation_id=eip.allocation_id,
                    subnet_id=self.public_subnets[i].id,
                    opts=pulumi.ResourceOptions(parent=self, depends_on=[self.internet_gateway]),
                )
            )
        self.nat_gateway_count = nat_count

        self.private_route_tables: list[aws.ec2.RouteTable] = []
        for i, subnet in enumerate(self.private_subnets):
            table = aws.ec2.RouteTable(f"{name}-private-rt-{i}", vpc_id=self.vpc.id, opts=child)
            aws.ec2.Route(
                f"{name}-private-default-{i}",
                route_table_id=table.id,
                destination_cidr_block="0.0.0.0/0",
                nat_gateway_id=self.nat_gateways[i if args.nat_per_az else 0].id,
                opts=child,
            )
            aws.ec2.RouteTableAssociation(
                f"{name}-private-rta-{i}", subnet_id=subnet.id, route_table_id=table.id, opts=child
            )
            self.private_route_tables.append(table)

        # S3 traffic (imagery, models) stays on the AWS network and costs no NAT data processing.
        self.s3_endpoint = aws.ec2.VpcEndpoint(
            f"{name}-s3",
            vpc_id=self.vpc.id,
            service_name=region.apply(
                lambda r: f"{'cn.com.amazonaws' if partition_of(r) == 'aws-cn' else 'com.amazonaws'}.{r}.s3"
            ),
            vpc_endpoint_type="Gateway",
            route_table_ids=[t.id for t in self.private_route_tables],
            opts=child,
        )

        self.flow_log_group = aws.cloudwatch.LogGroup(
            f"{name}-flow-logs",
            # Log group names are unique in the account and region: the stack keeps two stacks apart.
            name=f"/tessera/{pulumi.get_stack()}/{name}/vpc-flow-logs",
            retention_in_days=args.flow_log_retention_days,
            kms_key_id=args.flow_log_kms_key_arn,
            opts=child,
        )
        self.flow_log_role = aws.iam.Role(
            f"{name}-flow-logs-role",
            description=f"VPC flow logs of {name} write to their log group",
            assume_role_policy=self.flow_log_group.arn.apply(_flow_logs_trust_policy),
            opts=child,
        )
        write = aws.iam.RolePolicy(
            f"{name}-flow-logs-write",
            role=self.flow_log_role.name,
            policy=self.flow_log_group.arn.apply(_flow_logs_write_policy),
            opts=child,
        )
        self.flow_log = aws.ec2.FlowLog(
            f"{name}-flow-log",
            vpc_id=self.vpc.id,
            traffic_type="ALL",
            log_destination_type="cloud-watch-logs",
            log_destination=self.flow_log_group.arn,
            iam_role_arn=self.flow_log_role.arn,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[write]),
        )

        self.service_security_groups: dict[str, aws.ec2.SecurityGroup] = {}
        for svc in args.service_names:
            group = aws.ec2.SecurityGroup(
                f"{name}-{svc}-sg",
                description=f"{svc}: egress only (HTTPS to AWS APIs, PostgreSQL inside the VPC); no ingress",
                vpc_id=self.vpc.id,
                opts=child,
            )
            # Services reach S3, SQS, ECR and Secrets Manager over HTTPS, and the database on 5432 in the VPC.
            aws.vpc.SecurityGroupEgressRule(
                f"{name}-{svc}-https-out",
                security_group_id=group.id,
                ip_protocol="tcp",
                from_port=443,
                to_port=443,
                cidr_ipv4="0.0.0.0/0",
                description="HTTPS to AWS APIs",
                opts=child,
            )
            aws.vpc.SecurityGroupEgressRule(
                f"{name}-{svc}-postgres-out",
                security_group_id=group.id,
                ip_protocol="tcp",
                from_port=5432,
                to_port=5432,
                cidr_ipv4=self.vpc.cidr_block,
                description="PostgreSQL inside the VPC",
                opts=child,
            )
            self.service_security_groups[svc] = group

        self.vpc_id = self.vpc.id
        self.vpc_cidr = self.vpc.cidr_block
        self.public_subnet_ids = [s.id for s in self.public_subnets]
        self.private_subnet_ids = [s.id for s in self.private_subnets]
        self.private_route_table_ids = [t.id for t in self.private_route_tables]
        self.service_security_group_ids = {svc: g.id for svc, g in self.service_security_groups.items()}
        self.flow_log_group_name = self.flow_log_group.name
        self.register_outputs(
            {
                "vpc_id": self.vpc_id,
                "vpc_cidr": self.vpc_cidr,
                "availability_zones": self.availability_zones,
                "public_subnet_ids": self.public_subnet_ids,
                "private_subnet_ids": self.private_subnet_ids,
                "private_route_table_ids": self.private_route_table_ids,
                "service_security_group_ids": self.service_security_group_ids,
                "nat_gateway_count": self.nat_gateway_count,
                "flow_log_group_name": self.flow_log_group_name,
            }
        )
