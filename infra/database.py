"""The platform's PostgreSQL: private, encrypted, TLS-only, reachable only from named service groups.

The RDS instance is :class:`Database`; the one privileged client of the database, the function that creates
the service users and applies the migrations, is ``infra/database_bootstrap.py``. This file also names both
(:func:`database_identifier`, :func:`bootstrap_function_name`), so that a stack can name them before either
exists.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
from pulumi import Output

from infra.instances import allow_tcp_from_group
from infra.logs import check_retention

POSTGRES_PORT = 5432
# RDS instance identifiers: a letter, then letters, digits and single hyphens, at most 63 characters.
_IDENTIFIER = re.compile(r"^[a-z](?!.*--)[a-z0-9-]{0,62}(?<!-)$")
_PEER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
#: What RDS exports to CloudWatch Logs; each goes to ``/aws/rds/instance/<identifier>/<export>``.
LOG_EXPORTS = ("postgresql", "upgrade")


def _bounded(text: str, limit: int) -> str:
    """``text`` when it fits in ``limit`` characters, else cut with a hash of the whole appended, so that
    two long names that share a beginning stay distinct."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:7]
    return f"{text[: limit - len(digest) - 1].rstrip('-')}-{digest}"


def _stack_slug(project: str, stack: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{project}-{stack}".lower()).strip("-")


def database_identifier(project: str, stack: str) -> str:
    """The RDS instance identifier of a stack's database, ``<project>-<stack>-db`` (lowercased, with
    characters RDS refuses turned into single hyphens, at most 63 characters), so stacks can share an
    account and region."""
    identifier = f"{_bounded(_stack_slug(project, stack), 60)}-db"
    if not _IDENTIFIER.match(identifier):
        raise ValueError(
            f"stack {stack!r} gives the RDS identifier {identifier!r}, which RDS refuses; name the stack "
            "starting with a letter"
        )
    return identifier


def bootstrap_function_name(project: str, stack: str) -> str:
    """The database bootstrap Lambda's name, ``<project>-<stack>-db-bootstrap``, within Lambda's 64."""
    return f"{_bounded(_stack_slug(project, stack), 51)}-db-bootstrap"


def log_group_names(identifier: str) -> dict[str, str]:
    """The log groups RDS writes its exports to, by export (``postgresql``, ``upgrade``)."""
    return {export: f"/aws/rds/instance/{identifier}/{export}" for export in LOG_EXPORTS}


@dataclass
class DatabaseArgs:
    """Settings of the RDS PostgreSQL instance."""

    vpc_id: pulumi.Input[str]
    """VPC the database's security group lives in."""
    subnet_ids: Sequence[pulumi.Input[str]]
    """Private subnets (two or more AZs) for the DB subnet group."""
    client_security_group_ids: Mapping[str, pulumi.Input[str]]
    """Peer name -> security group id; each gets the only ingress there is (tcp 5432)."""
    kms_key_arn: pulumi.Input[str]
    """KMS key for storage, the master password secret and Performance Insights."""
    instance_class: str = "db.t4g.micro"
    """RDS instance class."""
    engine_version: str = "17"
    """PostgreSQL version; a major alone lets RDS pick (and auto-upgrade) the minor."""
    allocated_storage_gb: int = 20
    """Initial storage."""
    max_allocated_storage_gb: int = 100
    """Ceiling for storage autoscaling (at least ``allocated_storage_gb``; equal turns autoscaling off)."""
    identifier: str | None = None
    """RDS instance identifier, unique per account and region (see :func:`database_identifier`); None uses
    the component's name. The final snapshot is ``<identifier>-final`` and the log groups carry it too."""
    log_retention_days: int = 30
    """Days the exported PostgreSQL and upgrade logs are kept (a retention CloudWatch Logs accepts)."""
    backup_retention_days: int = 7
    """Days automated backups (point-in-time recovery) are kept (1..35)."""
    multi_az: bool = False
    """A synchronous standby in another AZ (production)."""
    deletion_protection: bool = True
    """Refuse deletes; also takes a final snapshot if the instance is ever deleted."""
    db_name: str = "tessera"
    """Database created at launch."""
    master_username: str = "tessera"
    """Master user; its password is generated and kept in Secrets Manager by RDS."""
    slow_statement_ms: int = 1000
    """Statements slower than this are logged (log_min_duration_statement); -1 turns it off."""

    def __post_init__(self) -> None:
        if len(self.subnet_ids) < 2:
            raise ValueError(
                "DatabaseArgs.subnet_ids has fewer than 2 subnets; set subnet_ids to the private subnets "
                "of at least two availability zones (RDS requires it)"
            )
        if not 1 <= self.backup_retention_days <= 35:
            raise ValueError(
                f"DatabaseArgs.backup_retention_days={self.backup_retention_days}; set "
                "backup_retention_days to 1..35 (0 would turn backups off)"
            )
        if self.max_allocated_storage_gb < self.allocated_storage_gb:
            raise ValueError(
                f"DatabaseArgs.max_allocated_storage_gb={self.max_allocated_storage_gb} is below "
                f"allocated_storage_gb={self.allocated_storage_gb}; set max_allocated_storage_gb at least "
                "as high"
            )
        if self.identifier is not None and not _IDENTIFIER.match(self.identifier):
            raise ValueError(
                f"DatabaseArgs.identifier={self.identifier!r} is not an RDS instance identifier; set it to a "
                "lowercase letter followed by lowercase letters, digits and single hyphens (at most 63)"
            )
        check_retention("DatabaseArgs.log_retention_days", self.log_retention_days)
        if not re.match(r"^\d+(\.\d+)?$", self.engine_version):
            raise ValueError(
                f"DatabaseArgs.engine_version={self.engine_version!r}; set engine_version to a PostgreSQL "
                "version such as '17' or '17.5'"
            )
        for peer in self.client_security_group_ids:
            if not _PEER_NAME.match(peer):
                raise ValueError(
                    f"DatabaseArgs.client_security_group_ids has key {peer!r}; name every peer with letters, "
                    "digits and hyphens"
                )

    @property
    def parameter_group_family(self) -> str:
        """The parameter group family of the engine's major version, e.g. ``postgres17``."""
        return f"postgres{self.engine_version.split('.')[0]}"


class Database(pulumi.ComponentResource):
    """An RDS PostgreSQL instance whose only ingress is 5432 from the named peer security groups."""

    address: pulumi.Output[str]
    port: pulumi.Output[int]
    endpoint: pulumi.Output[str]
    secret_arn: pulumi.Output[str]
    security_group_id: pulumi.Output[str]
    instance_identifier: pulumi.Output[str]
    resource_id: pulumi.Output[str]
    """The instance's DbiResourceId, which IAM database authentication ARNs name."""
    user_arn_prefix: pulumi.Output[str]
    """``arn:<partition>:rds-db:<region>:<account>:dbuser:<DbiResourceId>/``; a user name appended makes the
    resource of ``rds-db:connect``."""
    log_group_arns: dict[str, pulumi.Output[str]]

    def __init__(self, name: str, args: DatabaseArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tessera:infra:Database", name, None, opts)
        identifier = args.identifier or name
        if not _IDENTIFIER.match(identifier):
            raise ValueError(
                f"Database name {name!r} cannot be an RDS instance identifier; name the component with a "
                "lowercase letter followed by lowercase letters, digits and single hyphens (at most 63)"
            )
        child = pulumi.ResourceOptions(parent=self)

        self.security_group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            description=f"{name}: PostgreSQL from the named service security groups only",
            vpc_id=args.vpc_id,
            opts=child,
        )
        for peer, group_id in args.client_security_group_ids.items():
            allow_tcp_from_group(
                f"{name}-from-{peer}",
                self.security_group.id,
                port=POSTGRES_PORT,
                source_security_group_id=group_id,
                description=f"PostgreSQL from {peer}",
                opts=child,
            )

        subnet_group = aws.rds.SubnetGroup(
            f"{name}-subnets",
            description=f"{name}: private subnets",
            subnet_ids=list(args.subnet_ids),
            opts=child,
        )
        parameters = aws.rds.ParameterGroup(
            f"{name}-params",
            family=args.parameter_group_family,
            description=f"{name}: TLS only, slow statements logged",
            parameters=[
                aws.rds.ParameterGroupParameterArgs(name="rds.force_ssl", value="1"),
                aws.rds.ParameterGroupParameterArgs(
                    name="log_min_duration_statement", value=str(args.slow_statement_ms)
                ),
            ],
            opts=child,
        )

        # RDS would create its export groups itself, unencrypted, kept forever and left behind by a destroy.
        self.log_groups = {
            export: aws.cloudwatch.LogGroup(
                f"{name}-log-{export}",
                name=group,
                retention_in_days=args.log_retention_days,
                kms_key_id=args.kms_key_arn,
                opts=child,
            )
            for export, group in log_group_names(identifier).items()
        }

        self.instance = aws.rds.Instance(
            f"{name}-postgres",
            identifier=identifier,
            engine="postgres",
            engine_version=args.engine_version,
            instance_class=args.instance_class,
            db_name=args.db_name,
            username=args.master_username,
            # RDS generates the password and keeps it in Secrets Manager: it is never in code or config.
            manage_master_user_password=True,
            master_user_secret_kms_key_id=args.kms_key_arn,
            iam_database_authentication_enabled=True,
            port=POSTGRES_PORT,
            # The provider's id of a DB subnet/parameter group is its name.
            db_subnet_group_name=subnet_group.id,
            parameter_group_name=parameters.id,
            vpc_security_group_ids=[self.security_group.id],
            publicly_accessible=False,
            multi_az=args.multi_az,
            storage_type="gp3",
            allocated_storage=args.allocated_storage_gb,
            max_allocated_storage=args.max_allocated_storage_gb,
            storage_encrypted=True,
            kms_key_id=args.kms_key_arn,
            backup_retention_period=args.backup_retention_days,
            copy_tags_to_snapshot=True,
            delete_automated_backups=False,
            deletion_protection=args.deletion_protection,
            skip_final_snapshot=not args.deletion_protection,
            final_snapshot_identifier=f"{identifier}-final" if args.deletion_protection else None,
            auto_minor_version_upgrade=True,
            performance_insights_enabled=True,
            performance_insights_kms_key_id=args.kms_key_arn,
            performance_insights_retention_period=7,
            enabled_cloudwatch_logs_exports=list(LOG_EXPORTS),
            # The groups must exist first, or RDS creates unmanaged ones of the same names.
            opts=pulumi.ResourceOptions(parent=self, depends_on=list(self.log_groups.values())),
        )

        self.address = self.instance.address
        self.port = self.instance.port
        self.endpoint = self.instance.endpoint
        self.secret_arn = self.instance.master_user_secrets.apply(_secret_arn)
        self.security_group_id = self.security_group.id
        self.instance_identifier = self.instance.identifier
        self.resource_id = self.instance.resource_id
        self.user_arn_prefix = Output.all(self.instance.arn, self.instance.resource_id).apply(
            lambda v: _user_arn_prefix(v[0], v[1])
        )
        self.log_group_arns = {export: group.arn for export, group in self.log_groups.items()}
        self.register_outputs(
            {
                "resource_id": self.resource_id,
                "user_arn_prefix": self.user_arn_prefix,
                "address": self.address,
                "port": self.port,
                "endpoint": self.endpoint,
                "secret_arn": self.secret_arn,
                "security_group_id": self.security_group_id,
                "instance_identifier": self.instance_identifier,
            }
        )


def _user_arn_prefix(instance_arn: str, resource_id: str) -> str:
    # arn:<partition>:rds:<region>:<account>:db:<identifier>
    partition, region, account = instance_arn.split(":")[1:2] + instance_arn.split(":")[3:5]
    return f"arn:{partition}:rds-db:{region}:{account}:dbuser:{resource_id}/"


def _secret_arn(secrets: Sequence[aws.rds.outputs.InstanceMasterUserSecret] | None) -> str:
    if not secrets or not secrets[0].secret_arn:
        raise ValueError("RDS returned no master user secret although manage_master_user_password is set")
    return secrets[0].secret_arn
