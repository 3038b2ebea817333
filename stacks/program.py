"""The Pulumi program: the data layer and the compute layer, composed from the infra components.

Data (VPC, KMS key, buckets, queues, database, log groups, ECR and images) lives longer than compute (worker
fleets, the training instance, the jump host and Grafana). A stack holds one layer or both
(``tessera:layer``): ``dev`` holds everything; production splits them into ``prod-data`` and
``prod-compute`` so that ``pulumi destroy`` of the compute stack saves the GPU money and cannot touch data.
The compute layer (here) reads the data layer's outputs (``stacks/data_layer.py``) — directly in one stack,
through a ``StackReference`` across two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.autostop import AutoStop, AutoStopArgs, JobQueue
from infra.catalog import Catalog, CatalogArgs
from infra.catalog_balancers import CatalogPublicArgs
from infra.cloudwatch_agent import AGENT_ROLE_STATEMENT, agent_config_json
from infra.gpu_fleet import WorkerFleet, WorkerFleetArgs
from infra.iam import BucketGrant, ServiceAccess, ServiceRole, ServiceRoleArgs
from infra.instances import subnet_offering, subnets_offering
from infra.jump_host import JumpHost, JumpHostArgs
from infra.monitoring import Monitoring, MonitoringArgs, grafana_read_statements
from infra.trainer_images import (
    TrainerVariant,
    missing_variant_message,
    trainer_variant,
)
from infra.training import ACCELERATOR_FAMILIES, TrainingInstance, TrainingInstanceArgs, accelerator_for
from stacks.data_layer import AUTOSTOP, GRAFANA, REPO_ROOT, DataLayer
from stacks.services import (
    SERVICES,
    ServiceSpec,
    env_name,
    service,
)
from stacks.settings import CATALOG, ConfigError, Settings, read_settings

METRICS_NAMESPACES = ("tessera", "CWAgent")


@dataclass(frozen=True)
class DataView:
    """Read access to the data layer's outputs, wherever they live (same stack or a StackReference)."""

    read: Callable[[str], pulumi.Output[Any]]

    def get(self, key: str) -> pulumi.Output[Any]:
        """One output of the data layer."""
        return self.read(key)

    def item(self, key: str, member: str | int) -> pulumi.Output[Any]:
        """One member of a map or list output, e.g. ``item("queueUrls", "image-requests")``."""
        return self.read(key).apply(lambda value: value[member])

    @staticmethod
    def of_outputs(outputs: Mapping[str, Any]) -> DataView:
        """A view over the outputs of a data layer in this same stack."""
        return DataView(lambda key: pulumi.Output.from_input(outputs[key]))

    @staticmethod
    def of_stack(reference: pulumi.StackReference) -> DataView:
        """A view over another stack's outputs."""
        return DataView(reference.require_output)


def service_environment(
    spec: ServiceSpec, settings: Settings, data: DataView
) -> dict[str, pulumi.Input[str]]:
    """The container environment of one service: where its queues, buckets and database are."""
    env: dict[str, pulumi.Input[str]] = {
        "TESSERA_SERVICE": spec.name,
        "TESSERA_STACK": settings.stack,
        "AWS_REGION": settings.region,
        "AWS_DEFAULT_REGION": settings.region,
    }
    for queue in dict.fromkeys(spec.consumes + spec.sends):
        env[env_name("queue", queue) + "_URL"] = data.item("queueUrls", queue)
    for use in dict.fromkeys(b.purpose for b in spec.reads + spec.writes):
        env[env_name("bucket", use)] = data.item("bucketNames", use)
    if spec.database:
        env["TESSERA_DB_HOST"] = data.get("databaseAddress")
        env["TESSERA_DB_PORT"] = data.get("databasePort").apply(str)
        env["TESSERA_DB_NAME"] = "tessera"
        # Its own login, with an IAM token per connection; no service is given the master secret.
        env["TESSERA_DB_USER"] = spec.database.user
    return env


def service_access(spec: ServiceSpec, data: DataView) -> ServiceAccess:
    """Exactly what one service may touch, from the service table."""
    return ServiceAccess(
        consume_queue_arns=[data.item("queueArns", q) for q in spec.consumes],
        send_queue_arns=[data.item("queueArns", q) for q in spec.sends],
        read_buckets=[BucketGrant(data.item("bucketArns", b.purpose), b.prefix) for b in spec.reads],
        write_buckets=[BucketGrant(data.item("bucketArns", b.purpose), b.prefix) for b in spec.writes],
        database_user_arns=(
            [pulumi.Output.concat(data.get("databaseUserArnPrefix"), spec.database.user)]
            if spec.database
            else []
        ),
        kms_key_arns=[data.get("kmsKeyArn")],
        ecr_repository_arns=[data.item("repositoryArns", spec.name)],
        log_group_arns=[data.item("logGroupArns", spec.name)],
        metrics_namespaces=METRICS_NAMESPACES,
    )


class ComputeLayer(pulumi.ComponentResource):
    """What costs money by the hour: jump host, roles, worker fleets, the catalog, training box, Grafana."""

    def __init__(
        self, name: str, settings: Settings, data: DataView, opts: pulumi.ResourceOptions | None = None
    ):
        super().__init__("tessera:stacks:ComputeLayer", name, None, opts)
        s = settings
        child = pulumi.ResourceOptions(parent=self)
        first_private = data.item("privateSubnetIds", 0)

        self.jump_host = JumpHost(
            f"{name}-jump",
            JumpHostArgs(
                vpc_id=data.get("vpcId"),
                subnet_id=data.item("publicSubnetIds", 0),
                allowed_ssh_cidrs=s.jump_host_allowed_cidrs,
                public_key=s.jump_host_public_key,
                instance_type=s.jump_host_instance_type,
            ),
            child,
        )
        self.roles = {
            spec.name: ServiceRole(
                f"{name}-role-{spec.name}",
                ServiceRoleArgs(service=spec.name, access=_with_agent(spec, service_access(spec, data))),
                child,
            )
            for spec in SERVICES
        }

        self.fleets: dict[str, WorkerFleet] = {}
        for spec in SERVICES:
            # The catalog's fleets are its component's, behind its load balancer (below).
            if spec.runs_on != "fleet" or spec.name not in s.fleets or spec.name == CATALOG:
                continue
            fleet = s.fleets[spec.name]
            self.fleets[spec.name] = WorkerFleet(
                f"{name}-fleet-{spec.name}",
                WorkerFleetArgs(
                    service=spec.name,
                    image_ref=data.item("imageRefs", spec.name),
                    # Only subnets whose zone offers the type: the group would retry the others forever.
                    subnet_ids=subnets_offering(
                        fleet.instance_type,
                        data.get("privateSubnetIds"),
                        setting=f"tessera:fleets.{spec.name}.instanceType",
                        parent=self,
                    ),
                    security_group_id=data.item("serviceSecurityGroupIds", spec.name),
                    instance_profile_name=_profile(self.roles[spec.name]),
                    region=s.region,
                    instance_type=fleet.instance_type,
                    gpu=spec.gpu,
                    max_size=fleet.max_size,
                    queue_names=[data.item("queueNames", q) for q in spec.consumes],
                    backlog_per_instance=fleet.backlog_per_instance,
                    environment=service_environment(spec, s, data),
                    log_group_name=data.item("logGroupNames", spec.name),
                    agent_config_json=agent_config_json(gpu=spec.gpu),
                ),
                child,
            )

        self.catalog = self._catalog(name, s, data, child) if s.catalog_enabled else None

        self.training: TrainingInstance | None = None
        if s.training_enabled:
            trainer = next(spec for spec in SERVICES if spec.runs_on == "training")
            try:
                variant = trainer_variant(s.training_instance_type)
            except ValueError as error:  # a Neuron type: no trainer image for it
                raise ConfigError(str(error)) from error
            self.training = TrainingInstance(
                f"{name}-training",
                TrainingInstanceArgs(
                    vpc_id=data.get("vpcId"),
                    # Types are offered in some zones only: the first private subnet in one that does.
                    subnet_id=subnet_offering(
                        s.training_instance_type,
                        data.get("privateSubnetIds"),
                        setting="tessera:trainingInstanceType",
                        parent=self,
                    ),
                    instance_profile_name=_profile(self.roles[trainer.name]),
                    # The image built for the accelerator of its instance family (CUDA 13, CUDA 12, Gaudi).
                    image_ref=data.get("trainerImageRefs").apply(
                        lambda refs: _trainer_image(refs, variant, s.training_instance_type)
                    ),
                    region=s.region,
                    instance_type=s.training_instance_type,
                    ami_id=s.training_ami_id,
                    data_volume_gb=s.training_data_volume_gb,
                    idle_minutes=s.training_idle_minutes,
                    environment={
                        **service_environment(trainer, s, data),
                        # The trainer refuses to fall back to the CPU on a box with this accelerator.
                        "TESSERA_ACCELERATOR": accelerator_for(s.training_instance_type),
                    },
                    log_group_name=data.item("logGroupNames", trainer.name),
                    kms_key_arn=data.get("kmsKeyArn"),
                    key_name=self.jump_host.key_name,
                    ssh_source_security_group_id=self.jump_host.security_group_id,
                    # The trainer's service group: the database admits it, so the trainer reaches PostgreSQL.
                    service_security_group_ids=[data.item("serviceSecurityGroupIds", trainer.name)],
                ),
                child,
            )
            # What the box does with its role besides training (read its config, re-arm its idle alarm,
            # publish utilisation): the ARNs exist only once the instance does, after its role.
            self.training_box_policy = aws.iam.RolePolicy(
                f"{name}-training-box",
                role=self.roles[trainer.name].role_name,
                policy=pulumi.Output.json_dumps(
                    {"Version": "2012-10-17", "Statement": self.training.role_statements}
                ),
                opts=child,
            )

        training_queues = (
            next(spec for spec in SERVICES if spec.runs_on == "training").consumes if self.training else ()
        )
        # Independent of the instance's own idle agent and alarm: catches a box whose agents died.
        self.autostop = AutoStop(
            f"{name}-autostop",
            AutoStopArgs(
                code_dir=str(REPO_ROOT / "services" / AUTOSTOP),
                region=s.region,
                idle_minutes=s.training_idle_minutes,
                log_group_name=data.item("logGroupNames", AUTOSTOP),
                log_group_arn=data.item("logGroupArns", AUTOSTOP),
                # Encrypts the alerts topic its error alarm notifies (output as alertsTopicArn).
                kms_key_arn=data.get("kmsKeyArn"),
                # Whoever queues a training job (the CLI, the sight catalog), the next run starts this stack's
                # stopped training box: the trainer's queues, when the stack has the box.
                job_queues=[
                    JobQueue(url=data.item("queueUrls", queue), arn=data.item("queueArns", queue))
                    for queue in training_queues
                ],
                training_stack=s.stack,
                # The key of the box's volumes: starting it has EC2 use that key in the function's name.
                training_volume_kms_key_arn=data.get("kmsKeyArn"),
            ),
            child,
        )

        self.grafana_role = ServiceRole(
            f"{name}-role-{GRAFANA}",
            ServiceRoleArgs(
                service=GRAFANA,
                access=ServiceAccess(
                    cloudwatch_read=True,
                    kms_key_arns=[data.get("kmsKeyArn")],
                    log_group_arns=[data.item("logGroupArns", GRAFANA)],
                    # Annotations from alarm history; dimension pickers (the training dashboard lists
                    # instances by their tessera:role tag).
                    extra_statements=grafana_read_statements(
                        s.region,
                        aws.get_caller_identity_output(
                            opts=pulumi.InvokeOutputOptions(parent=self)
                        ).account_id,
                    ),
                ),
            ),
            child,
        )
        self.monitoring = Monitoring(
            f"{name}-grafana",
            MonitoringArgs(
                vpc_id=data.get("vpcId"),
                subnet_id=first_private,
                jump_host_security_group_id=self.jump_host.security_group_id,
                instance_profile_name=_profile(self.grafana_role),
                region=s.region,
                instance_type=s.grafana_instance_type,
                kms_key_arn=data.get("kmsKeyArn"),
                key_name=self.jump_host.key_name,
            ),
            child,
        )
        # The admin secret is made by the monitoring component, after the role it must be granted to; the
        # instance writes a password it generates at first boot, so Pulumi never holds it.
        self.grafana_secret_policy = aws.iam.RolePolicy(
            f"{name}-{GRAFANA}-admin-secret",
            role=self.grafana_role.role_name,
            policy=pulumi.Output.json_dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Sid": "WriteOwnAdminPassword",
                            "Effect": "Allow",
                            "Action": ["secretsmanager:PutSecretValue", "secretsmanager:DescribeSecret"],
                            "Resource": self.monitoring.admin_secret_arn,
                        }
                    ],
                }
            ),
            opts=child,
        )

        tunnel = self.monitoring.tunnel_command(self.jump_host.public_ip, ssh_user="ec2-user")
        self.outputs: dict[str, Any] = {
            "jumpHostPublicIp": self.jump_host.public_ip,
            "jumpHostSshUser": "ec2-user",
            "grafanaPrivateIp": self.monitoring.private_ip,
            "grafanaUrl": self.monitoring.url,
            "grafanaAdminSecretArn": self.monitoring.admin_secret_arn,
            "grafanaTunnelCommand": tunnel,
            "serviceRoleArns": {svc: role.role_arn for svc, role in self.roles.items()},
            "fleetGroupNames": {
                **{svc: fleet.group_name for svc, fleet in self.fleets.items()},
                **({CATALOG: self.catalog.api_group_name} if self.catalog else {}),
            },
            "autostopFunctionName": self.autostop.function_name,
            # Subscribe to be told when the auto-stop safety net fails (idle training boxes keep billing).
            "alertsTopicArn": self.autostop.alerts_topic_arn,
        }
        if self.catalog is not None:
            # The tunnel's far end; the public URL when the public listener is configured.
            self.outputs["catalogAlbDnsName"] = self.catalog.alb_dns_name
            self.outputs["catalogUrl"] = self.catalog.url
            self.outputs["catalogTunnelCommand"] = self.catalog.tunnel_command(
                self.jump_host.public_ip, ssh_user="ec2-user"
            )
            self.outputs["catalogRefresherGroupName"] = self.catalog.refresher_group_name
            if self.catalog.token_secret_arn is not None:
                # Where the API's bearer token is (the first API instance stores it).
                self.outputs["catalogTokenSecretArn"] = self.catalog.token_secret_arn
            if self.catalog.public_url is not None:
                self.outputs["catalogPublicUrl"] = self.catalog.public_url
                self.outputs["catalogPublicAlbDnsName"] = self.catalog.public_alb_dns_name
        if self.training is not None:
            self.outputs["trainingInstanceId"] = self.training.instance_id
            self.outputs["trainingIdleAlarm"] = self.training.idle_alarm_name
            self.outputs["trainingAccelerator"] = self.training.accelerator
        self.register_outputs(self.outputs)

    def _catalog(self, name: str, s: Settings, data: DataView, child: pulumi.ResourceOptions) -> Catalog:
        """The sight catalog: its API fleet behind the internal load balancer (and the public listener when
        configured), and its refresher; both with the service's role, group, image and environment."""
        spec, fleet, public = service(CATALOG), s.fleets[CATALOG], s.catalog_public
        private = data.get("privateSubnetIds")
        return Catalog(
            f"{name}-catalog",
            CatalogArgs(
                vpc_id=data.get("vpcId"),
                subnet_ids=private,
                # Only subnets whose zone offers each type, as for every fleet.
                instance_subnet_ids=subnets_offering(
                    fleet.instance_type,
                    private,
                    setting=f"tessera:fleets.{CATALOG}.instanceType",
                    parent=self,
                ),
                refresher_subnet_ids=subnets_offering(
                    s.catalog_refresher_instance_type,
                    private,
                    setting="tessera:catalogRefresherInstanceType",
                    parent=self,
                ),
                jump_host_security_group_id=self.jump_host.security_group_id,
                service_security_group_id=data.item("serviceSecurityGroupIds", CATALOG),
                image_ref=data.item("imageRefs", CATALOG),
                instance_profile_name=_profile(self.roles[CATALOG]),
                role_name=self.roles[CATALOG].role_name,
                kms_key_arn=data.get("kmsKeyArn"),
                rekognition_models=dict(s.catalog_rekognition_models),
                region=s.region,
                environment=service_environment(spec, s, data),
                instance_type=fleet.instance_type,
                max_size=fleet.max_size,
                refresher_instance_type=s.catalog_refresher_instance_type,
                log_group_name=data.item("logGroupNames", CATALOG),
                agent_config_json=agent_config_json(gpu=False),
                public=(
                    None
                    if public is None
                    else CatalogPublicArgs(
                        certificate_arn=public.certificate_arn,
                        domain=public.domain,
                        allowed_cidrs=public.allowed_cidrs,
                        subnet_ids=data.get("publicSubnetIds"),
                    )
                ),
            ),
            child,
        )


def _trainer_image(refs: Mapping[str, str], variant: TrainerVariant, instance_type: str) -> str:
    """The data layer's trainer image for ``variant``; a ConfigError naming both settings when it has none."""
    if variant not in refs:
        raise ConfigError(missing_variant_message(variant, instance_type, refs))
    return refs[variant]


def _with_agent(spec: ServiceSpec, access: ServiceAccess) -> ServiceAccess:
    """A fleet's instances run the CloudWatch agent under the service's role: grant what the agent reads."""
    if spec.runs_on != "fleet":
        return access
    return dataclasses.replace(access, extra_statements=[*access.extra_statements, AGENT_ROLE_STATEMENT])


def _profile(role: ServiceRole) -> pulumi.Output[str]:
    name = role.instance_profile_name
    if name is None:
        raise ValueError(f"service role {role._name} was made without an instance profile")
    return name


def provider_for(settings: Settings) -> aws.Provider:
    """The AWS provider every resource uses: the stack's region and the tags every resource inherits."""
    return aws.Provider(
        "aws",
        region=settings.region,
        default_tags=aws.ProviderDefaultTagsArgs(
            tags={
                "tessera:stack": settings.stack,
                "tessera:environment": settings.environment,
                "tessera:layer": settings.layer,
                "managed-by": "pulumi",
            }
        ),
    )


def build(settings: Settings) -> dict[str, Any]:
    """Declare the stack's resources and return its outputs."""
    provider = provider_for(settings)
    outputs: dict[str, Any] = {"stack": settings.stack, "layer": settings.layer, "region": settings.region}
    data: DataView | None = None
    if settings.has_data:
        layer = DataLayer(
            "tessera",
            settings,
            pulumi.ResourceOptions(providers=[provider], protect=settings.protect_data),
        )
        outputs.update(layer.outputs)
        data = DataView.of_outputs(layer.outputs)
    if settings.has_compute:
        if data is None:
            assert settings.data_stack is not None  # settings require it for the compute layer
            data = DataView.of_stack(pulumi.StackReference(settings.data_stack))
        compute = ComputeLayer("tessera", settings, data, pulumi.ResourceOptions(providers=[provider]))
        outputs.update(compute.outputs)
    return outputs


def settings_from_pulumi() -> Settings:
    """The running stack's settings, read from its Pulumi config (``Pulumi.<stack>.yaml``)."""

    def get(key: str) -> str | None:
        namespace, name = key.split(":", 1)
        return pulumi.Config(namespace).get(name)

    return read_settings(get, pulumi.get_stack(), accelerator_families=ACCELERATOR_FAMILIES)
