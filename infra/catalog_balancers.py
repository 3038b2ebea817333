"""The sight catalog's load balancers: what both share (the API's target group and the way to it) and the
opt-in public one (:class:`CatalogPublicEndpoint`), with the checks of its three settings.

The public endpoint is the one exception to "nothing reachable from the internet but the jump host's SSH":
with a certificate (ACM, in the stack's region) and a domain, an internet-facing load balancer in the public
subnets answers HTTPS on 443 only (no HTTP listener at all), from the configured CIDRs only, with a TLS 1.2+
policy (:data:`TLS_POLICY`) and HSTS; requests for any other host name get a 404. The catalog itself, and
its internal load balancer, is ``infra/catalog.py``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
from pulumi import Input

from infra.instances import cidr_block

APP_PORT = 8080
"""The port the API listens on in its container, published on the same host port."""
HEALTH_PATH = "/health"
"""What the load balancers ask each API instance; anything but 200 takes it out of service."""
HTTPS_PORT = 443
"""The public load balancer's one listener."""
TLS_POLICY = "ELBSecurityPolicy-TLS13-1-2-Res-2021-06"
"""The public listener's security policy: TLS 1.3 and 1.2 only, forward-secret AEAD ciphers only."""
HSTS = "max-age=31536000"
"""Strict-Transport-Security the public listener adds to every response (a year; no subdomains)."""

CERTIFICATE_SETTING = "tessera:catalogCertificateArn"
DOMAIN_SETTING = "tessera:catalogDomain"
PUBLIC_CIDRS_SETTING = "tessera:catalogPublicCidrs"

_CERTIFICATE_ARN = re.compile(r"^arn:aws[a-z-]*:acm:([a-z0-9-]+):\d{12}:certificate/[0-9a-f-]{36}$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


def validate_public_cidrs(cidrs: Sequence[str]) -> list[str]:
    """The IPv4 networks allowed to reach the public listener, checked: at least one, each a CIDR block.

    ``0.0.0.0/0`` is accepted when written: a public site is what this listener is for, and it is opt-in.
    """
    if isinstance(cidrs, str) or not cidrs:
        raise ValueError(
            f"{PUBLIC_CIDRS_SETTING} must list the networks allowed to reach the catalog's public HTTPS "
            'listener, e.g. ["198.51.100.0/24"] (or ["0.0.0.0/0"] for everyone, on purpose)'
        )
    checked: list[str] = []
    for cidr in cidrs:
        network = cidr_block(cidr, PUBLIC_CIDRS_SETTING, "198.51.100.0/24")
        if network.version != 4:
            raise ValueError(
                f"{PUBLIC_CIDRS_SETTING}: {cidr!r} is IPv6; the load balancer has IPv4 addresses only"
            )
        checked.append(str(network))
    return checked


def validate_domain(domain: str) -> str:
    """The host name the public listener answers for, lower-cased and checked (no wildcard, no scheme)."""
    name = domain.strip().lower().rstrip(".")
    if not _DOMAIN.match(name):
        raise ValueError(
            f"{DOMAIN_SETTING}: {domain!r} is not a host name; write the name people open, e.g. "
            "catalog.example.org (no scheme, no path, no wildcard)"
        )
    return name


def validate_certificate_arn(arn: str, region: str) -> str:
    """An ACM certificate ARN in ``region`` (a load balancer uses certificates of its own region only)."""
    found = _CERTIFICATE_ARN.match(arn.strip())
    if not found:
        raise ValueError(
            f"{CERTIFICATE_SETTING}: {arn!r} is not an ACM certificate ARN "
            "(arn:aws:acm:<region>:<account>:certificate/<id>); request or import one in ACM first"
        )
    if found.group(1) != region:
        raise ValueError(
            f"{CERTIFICATE_SETTING}: the certificate is in {found.group(1)}, the stack in {region}; a load "
            f"balancer takes certificates of its own region only: request one in {region}"
        )
    return arn.strip()


@dataclass
class CatalogPublicArgs:
    """The optional public HTTPS listener: present only when a certificate and a domain are configured."""

    certificate_arn: str
    """ACM certificate for ``domain`` in the stack's region (``tessera:catalogCertificateArn``)."""
    domain: str
    """The host name people open (``tessera:catalogDomain``); requests for other names get a 404."""
    allowed_cidrs: Sequence[str]
    """IPv4 networks that may reach tcp 443 (``tessera:catalogPublicCidrs``): required, no default."""
    subnet_ids: Input[Sequence[Input[str]]]
    """Public subnets, in at least two zones, for the internet-facing load balancer."""


def api_target_group(name: str, vpc_id: Input[str], opts: pulumi.ResourceOptions) -> aws.lb.TargetGroup:
    """A target group of API instances on :data:`APP_PORT`, healthy while ``GET /health`` answers 200."""
    return aws.lb.TargetGroup(
        name,
        vpc_id=vpc_id,
        target_type="instance",
        protocol="HTTP",
        port=APP_PORT,
        # In-flight requests get this long to finish when an instance leaves (scale-in, instance refresh).
        deregistration_delay=30,
        health_check=aws.lb.TargetGroupHealthCheckArgs(
            enabled=True,
            protocol="HTTP",
            port="traffic-port",
            path=HEALTH_PATH,
            matcher="200",
            interval=15,
            timeout=5,
            healthy_threshold=2,
            unhealthy_threshold=3,
        ),
        opts=opts,
    )


def allow_egress_to_api(
    name: str, security_group_id: Input[str], target_group_id: Input[str], opts: pulumi.ResourceOptions
) -> aws.vpc.SecurityGroupEgressRule:
    """Let a load balancer's group reach the API instances' app group on :data:`APP_PORT` and nothing else."""
    return aws.vpc.SecurityGroupEgressRule(
        name,
        security_group_id=security_group_id,
        ip_protocol="tcp",
        from_port=APP_PORT,
        to_port=APP_PORT,
        referenced_security_group_id=target_group_id,
        description="the catalog API instances (requests and health checks)",
        opts=opts,
    )


class CatalogPublicEndpoint(pulumi.ComponentResource):
    """The opt-in internet-facing HTTPS listener of the catalog: 443 only, from the configured CIDRs only."""

    url: pulumi.Output[str]
    alb_dns_name: pulumi.Output[str]
    security_group_id: pulumi.Output[str]
    target_group_arn: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        args: CatalogPublicArgs,
        vpc_id: Input[str],
        app_security_group_id: Input[str],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("tessera:infra:CatalogPublicEndpoint", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.security_group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            description=f"tessera sight catalog {name}: HTTPS from the configured CIDRs only",
            vpc_id=vpc_id,
            opts=child,
        )
        for index, cidr in enumerate(args.allowed_cidrs):
            aws.vpc.SecurityGroupIngressRule(
                f"{name}-https-{index}",
                security_group_id=self.security_group.id,
                ip_protocol="tcp",
                from_port=HTTPS_PORT,
                to_port=HTTPS_PORT,
                cidr_ipv4=cidr,
                description="HTTPS from a configured network (tessera:catalogPublicCidrs)",
                opts=child,
            )
        allow_egress_to_api(f"{name}-to-api", self.security_group.id, app_security_group_id, child)

        self.load_balancer = aws.lb.LoadBalancer(
            f"{name}-alb",
            load_balancer_type="application",
            internal=False,
            subnets=args.subnet_ids,
            security_groups=[self.security_group.id],
            drop_invalid_header_fields=True,
            opts=child,
        )
        self.target_group = api_target_group(f"{name}-tg", vpc_id, child)
        # HTTPS only: no HTTP listener to redirect from, so port 80 is neither listened on nor admitted.
        self.listener = aws.lb.Listener(
            f"{name}-https",
            load_balancer_arn=self.load_balancer.arn,
            port=HTTPS_PORT,
            protocol="HTTPS",
            ssl_policy=TLS_POLICY,
            certificate_arn=args.certificate_arn,
            routing_http_response_strict_transport_security_header_value=HSTS,
            # Scanners that come by address or another name get nothing of the catalog.
            default_actions=[
                aws.lb.ListenerDefaultActionArgs(
                    type="fixed-response",
                    fixed_response=aws.lb.ListenerDefaultActionFixedResponseArgs(
                        content_type="text/plain", status_code="404", message_body="not found"
                    ),
                )
            ],
            opts=child,
        )
        self.host_rule = aws.lb.ListenerRule(
            f"{name}-host",
            listener_arn=self.listener.arn,
            priority=10,
            conditions=[
                aws.lb.ListenerRuleConditionArgs(
                    host_header=aws.lb.ListenerRuleConditionHostHeaderArgs(values=[args.domain])
                )
            ],
            actions=[aws.lb.ListenerRuleActionArgs(type="forward", target_group_arn=self.target_group.arn)],
            opts=child,
        )

        self.url = pulumi.Output.from_input(f"https://{args.domain}")
        self.alb_dns_name = self.load_balancer.dns_name
        self.security_group_id = self.security_group.id
        self.target_group_arn = self.target_group.arn
        self.register_outputs(
            {
                "url": self.url,
                "alb_dns_name": self.alb_dns_name,
                "security_group_id": self.security_group_id,
                "target_group_arn": self.target_group_arn,
            }
        )
