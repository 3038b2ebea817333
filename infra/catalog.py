"""The sight catalog on the platform: its API behind an internal load balancer, its refresher beside it.

Where it runs. Both halves run on Auto Scaling groups made by :class:`~infra.gpu_fleet.WorkerFleet`, the
mechanism every other service already runs on (the CPU fleets of the sky generator and the FITS classifier
included), not on ECS/Fargate: one launch template and boot script to operate, the same image pull (ECR with
the instance role, by digest, so a new image rolls the group), IMDSv2 with hop limit 2, an encrypted root
volume, the awslogs driver into the service's log group and the CloudWatch agent, and the audit and graph
checks that already hold fleets to all of that. Fargate would add a cluster, task definitions and a second
(execution) role per service for no saving: a t3.small (2 vCPU burstable, 2 GiB) costs $0.0208/h, a Fargate
task of 1 vCPU and 2 GB $0.049/h (us-east-1).

- **API** (``tessera sights serve``): a group of ``min_size`` to ``max_size`` instances, scaled on average
  CPU, each publishing :data:`APP_PORT` and registered in the load balancers' target groups; the group
  replaces an instance whose ``GET /health`` fails (ELB health checks).
- **Refresher** (``tessera worker sight-catalog``): a group of exactly one instance. It must be a singleton
  (two refreshers would refresh the same data marts and send the same training jobs twice), which a second
  container on each API instance would not be once the API scales out.

Who reaches what. The internal load balancer (scheme internal, private subnets) admits tcp
:data:`LISTENER_PORT` from the jump host's security group only: people open it through an SSH tunnel
(:meth:`Catalog.tunnel_command`, ``tessera tunnel catalog``). The API instances carry the service's own
egress-only group (the one the database admits) and an app group that admits :data:`APP_PORT` from the load
balancers' groups only. The refresher serves nothing and carries the service group alone.

The one opt-in exception to "nothing reachable from the internet but the jump host's SSH":
:class:`CatalogPublicArgs`. With a certificate (ACM, in the stack's region) and a domain, a second,
internet-facing load balancer in the public subnets answers HTTPS on 443 only, from the configured CIDRs
only, with TLS 1.2+ and HSTS (``infra/catalog_balancers.py``, with what both load balancers share); requests
for any other host name get a 404. Point the domain's DNS at ``public_alb_dns_name`` (a CNAME or a Route 53
alias).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws
from pulumi import Input

from infra.catalog_balancers import (
    APP_PORT,
    CatalogPublicArgs,
    CatalogPublicEndpoint,
    allow_egress_to_api,
    api_target_group,
    validate_certificate_arn,
    validate_domain,
    validate_public_cidrs,
)
from infra.gpu_fleet import WorkerFleet, WorkerFleetArgs
from infra.instances import allow_tcp_from_group

SERVICE = "sight-catalog"
"""The service whose image, role, log group and security group the catalog runs with."""
LISTENER_PORT = 80
"""The internal load balancer's HTTP listener: the far end of the SSH tunnel."""
API_COMMAND = ("sights", "serve", "--host", "0.0.0.0", "--port", str(APP_PORT))
"""Arguments after the image's ``tessera`` entrypoint for the API (every interface of its container: the
instance's security groups decide who reaches the published port)."""
REFRESHER_COMMAND = ("worker", SERVICE)
"""Arguments after the image's ``tessera`` entrypoint for the refresher."""
CPU_TARGET_PERCENT = 60.0
"""Average CPU the API group's target tracking keeps its instances near."""


@dataclass
class CatalogArgs:
    """Settings of the sight catalog: where its load balancer and instances go, and what they run."""

    vpc_id: Input[str]
    """The VPC of the load balancers, target groups and security groups."""
    subnet_ids: Input[Sequence[Input[str]]]
    """Private subnets, in at least two zones, for the internal load balancer (and, by default, instances)."""
    jump_host_security_group_id: Input[str]
    """The only source allowed to reach the internal load balancer (the SSH tunnel's far end)."""
    service_security_group_id: Input[str]
    """The service's own egress-only group, the one the database admits; every catalog instance has it."""
    image_ref: Input[str]
    """The catalog image, a digest reference (``Registry.image_refs[SERVICE]``)."""
    instance_profile_name: Input[str]
    """Instance profile of the service's role: both halves run with the service's least-privilege role."""
    region: str
    """AWS region (ECR login, the log driver, the container's AWS_REGION; the certificate's region)."""
    environment: Mapping[str, Input[str]] = field(default_factory=dict)
    """Environment of both containers (the service's queues, buckets and database); no secret values."""
    instance_subnet_ids: Input[Sequence[Input[str]]] | None = None
    """Private subnets for the API instances (those whose zone offers ``instance_type``); None: subnet_ids."""
    refresher_subnet_ids: Input[Sequence[Input[str]]] | None = None
    """Private subnets for the refresher (whose zone offers ``refresher_instance_type``); None: subnet_ids."""
    instance_type: str = "t3.small"
    """EC2 instance type of the API instances (x86_64, CPU)."""
    min_size: int = 1
    """Fewest API instances; at least one, since the API is always on."""
    max_size: int = 2
    """Most API instances (average CPU scales between the two)."""
    refresher_instance_type: str = "t3.small"
    """EC2 instance type of the refresher's one instance."""
    root_volume_gb: int = 30
    """Encrypted gp3 root volume of each instance: the OS and the one image (no scratch data)."""
    log_group_name: Input[str] | None = None
    """The service's CloudWatch log group (both halves write to it, one stream per instance)."""
    agent_config_json: Input[str] | None = None
    """CloudWatch agent configuration for every instance; None runs no agent."""
    ami_id: str | None = None
    """A pinned AMI; None takes the newest Amazon Linux 2023."""
    public: CatalogPublicArgs | None = None
    """The optional public HTTPS listener; None keeps the catalog reachable through the jump host only."""
    role_name: Input[str] | None = None
    """The service role's name: it gets read and first-write access to the API token's secret. None makes
    no token secret (the API then binds loopback only and cannot serve the load balancer)."""
    kms_key_arn: Input[str] | None = None
    """KMS key (ARN) of the API token's secret; None uses the AWS managed key."""
    secret_recovery_window_days: int = 7
    """Days a deleted token secret can still be restored (0 deletes at once)."""
    rekognition_models: Mapping[str, str] = field(default_factory=dict)
    """City slug -> Rekognition Custom Labels model version ARN the refresher may label with (needs
    ``role_name``); empty: no Rekognition access at all."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(
                f"the catalog's API needs 1 <= min_size <= max_size, got {self.min_size}..{self.max_size}"
            )
        if self.public is not None:
            self.public.allowed_cidrs = validate_public_cidrs(self.public.allowed_cidrs)
            self.public.domain = validate_domain(self.public.domain)
            self.public.certificate_arn = validate_certificate_arn(self.public.certificate_arn, self.region)


class Catalog(pulumi.ComponentResource):
    """The sight catalog: its API on a fleet behind an internal load balancer, its refresher alone."""

    alb_dns_name: pulumi.Output[str]
    alb_security_group_id: pulumi.Output[str]
    app_security_group_id: pulumi.Output[str]
    api_group_name: pulumi.Output[str]
    refresher_group_name: pulumi.Output[str]
    url: pulumi.Output[str]
    public_url: pulumi.Output[str] | None
    """``https://<domain>`` when the public listener is configured, else None."""
    public_alb_dns_name: pulumi.Output[str] | None
    """Where the domain's DNS record must point when the public listener is configured, else None."""

    def __init__(self, name: str, args: CatalogArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tessera:infra:Catalog", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        self.alb_security_group = aws.ec2.SecurityGroup(
            f"{name}-alb-sg",
            description=f"tessera sight catalog {name}: internal load balancer, from the jump host only",
            vpc_id=args.vpc_id,
            opts=child,
        )
        self.app_security_group = aws.ec2.SecurityGroup(
            f"{name}-app-sg",
            description=f"tessera sight catalog {name}: the API port, from the catalog's load balancers only",
            vpc_id=args.vpc_id,
            opts=child,
        )
        allow_tcp_from_group(
            f"{name}-http-from-jump",
            self.alb_security_group.id,
            port=LISTENER_PORT,
            source_security_group_id=args.jump_host_security_group_id,
            description="the catalog from the jump host (SSH tunnel)",
            opts=child,
        )
        allow_egress_to_api(
            f"{name}-alb-to-api", self.alb_security_group.id, self.app_security_group.id, child
        )
        allow_tcp_from_group(
            f"{name}-api-from-alb",
            self.app_security_group.id,
            port=APP_PORT,
            source_security_group_id=self.alb_security_group.id,
            description="the catalog API from its internal load balancer",
            opts=child,
        )

        self.load_balancer = aws.lb.LoadBalancer(
            f"{name}-alb",
            load_balancer_type="application",
            internal=True,
            subnets=args.subnet_ids,
            security_groups=[self.alb_security_group.id],
            drop_invalid_header_fields=True,
            opts=child,
        )
        self.target_group = api_target_group(f"{name}-tg", args.vpc_id, child)
        self.listener = aws.lb.Listener(
            f"{name}-http",
            load_balancer_arn=self.load_balancer.arn,
            port=LISTENER_PORT,
            protocol="HTTP",
            default_actions=[
                aws.lb.ListenerDefaultActionArgs(type="forward", target_group_arn=self.target_group.arn)
            ],
            opts=child,
        )

        self.public: CatalogPublicEndpoint | None = None
        target_groups: list[Input[str]] = [self.target_group.arn]
        if args.public is not None:
            self.public = CatalogPublicEndpoint(
                f"{name}-pub", args.public, args.vpc_id, self.app_security_group.id, child
            )
            allow_tcp_from_group(
                f"{name}-api-from-public-alb",
                self.app_security_group.id,
                port=APP_PORT,
                source_security_group_id=self.public.security_group_id,
                description="the catalog API from its public load balancer",
                opts=child,
            )
            target_groups.append(self.public.target_group_arn)

        # The API's bearer token: an empty secret here; the first API instance stores a fresh token in it
        # (services/sight_catalog/api.py), so the token never passes through Pulumi or its state. Clients
        # read it with `aws secretsmanager get-secret-value --secret-id <catalogTokenSecretArn>`.
        api_environment: dict[str, Input[str]] = {
            **args.environment,
            # Only the load balancers reach the app port (its security group), so their X-Forwarded-For is
            # trusted: the rate limits then count clients, not the load balancer.
            "FORWARDED_ALLOW_IPS": "*",
        }
        self.token_secret_arn: pulumi.Output[str] | None = None
        if args.role_name is not None:
            token = aws.secretsmanager.Secret(
                f"{name}-api-token",
                description="tessera sight catalog: the API's bearer token (made by the first API instance)",
                kms_key_id=args.kms_key_arn,
                recovery_window_in_days=args.secret_recovery_window_days,
                opts=child,
            )
            aws.iam.RolePolicy(
                f"{name}-api-token-access",
                role=args.role_name,
                policy=token.arn.apply(
                    lambda arn: json.dumps(
                        {
                            "Version": "2012-10-17",
                            "Statement": [
                                {
                                    "Sid": "CatalogApiToken",
                                    "Effect": "Allow",
                                    "Action": [
                                        "secretsmanager:GetSecretValue",
                                        "secretsmanager:PutSecretValue",
                                    ],
                                    "Resource": arn,
                                }
                            ],
                        }
                    )
                ),
                opts=child,
            )
            self.token_secret_arn = token.arn
            api_environment["TESSERA_CATALOG_TOKEN_SECRET_ARN"] = token.arn
        api = WorkerFleetArgs(
            service=SERVICE,
            image_ref=args.image_ref,
            subnet_ids=args.instance_subnet_ids or args.subnet_ids,
            security_group_id=args.service_security_group_id,
            instance_profile_name=args.instance_profile_name,
            region=args.region,
            instance_type=args.instance_type,
            gpu=False,
            ami_id=args.ami_id,
            min_size=args.min_size,
            max_size=args.max_size,
            root_volume_gb=args.root_volume_gb,
            environment=api_environment,
            command=list(API_COMMAND),
            log_group_name=args.log_group_name,
            agent_config_json=args.agent_config_json,
            extra_tags={"tessera:role": "api"},
            extra_security_group_ids=[self.app_security_group.id],
            published_ports=[APP_PORT],
            target_group_arns=target_groups,
        )
        self.api = WorkerFleet(f"{name}-api", api, child)
        self.cpu_policy: aws.autoscaling.Policy | None = None
        if args.max_size > args.min_size:
            tt = aws.autoscaling
            self.cpu_policy = aws.autoscaling.Policy(
                f"{name}-api-cpu",
                autoscaling_group_name=self.api.group_name,
                policy_type="TargetTrackingScaling",
                target_tracking_configuration=tt.PolicyTargetTrackingConfigurationArgs(
                    target_value=CPU_TARGET_PERCENT,
                    predefined_metric_specification=(
                        tt.PolicyTargetTrackingConfigurationPredefinedMetricSpecificationArgs(
                            predefined_metric_type="ASGAverageCPUUtilization"
                        )
                    ),
                ),
                opts=child,
            )
        # The same image, role and groups; nothing the API serves with.
        refresher = dataclasses.replace(
            api,
            subnet_ids=args.refresher_subnet_ids or args.subnet_ids,
            instance_type=args.refresher_instance_type,
            min_size=1,
            max_size=1,
            command=list(REFRESHER_COMMAND),
            environment=args.environment,  # not the API's token nor its proxy trust
            extra_tags={"Name": f"tessera-{SERVICE}-refresher", "tessera:role": "refresher"},
            extra_security_group_ids=(),
            published_ports=(),
            target_group_arns=(),
            # The image's HEALTHCHECK probes the API's port, which the refresher does not serve.
            container_healthcheck=False,
        )
        if args.rekognition_models and args.role_name is not None:
            # The external labeller: DetectCustomLabels on exactly the configured models, nothing else.
            aws.iam.RolePolicy(
                f"{name}-rekognition",
                role=args.role_name,
                policy=json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Sid": "LabelWithTheCitiesModels",
                                "Effect": "Allow",
                                "Action": ["rekognition:DetectCustomLabels"],
                                "Resource": sorted(args.rekognition_models.values()),
                            }
                        ],
                    }
                ),
                opts=child,
            )
            refresher = dataclasses.replace(
                refresher,
                environment={
                    **args.environment,
                    "TESSERA_REKOGNITION_PROJECT_VERSIONS": json.dumps(
                        dict(sorted(args.rekognition_models.items()))
                    ),
                },
            )
        self.refresher = WorkerFleet(f"{name}-refresher", refresher, child)

        self.alb_dns_name = self.load_balancer.dns_name
        self.alb_security_group_id = self.alb_security_group.id
        self.app_security_group_id = self.app_security_group.id
        self.api_group_name = self.api.group_name
        self.refresher_group_name = self.refresher.group_name
        self.url = pulumi.Output.from_input(f"http://localhost:{APP_PORT}")
        self.public_url = self.public.url if self.public else None
        self.public_alb_dns_name = self.public.alb_dns_name if self.public else None
        self.register_outputs(
            {
                "alb_dns_name": self.alb_dns_name,
                "alb_security_group_id": self.alb_security_group_id,
                "app_security_group_id": self.app_security_group_id,
                "api_group_name": self.api_group_name,
                "refresher_group_name": self.refresher_group_name,
                "url": self.url,
                "public_url": self.public_url,
                "public_alb_dns_name": self.public_alb_dns_name,
            }
        )

    def tunnel_command(
        self,
        jump_public_ip: Input[str],
        ssh_user: Input[str] = "ec2-user",
        local_port: int = APP_PORT,
    ) -> pulumi.Output[str]:
        """The SSH command that forwards ``localhost:<local_port>`` to the internal load balancer through the
        jump host (which resolves the load balancer's DNS name inside the VPC)."""
        return pulumi.Output.concat(
            f"ssh -N -o ExitOnForwardFailure=yes -L {local_port}:",
            self.alb_dns_name,
            f":{LISTENER_PORT} ",
            ssh_user,
            "@",
            jump_public_ip,
        )
