"""The platform's customer-managed KMS key: buckets, queues, log groups, the database and secrets use it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws


def partition_of(region: str) -> str:
    """The AWS partition of a region (ARNs and service principals differ outside the commercial one)."""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


@dataclass
class EncryptionArgs:
    """Settings of the platform KMS key."""

    region: str
    """Region the key lives in; the CloudWatch Logs service principal of this region may use it."""
    account_id: pulumi.Input[str]
    """Account that owns the key; its root administers it and only its log groups may use it."""
    deletion_window_days: int = 30
    """Days a scheduled key deletion waits (7..30; 30 leaves the longest time to undo a mistake)."""

    def __post_init__(self) -> None:
        if not 7 <= self.deletion_window_days <= 30:
            raise ValueError(
                f"EncryptionArgs.deletion_window_days={self.deletion_window_days} is outside what KMS "
                "allows; set deletion_window_days to a number of days from 7 to 30"
            )
        if not self.region:
            raise ValueError(
                "EncryptionArgs.region is empty; set region to the stack's AWS region, e.g. us-east-1"
            )


def key_policy(region: str, account_id: str) -> dict[str, Any]:
    """The key policy: the account administers the key (so IAM policies can grant its use), CloudWatch
    Logs may use it only for log groups of this account, and CloudWatch only for this account's alarms
    publishing to encrypted topics."""
    partition = partition_of(region)
    dns_suffix = "amazonaws.com.cn" if partition == "aws-cn" else "amazonaws.com"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                # Without it IAM policies could not grant the key, and the key would be unmanageable.
                "Sid": "AccountAdministersKey",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:{partition}:iam::{account_id}:root"},
                "Action": "kms:*",
                "Resource": "*",
            },
            {
                # The Logs service encrypts log groups itself; it is not an IAM principal of the account.
                "Sid": "CloudWatchLogsUseForAccountLogGroups",
                "Effect": "Allow",
                "Principal": {"Service": f"logs.{region}.{dns_suffix}"},
                "Action": [
                    "kms:Encrypt*",
                    "kms:Decrypt*",
                    "kms:ReEncrypt*",
                    "kms:GenerateDataKey*",
                    "kms:Describe*",
                ],
                "Resource": "*",
                "Condition": {
                    "ArnLike": {
                        "kms:EncryptionContext:aws:logs:arn": (
                            f"arn:{partition}:logs:{region}:{account_id}:log-group:*"
                        )
                    }
                },
            },
            {
                # Alarms notify through KMS-encrypted SNS topics (the autostop's alerts topic): CloudWatch
                # must make a data key for the message, and only for this account's alarms.
                "Sid": "CloudWatchAlarmsPublishToEncryptedTopics",
                "Effect": "Allow",
                "Principal": {"Service": f"cloudwatch.{dns_suffix}"},
                "Action": ["kms:Decrypt", "kms:GenerateDataKey*"],
                "Resource": "*",
                "Condition": {
                    "StringEquals": {"aws:SourceAccount": account_id},
                    "ArnLike": {"aws:SourceArn": f"arn:{partition}:cloudwatch:{region}:{account_id}:alarm:*"},
                },
            },
        ],
    }


class Encryption(pulumi.ComponentResource):
    """One customer-managed KMS key with yearly rotation, and its alias ``alias/tessera-<stack>-<name>``.

    The alias is unique in the account and region, so it carries the stack: dev, prod-data and prod-compute
    can share one account.
    """

    key_arn: pulumi.Output[str]
    key_id: pulumi.Output[str]
    alias_name: pulumi.Output[str]

    def __init__(self, name: str, args: EncryptionArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tessera:infra:Encryption", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        policy = pulumi.Output.from_input(args.account_id).apply(
            lambda account: json.dumps(key_policy(args.region, account))
        )
        self.key = aws.kms.Key(
            f"{name}-key",
            description=f"tessera {name}: data at rest (S3, SQS, RDS, Secrets Manager, CloudWatch Logs)",
            enable_key_rotation=True,
            deletion_window_in_days=args.deletion_window_days,
            policy=policy,
            opts=child,
        )
        self.alias = aws.kms.Alias(
            f"{name}-alias",
            name=f"alias/tessera-{pulumi.get_stack()}-{name}",
            target_key_id=self.key.key_id,
            opts=child,
        )

        self.key_arn = self.key.arn
        self.key_id = self.key.key_id
        self.alias_name = self.alias.name
        self.register_outputs({"key_arn": self.key_arn, "key_id": self.key_id, "alias_name": self.alias_name})
