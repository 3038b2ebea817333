"""Buckets: private, encrypted with the platform key, TLS-only, versioned where the data is precious."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pulumi
import pytest

from infra.storage import BucketSpec, Storage, StorageArgs
from stacks.offline import Declared, OfflineRun

BUCKET = "aws:s3/bucket:Bucket"
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/0000-storage"
PURPOSES = {"imagery", "results", "models", "datasets", "logs"}
PRECIOUS = {"imagery", "results", "models", "datasets"}


def _storage(
    offline: Callable[..., OfflineRun], opts: dict[str, Any] | None = None, **kwargs: Any
) -> OfflineRun:
    def program() -> dict[str, Any]:
        storage = Storage(
            "data", StorageArgs(kms_key_arn=KEY_ARN, **kwargs), opts=pulumi.ResourceOptions(**(opts or {}))
        )
        return {"names": storage.bucket_names, "arns": storage.bucket_arns}

    return offline(program)


@pytest.fixture
def run(offline: Callable[..., OfflineRun]) -> OfflineRun:
    return _storage(offline)


def _config(run: OfflineRun, type_token: str) -> dict[str, Declared]:
    """Bucket purpose -> the one resource of ``type_token`` attached to that bucket."""
    by_name = {name: purpose for purpose, name in run.outputs["names"].items()}
    found: dict[str, Declared] = {}
    for resource in run.of_type(type_token):
        purpose = by_name[resource.inputs["bucket"]]
        assert purpose not in found, f"two {type_token} on the {purpose} bucket"
        found[purpose] = resource
    return found


def test_one_bucket_per_purpose(run: OfflineRun) -> None:
    assert set(run.outputs["names"]) == PURPOSES
    assert len(run.of_type(BUCKET)) == len(PURPOSES)
    for purpose, arn in run.outputs["arns"].items():
        assert arn == f"arn:aws:s3:::{run.outputs['names'][purpose]}"


def test_public_access_fully_blocked(run: OfflineRun) -> None:
    blocks = _config(run, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
    assert set(blocks) == PURPOSES
    for block in blocks.values():
        for flag in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets"):
            assert block.inputs[flag] is True, flag


def test_acls_disabled(run: OfflineRun) -> None:
    controls = _config(run, "aws:s3/bucketOwnershipControls:BucketOwnershipControls")
    assert set(controls) == PURPOSES
    assert all(c.inputs["rule"] == {"objectOwnership": "BucketOwnerEnforced"} for c in controls.values())


def test_sse_kms_with_the_platform_key(run: OfflineRun) -> None:
    configs = _config(
        run, "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
    )
    assert set(configs) == PURPOSES
    for config in configs.values():
        (rule,) = config.inputs["rules"]
        assert rule["applyServerSideEncryptionByDefault"] == {
            "sseAlgorithm": "aws:kms",
            "kmsMasterKeyId": KEY_ARN,
        }
        assert rule["bucketKeyEnabled"] is True


def test_policy_denies_requests_without_tls(run: OfflineRun) -> None:
    policies = _config(run, "aws:s3/bucketPolicy:BucketPolicy")
    assert set(policies) == PURPOSES
    for purpose, policy in policies.items():
        arn = run.outputs["arns"][purpose]
        statements = json.loads(policy.inputs["policy"])["Statement"]
        tls = [s for s in statements if s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}]
        assert len(tls) == 1
        assert tls[0]["Effect"] == "Deny" and tls[0]["Principal"] == "*" and tls[0]["Action"] == "s3:*"
        assert set(tls[0]["Resource"]) == {arn, f"{arn}/*"}
        # The policy grants nothing: only denials.
        assert all(s["Effect"] == "Deny" for s in statements)


def test_policy_refuses_uploads_asking_for_other_encryption(run: OfflineRun) -> None:
    policy = _config(run, "aws:s3/bucketPolicy:BucketPolicy")["models"]
    statements = json.loads(policy.inputs["policy"])["Statement"]
    (wrong_sse,) = [s for s in statements if s["Action"] == "s3:PutObject"]
    assert wrong_sse["Effect"] == "Deny"
    assert wrong_sse["Condition"]["StringNotEquals"] == {"s3:x-amz-server-side-encryption": "aws:kms"}


def test_versioning_where_data_is_precious(run: OfflineRun) -> None:
    versioning = _config(run, "aws:s3/bucketVersioning:BucketVersioning")
    assert set(versioning) == PRECIOUS
    assert all(v.inputs["versioningConfiguration"]["status"] == "Enabled" for v in versioning.values())


def test_every_bucket_has_lifecycle_rules(run: OfflineRun) -> None:
    lifecycles = _config(run, "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration")
    assert set(lifecycles) == PURPOSES
    rules = {p: {r["id"]: r for r in lc.inputs["rules"]} for p, lc in lifecycles.items()}
    for purpose, by_id in rules.items():
        assert all(r["status"] == "Enabled" for r in by_id.values())
        abort = by_id["abort-incomplete-multipart-uploads"]["abortIncompleteMultipartUpload"]
        assert abort["daysAfterInitiation"] >= 1
        if purpose in PRECIOUS:
            assert by_id["expire-noncurrent-versions"]["noncurrentVersionExpiration"]["noncurrentDays"] >= 30
    assert rules["imagery"]["intelligent-tiering"]["transitions"] == [
        {"days": 30, "storageClass": "INTELLIGENT_TIERING"}
    ]
    assert rules["logs"]["expire-current-objects"]["expiration"] == {"days": 365}
    # The model registry keeps current models forever.
    assert "expire-current-objects" not in rules["models"]


def test_force_destroy_off_by_default(run: OfflineRun, offline: Callable[..., OfflineRun]) -> None:
    assert all(b.inputs["forceDestroy"] is False for b in run.of_type(BUCKET))
    throwaway = _storage(offline, force_destroy=True)
    assert all(b.inputs["forceDestroy"] is True for b in throwaway.of_type(BUCKET))


def test_custom_bucket_specs(offline: Callable[..., OfflineRun]) -> None:
    run = _storage(offline, buckets=[BucketSpec("scratch", versioned=False, expire_after_days=7)])
    assert set(run.outputs["names"]) == {"scratch"}
    assert not run.of_type("aws:s3/bucketVersioning:BucketVersioning")
    (lifecycle,) = run.of_type("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration")
    assert {r["id"] for r in lifecycle.inputs["rules"]} == {
        "abort-incomplete-multipart-uploads",
        "expire-current-objects",
    }


def test_bad_specs_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"set purpose to"):
        BucketSpec("Model_Registry")
    with pytest.raises(ValueError, match="expire_after_days"):
        BucketSpec("logs", expire_after_days=0)
    with pytest.raises(ValueError, match="purpose twice"):
        StorageArgs(kms_key_arn=KEY_ARN, buckets=[BucketSpec("a"), BucketSpec("a")])


def test_protect_reaches_every_child(offline: Callable[..., OfflineRun]) -> None:
    run = _storage(offline, opts={"protect": True})
    children = [r for r in run.resources if r.type != "tessera:infra:Storage"]
    assert len(children) == 5 * 6 + 4  # 6 resources per bucket, plus versioning on the 4 precious ones
    assert all(r.protect for r in children)
