"""The data layer: everything that holds data or outlives compute (VPC, KMS key, buckets, queues, database
and its bootstrap, log groups, ECR and images). Its ``outputs`` are all the compute layer
(``stacks/program.py``) reads of it, directly in one stack or through a ``StackReference`` across two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.database import (
    Database,
    DatabaseArgs,
    bootstrap_function_name,
    database_identifier,
)
from infra.database_bootstrap import DatabaseBootstrap, DatabaseBootstrapArgs
from infra.encryption import Encryption, EncryptionArgs
from infra.logs import ServiceLogs, ServiceLogsArgs
from infra.network import Network, NetworkArgs
from infra.notifications import QueueNotifications, QueueNotificationsArgs, QueueRoute
from infra.queues import Queues, QueuesArgs
from infra.registry import Registry, RegistryArgs
from infra.storage import Storage, StorageArgs
from infra.trainer_images import (
    TRAINER,
    available_variants,
    missing_variant_message,
    registry_variants,
    trainer_image_refs,
    trainer_variant,
    variants_to_build,
)
from services.cloud.events import NOTIFICATIONS
from stacks.services import (
    DATABASE_BOOTSTRAP,
    SERVICE_NAMES,
    SERVICES,
    database_users,
)
from stacks.settings import ConfigError, Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
GRAFANA = "grafana"
#: The safety-net function that stops idle training instances (its code: services/autostop/).
AUTOSTOP = "autostop"


class DataLayer(pulumi.ComponentResource):
    """Everything that holds data or outlives compute. ``outputs`` are what the compute layer reads."""

    def __init__(self, name: str, settings: Settings, opts: pulumi.ResourceOptions | None = None):
        super().__init__("tessera:stacks:DataLayer", name, None, opts)
        s = settings
        child = pulumi.ResourceOptions(parent=self)
        account_id = aws.get_caller_identity_output(opts=pulumi.InvokeOutputOptions(parent=self)).account_id

        self.encryption = Encryption(
            f"{name}-kms", EncryptionArgs(region=s.region, account_id=account_id), child
        )
        key = self.encryption.key_arn
        self.network = Network(
            f"{name}-net",
            NetworkArgs(
                cidr_block=s.vpc_cidr,
                az_count=s.az_count,
                nat_per_az=s.nat_per_az,
                flow_log_retention_days=s.log_retention_days,
                flow_log_kms_key_arn=key,
                # The database bootstrap gets a group of its own, like a service: the database admits it.
                service_names=(*SERVICE_NAMES, DATABASE_BOOTSTRAP),
            ),
            child,
        )
        self.storage = Storage(f"{name}-s3", StorageArgs(kms_key_arn=key, force_destroy=s.throwaway), child)
        self.queues = Queues(
            f"{name}-sqs", QueuesArgs(max_receive_count=s.queue_max_receive_count, kms_key_arn=key), child
        )
        # Buckets notify queues of the objects created under a prefix (the routes: services/cloud/events.py,
        # which the embedded default wires too). Both ends live here, in the data layer.
        self.notifications = QueueNotifications(
            f"{name}-events",
            QueueNotificationsArgs(
                account_id=account_id,
                routes=[
                    QueueRoute(
                        id=route.id,
                        bucket=route.bucket,
                        bucket_name=self.storage.bucket_names[route.bucket],
                        bucket_arn=self.storage.bucket_arns[route.bucket],
                        queue=route.queue,
                        queue_url=self.queues.urls[route.queue],
                        queue_arn=self.queues.arns[route.queue],
                        prefix=route.prefix,
                        events=route.events,
                    )
                    for route in NOTIFICATIONS
                ],
            ),
            child,
        )
        sgs = self.network.service_security_group_ids
        self.database = Database(
            f"{name}-db",
            DatabaseArgs(
                vpc_id=self.network.vpc_id,
                subnet_ids=self.network.private_subnet_ids,
                client_security_group_ids={
                    **{svc.name: sgs[svc.name] for svc in SERVICES if svc.database},
                    DATABASE_BOOTSTRAP: sgs[DATABASE_BOOTSTRAP],
                },
                kms_key_arn=key,
                identifier=database_identifier(name, s.stack),
                instance_class=s.db_instance_class,
                allocated_storage_gb=s.db_allocated_storage_gb,
                max_allocated_storage_gb=s.db_max_allocated_storage_gb,
                log_retention_days=s.log_retention_days,
                backup_retention_days=s.db_backup_retention_days,
                multi_az=s.db_multi_az,
                deletion_protection=s.protect_data,
            ),
            child,
        )
        self.logs = ServiceLogs(
            f"{name}-logs",
            ServiceLogsArgs(
                prefix=s.stack,
                services=(*SERVICE_NAMES, GRAFANA, AUTOSTOP, DATABASE_BOOTSTRAP),
                retention_days=s.log_retention_days,
                kms_key_arn=key,
            ),
            child,
        )
        # Only the trainer variants a compute layer runs (the Gaudi image alone is several GB): the training
        # type's own where this stack holds compute too, else tessera:trainerVariants; pinned digests count.
        training = s.training_instance_type if s.has_compute else None
        try:
            built = variants_to_build(s.trainer_variants, training)
            needed = trainer_variant(training) if training and s.training_enabled else None
        except ValueError as error:  # a Neuron training type, or an unknown variant
            raise ConfigError(str(error)) from error
        self.trainer_variants = available = available_variants(built, s.image_refs)
        if training and needed and needed not in available:  # this stack's own training box needs it
            raise ConfigError(missing_variant_message(needed, training, available))
        trainer_variants, variants_only = registry_variants(self.trainer_variants)
        self.registry = Registry(
            f"{name}-ecr",
            RegistryArgs(
                services=(*SERVICE_NAMES, DATABASE_BOOTSTRAP),
                # Read here to hash the inputs; pulumi-docker gets paths relative to the project directory.
                context_dir=str(REPO_ROOT),
                variants=trainer_variants,
                variants_only=variants_only,
                pinned_refs=s.image_refs,
                kms_key_arn=key,
                build=s.build_images,
                force_delete=s.throwaway,
            ),
            child,
        )
        # The only holder of the master secret: service users, migrations and grants, run by `pulumi up`.
        self.database_bootstrap = DatabaseBootstrap(
            f"{name}-db-bootstrap",
            DatabaseBootstrapArgs(
                function_name=bootstrap_function_name(name, s.stack),
                image_uri=self.registry.image_refs[DATABASE_BOOTSTRAP],
                repository_name=self.registry.repository_names[DATABASE_BOOTSTRAP],
                region=s.region,
                account_id=account_id,
                subnet_ids=self.network.private_subnet_ids,
                security_group_id=sgs[DATABASE_BOOTSTRAP],
                host=self.database.address,
                port=self.database.port,
                master_secret_arn=self.database.secret_arn,
                kms_key_arn=key,
                log_group_name=self.logs.group_names[DATABASE_BOOTSTRAP],
                log_group_arn=self.logs.group_arns[DATABASE_BOOTSTRAP],
                users=database_users(),
            ),
            child,
        )
        net, db = self.network, self.database
        trainer_refs = trainer_image_refs(self.registry.image_refs, self.trainer_variants)
        # The trainer's entry: its first variant (the training box reads trainerImageRefs by accelerator).
        service_refs = {**self.registry.image_refs, TRAINER: trainer_refs[self.trainer_variants[0]]}
        self.outputs: dict[str, Any] = {
            "vpcId": net.vpc_id,
            "vpcCidr": net.vpc_cidr,
            "publicSubnetIds": net.public_subnet_ids,
            "privateSubnetIds": net.private_subnet_ids,
            "serviceSecurityGroupIds": net.service_security_group_ids,
            "kmsKeyArn": key,
            "bucketNames": self.storage.bucket_names,
            "bucketArns": self.storage.bucket_arns,
            "queueUrls": self.queues.urls,
            "queueArns": self.queues.arns,
            "queueNames": self.queues.names,
            "deadLetterQueueUrls": self.queues.dlq_urls,
            "databaseEndpoint": db.endpoint,
            "databaseAddress": db.address,
            "databasePort": db.port,
            "databaseSecretArn": db.secret_arn,
            "databaseResourceId": db.resource_id,
            "databaseUserArnPrefix": db.user_arn_prefix,
            "databaseBootstrapFunctionName": self.database_bootstrap.function_name,
            "logGroupNames": self.logs.group_names,
            "logGroupArns": self.logs.group_arns,
            "repositoryUrls": self.registry.repository_urls,
            "repositoryArns": self.registry.repository_arns,
            # What the compute layer runs: the service images (the bootstrap's runs here, in the data layer).
            "imageRefs": {svc: service_refs[svc] for svc in SERVICE_NAMES},
            # The trainer per accelerator (infra/trainer_images.py): the training instance runs one of them.
            "trainerImageRefs": trainer_refs,
        }
        self.register_outputs(self.outputs)
