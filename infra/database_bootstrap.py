"""The one privileged client of the database (:class:`DatabaseBootstrap`): a Lambda function in the VPC,
invoked by every `pulumi up` whose database users or image changed.

It alone reads the master secret; it creates one IAM-authenticated login per service, applies the migrations
and grants each service exactly the tables it needs. Services log in as their own user with an IAM token
(``rds-db:connect`` on that user only) and never see the master password. The database itself is
``infra/database.py``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_aws as aws
from pulumi import Input, Output

from infra.encryption import partition_of
from infra.iam import trust_policy

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
