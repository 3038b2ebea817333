"""The platform's PostgreSQL: private, encrypted, TLS-only, reachable only from named service groups.

Besides the RDS instance (:class:`Database`), this file holds the one privileged client of the database,
:class:`DatabaseBootstrap`: a Lambda function in the VPC, invoked by every `pulumi up` whose database users or
image changed. It alone reads the master secret; it creates one IAM-authenticated login per service, applies
the migrations and grants each service exactly the tables it needs. Services log in as their own user with
an IAM token (``rds-db:connect`` on that user only) and never see the master password.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_aws as aws
from pulumi import Input, Output

from infra.encryption import partition_of
from infra.iam import trust_policy
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
            aws.vpc.SecurityGroupIngressRule(
                f"{name}-from-{peer}",
                security_group_id=self.security_group.id,
                referenced_security_group_id=group_id,
                ip_protocol="tcp",
                from_port=POSTGRES_PORT,
                to_port=POSTGRES_PORT,
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


#: The environment variable that names the master secret; only the bootstrap function gets it.
MASTER_SECRET_ENV = "TESSERA_DB_MASTER_SECRET_ARN"
#: The handler inside the bootstrap image (services/cloud/database_roles.py).
BOOTSTRAP_HANDLER = "services.cloud.database_roles.handler"


@dataclass
class DatabaseBootstrapArgs:
    """Settings of the privileged one-shot that creates the service users and applies the migrations."""

    function_name: str
    """Name of the Lambda function (named, so the image repository can admit exactly this function)."""
    image_uri: Input[str]
    """The bootstrap's container image (``repo@sha256:...`` or ``repo:tag``) in this account's ECR."""
    repository_name: Input[str]
    """The ECR repository holding the image; Lambda may pull from it for this function only."""
    region: str
    """The stack's AWS region."""
    account_id: Input[str]
    """The AWS account (scopes the function's network-interface permissions)."""
    subnet_ids: Input[Sequence[Input[str]]]
    """Private subnets the function runs in (it reaches the database inside the VPC)."""
    security_group_id: Input[str]
    """The function's own security group, admitted by the database's."""
    host: Input[str]
    """The database's address."""
    port: Input[int]
    """The database's port."""
    master_secret_arn: Input[str]
    """The secret RDS keeps the master password in; this function is the only reader."""
    kms_key_arn: Input[str]
    """The key the secret is encrypted with."""
    log_group_name: Input[str]
    """The log group the function writes to."""
    log_group_arn: Input[str]
    """Its ARN (without ``:*``)."""
    users: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    """The service users and their grants, ``{"user", "writes", "reads"}`` each: the invocation's input."""
    db_name: str = "tessera"
    """The database to bootstrap."""
    timeout_s: int = 300
    """Longest a run may take (migrations included)."""

    def __post_init__(self) -> None:
        if not 30 <= self.timeout_s <= 900:
            raise ValueError(
                f"DatabaseBootstrapArgs.timeout_s={self.timeout_s}; set timeout_s to 30..900 seconds "
                "(Lambda's limit)"
            )
        for user in self.users:
            if set(user) - {"user", "writes", "reads"} or "user" not in user:
                raise ValueError(
                    f"DatabaseBootstrapArgs.users has {dict(user)!r}; give each user as "
                    '{"user": NAME, "writes": [SCHEMA, ...], "reads": [SCHEMA, ...]}'
                )


def bootstrap_policy(
    *, region: str, account_id: str, secret_arn: str, kms_key_arn: str, log_group_arn: str
) -> dict[str, Any]:
    """The bootstrap function's permissions: read the master secret, run in the VPC, write its logs."""
    partition = partition_of(region)
    ec2 = f"arn:{partition}:ec2:{region}:{account_id}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ReadMasterSecret",
                "Effect": "Allow",
                "Action": ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"],
                "Resource": secret_arn,
            },
            {
                "Sid": "DecryptMasterSecret",
                "Effect": "Allow",
                "Action": ["kms:Decrypt"],
                "Resource": kms_key_arn,
            },
            {
                # What Lambda does on the function's behalf to place it in the VPC.
                "Sid": "VpcNetworkInterfaces",
                "Effect": "Allow",
                "Action": [
                    "ec2:CreateNetworkInterface",
                    "ec2:DeleteNetworkInterface",
                    "ec2:AssignPrivateIpAddresses",
                    "ec2:UnassignPrivateIpAddresses",
                ],
                "Resource": [f"{ec2}:network-interface/*", f"{ec2}:subnet/*", f"{ec2}:security-group/*"],
            },
            {
                # Describe calls have no resource-level permissions.
                "Sid": "DescribeNetwork",
                "Effect": "Allow",
                "Action": ["ec2:DescribeNetworkInterfaces", "ec2:DescribeSubnets"],
                "Resource": "*",
            },
            {
                "Sid": "WriteOwnLogs",
                "Effect": "Allow",
                "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                "Resource": f"{log_group_arn}:*",
            },
        ],
    }


def users_digest(users: Sequence[Mapping[str, Any]]) -> str:
    """A short hash of the users and grants, so a change to them re-runs the bootstrap."""
    return hashlib.sha256(json.dumps(list(users), sort_keys=True, default=list).encode()).hexdigest()[:16]


class DatabaseBootstrap(pulumi.ComponentResource):
    """A Lambda function (container image, in the VPC) that alone holds the master password: it creates one
    IAM-authenticated login per service, applies every migration and grants each service its tables; it runs
    once per `pulumi up` whose users, grants or image (and so migrations) changed."""

    function_name: pulumi.Output[str]
    function_arn: pulumi.Output[str]
    role_arn: pulumi.Output[str]
    result: pulumi.Output[str]

    def __init__(
        self, name: str, args: DatabaseBootstrapArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("tessera:infra:DatabaseBootstrap", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        partition = partition_of(args.region)
        self.role = aws.iam.Role(
            f"{name}-role",
            description=f"tessera {name}: the only reader of the database master secret",
            assume_role_policy=json.dumps(trust_policy("lambda.amazonaws.com")),
            force_detach_policies=True,
            opts=child,
        )
        self.policy_json = Output.all(
            args.account_id, args.master_secret_arn, args.kms_key_arn, args.log_group_arn
        ).apply(
            lambda v: json.dumps(
                bootstrap_policy(
                    region=args.region,
                    account_id=v[0],
                    secret_arn=v[1],
                    kms_key_arn=v[2],
                    log_group_arn=v[3],
                )
            )
        )
        self.policy = aws.iam.RolePolicy(
            f"{name}-policy", role=self.role.name, policy=self.policy_json, opts=child
        )

        function_arn = Output.concat(
            f"arn:{partition}:lambda:{args.region}:", args.account_id, f":function:{args.function_name}"
        )
        # Lambda pulls the image with its own service principal: admit it, for this one function only.
        self.repository_policy = aws.ecr.RepositoryPolicy(
            f"{name}-pull",
            repository=args.repository_name,
            policy=Output.json_dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Sid": "LambdaPullsBootstrapImage",
                            "Effect": "Allow",
                            "Principal": {"Service": "lambda.amazonaws.com"},
                            "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
                            "Condition": {"StringEquals": {"aws:sourceArn": function_arn}},
                        }
                    ],
                }
            ),
            opts=child,
        )
        self.function = aws.lambda_.Function(
            f"{name}-fn",
            name=args.function_name,
            description="tessera database bootstrap: service users, migrations, grants (master secret)",
            package_type="Image",
            image_uri=args.image_uri,
            image_config=aws.lambda_.FunctionImageConfigArgs(commands=[BOOTSTRAP_HANDLER]),
            architectures=["x86_64"],  # the registry builds linux/amd64
            role=self.role.arn,
            timeout=args.timeout_s,
            memory_size=512,
            vpc_config=aws.lambda_.FunctionVpcConfigArgs(
                subnet_ids=args.subnet_ids, security_group_ids=[args.security_group_id]
            ),
            environment=aws.lambda_.FunctionEnvironmentArgs(
                variables={
                    "TESSERA_DB_HOST": args.host,
                    "TESSERA_DB_PORT": Output.from_input(args.port).apply(str),
                    "TESSERA_DB_NAME": args.db_name,
                    MASTER_SECRET_ENV: args.master_secret_arn,
                }
            ),
            logging_config=aws.lambda_.FunctionLoggingConfigArgs(
                log_format="Text", log_group=args.log_group_name
            ),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.policy, self.repository_policy]),
        )
        users = [dict(u) for u in args.users]
        self.invocation = aws.lambda_.Invocation(
            f"{name}-run",
            function_name=self.function.name,
            input=json.dumps({"users": users}, sort_keys=True),
            # A new image carries new migrations (and bootstrap code): run again.
            triggers={"image": args.image_uri, "users": users_digest(users)},
            opts=child,
        )

        self.function_name = self.function.name
        self.function_arn = self.function.arn
        self.role_arn = self.role.arn
        self.result = self.invocation.result
        self.register_outputs(
            {
                "function_name": self.function_name,
                "function_arn": self.function_arn,
                "role_arn": self.role_arn,
            }
        )
