"""S3 buckets by purpose: private, KMS-encrypted, TLS-only, versioned where the data is precious."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_aws as aws

_PURPOSE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


@dataclass(frozen=True)
class BucketSpec:
    """One bucket: what it holds and how long its objects live."""

    purpose: str
    """Key of the bucket in the outputs and part of its name (lowercase letters, digits, hyphens)."""
    versioned: bool = True
    """Keep every version of every object (protects against overwrites and deletes)."""
    noncurrent_version_expiry_days: int | None = 90
    """Days an overwritten or deleted version is kept before it is removed; None keeps them forever."""
    intelligent_tiering_after_days: int | None = None
    """Move current objects to INTELLIGENT_TIERING after this many days (large, rarely re-read data)."""
    expire_after_days: int | None = None
    """Delete current objects after this many days (logs); None keeps them."""
    abort_multipart_after_days: int = 7
    """Abort multipart uploads left incomplete this many days, so their parts stop costing money."""

    def __post_init__(self) -> None:
        if not _PURPOSE.match(self.purpose):
            raise ValueError(
                f"BucketSpec.purpose={self.purpose!r} cannot be part of a bucket name; set purpose to "
                "at most 31 lowercase letters, digits and hyphens"
            )
        for knob in (
            "noncurrent_version_expiry_days",
            "intelligent_tiering_after_days",
            "expire_after_days",
            "abort_multipart_after_days",
        ):
            value = getattr(self, knob)
            if value is not None and value < (0 if knob == "intelligent_tiering_after_days" else 1):
                raise ValueError(
                    f"BucketSpec({self.purpose!r}).{knob}={value}; set it to a positive number of days"
                )


DEFAULT_BUCKETS: tuple[BucketSpec, ...] = (
    # Source rasters are huge and read once or twice: tier them early.
    BucketSpec(
        "imagery", versioned=True, noncurrent_version_expiry_days=30, intelligent_tiering_after_days=30
    ),
    BucketSpec(
        "results", versioned=True, noncurrent_version_expiry_days=30, intelligent_tiering_after_days=30
    ),
    # The model registry: every exported model is kept; replaced versions stay long enough to roll back.
    BucketSpec("models", versioned=True, noncurrent_version_expiry_days=180),
    BucketSpec(
        "datasets", versioned=True, noncurrent_version_expiry_days=90, intelligent_tiering_after_days=30
    ),
    # Logs are write-once and worth little after a while.
    BucketSpec(
        "logs",
        versioned=False,
        noncurrent_version_expiry_days=None,
        expire_after_days=365,
        abort_multipart_after_days=1,
    ),
)


@dataclass
class StorageArgs:
    """The platform's buckets."""

    kms_key_arn: pulumi.Input[str]
    """KMS key every bucket encrypts with by default (SSE-KMS, bucket key on)."""
    force_destroy: bool = False
    """Let a destroy delete non-empty buckets; only for throw-away stacks."""
    buckets: Sequence[BucketSpec] = field(default_factory=lambda: DEFAULT_BUCKETS)
    """One bucket per spec, keyed by purpose."""

    def __post_init__(self) -> None:
        purposes = [b.purpose for b in self.buckets]
        if len(set(purposes)) != len(purposes):
            raise ValueError(
                f"StorageArgs.buckets has a purpose twice: {purposes}; give every bucket its own purpose"
            )


def bucket_policy(bucket_arn: str) -> dict[str, Any]:
    """Deny plain HTTP, TLS older than 1.2, and uploads that ask for an encryption other than SSE-KMS."""
    everything = [bucket_arn, f"{bucket_arn}/*"]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "DenyInsecureTransport",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": everything,
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            },
            {
                "Sid": "DenyOutdatedTls",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": everything,
                "Condition": {"NumericLessThan": {"s3:TlsVersion": "1.2"}},
            },
            {
                # Without the header an upload gets the bucket default (the KMS key); another one is refused.
                "Sid": "DenyUploadsWithOtherEncryption",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:PutObject",
                "Resource": f"{bucket_arn}/*",
                "Condition": {
                    "StringNotEquals": {"s3:x-amz-server-side-encryption": "aws:kms"},
                    "Null": {"s3:x-amz-server-side-encryption": "false"},
                },
            },
        ],
    }


def lifecycle_rules(spec: BucketSpec) -> list[aws.s3.BucketLifecycleConfigurationRuleArgs]:
    """The lifecycle rules a spec asks for (there is always at least the multipart clean-up)."""
    every_object = aws.s3.BucketLifecycleConfigurationRuleFilterArgs()
    rules = [
        aws.s3.BucketLifecycleConfigurationRuleArgs(
            id="abort-incomplete-multipart-uploads",
            status="Enabled",
            filter=every_object,
            abort_incomplete_multipart_upload=aws.s3.BucketLifecycleConfigurationRuleAbortIncompleteMultipartUploadArgs(
                days_after_initiation=spec.abort_multipart_after_days
            ),
        )
    ]
    if spec.versioned and spec.noncurrent_version_expiry_days is not None:
        rules.append(
            aws.s3.BucketLifecycleConfigurationRuleArgs(
                id="expire-noncurrent-versions",
                status="Enabled",
                filter=every_object,
                noncurrent_version_expiration=aws.s3.BucketLifecycleConfigurationRuleNoncurrentVersionExpirationArgs(
                    noncurrent_days=spec.noncurrent_version_expiry_days
                ),
            )
        )
    if spec.intelligent_tiering_after_days is not None:
        rules.append(
            aws.s3.BucketLifecycleConfigurationRuleArgs(
                id="intelligent-tiering",
                status="Enabled",
                filter=every_object,
                transitions=[
                    aws.s3.BucketLifecycleConfigurationRuleTransitionArgs(
                        storage_class="INTELLIGENT_TIERING", days=spec.intelligent_tiering_after_days
                    )
                ],
            )
        )
    if spec.expire_after_days is not None:
        rules.append(
            aws.s3.BucketLifecycleConfigurationRuleArgs(
                id="expire-current-objects",
                status="Enabled",
                filter=every_object,
                expiration=aws.s3.BucketLifecycleConfigurationRuleExpirationArgs(days=spec.expire_after_days),
            )
        )
    return rules


class Storage(pulumi.ComponentResource):
    """One private, encrypted, TLS-only bucket per :class:`BucketSpec`."""

    bucket_names: dict[str, pulumi.Output[str]]
    bucket_arns: dict[str, pulumi.Output[str]]

    def __init__(self, name: str, args: StorageArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tessera:infra:Storage", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.buckets: dict[str, aws.s3.Bucket] = {}
        for spec in args.buckets:
            base = f"{name}-{spec.purpose}"
            bucket = aws.s3.Bucket(base, force_destroy=args.force_destroy, opts=child)
            access_block = aws.s3.BucketPublicAccessBlock(
                f"{base}-public-access",
                bucket=bucket.id,
                block_public_acls=True,
                block_public_policy=True,
                ignore_public_acls=True,
                restrict_public_buckets=True,
                opts=child,
            )
            # ACLs off: the bucket's policy alone decides who reads what.
            aws.s3.BucketOwnershipControls(
                f"{base}-ownership",
                bucket=bucket.id,
                rule=aws.s3.BucketOwnershipControlsRuleArgs(object_ownership="BucketOwnerEnforced"),
                opts=child,
            )
            aws.s3.BucketServerSideEncryptionConfiguration(
                f"{base}-encryption",
                bucket=bucket.id,
                rules=[
                    aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
                        apply_server_side_encryption_by_default=aws.s3.BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                            sse_algorithm="aws:kms", kms_master_key_id=args.kms_key_arn
                        ),
                        # One data key per bucket instead of one KMS call per object: far fewer KMS requests.
                        bucket_key_enabled=True,
                    )
                ],
                opts=child,
            )
            aws.s3.BucketPolicy(
                f"{base}-policy",
                bucket=bucket.id,
                policy=bucket.arn.apply(lambda arn: json.dumps(bucket_policy(arn))),
                # S3 rejects concurrent changes to a bucket's policy and its public access block.
                opts=pulumi.ResourceOptions(parent=self, depends_on=[access_block]),
            )
            versioning = None
            if spec.versioned:
                versioning = aws.s3.BucketVersioning(
                    f"{base}-versioning",
                    bucket=bucket.id,
                    versioning_configuration=aws.s3.BucketVersioningVersioningConfigurationArgs(
                        status="Enabled"
                    ),
                    opts=child,
                )
            aws.s3.BucketLifecycleConfiguration(
                f"{base}-lifecycle",
                bucket=bucket.id,
                rules=lifecycle_rules(spec),
                # Noncurrent-version rules only make sense once versioning is on.
                opts=pulumi.ResourceOptions(parent=self, depends_on=[versioning] if versioning else []),
            )
            self.buckets[spec.purpose] = bucket

        self.bucket_names = {p: b.bucket for p, b in self.buckets.items()}
        self.bucket_arns = {p: b.arn for p, b in self.buckets.items()}
        self.register_outputs({"bucket_names": self.bucket_names, "bucket_arns": self.bucket_arns})
