"""The platform KMS key: rotated, administered by the account, usable by Logs only for its own groups."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pulumi
import pytest

from infra.encryption import Encryption, EncryptionArgs
from stacks.offline import ACCOUNT_ID, OfflineRun

KEY = "aws:kms/key:Key"
ALIAS = "aws:kms/alias:Alias"


def _encryption(offline: Callable[..., OfflineRun], stack: str = "dev", **kwargs: Any) -> OfflineRun:
    def program() -> dict[str, Any]:
        enc = Encryption(
            "tessera-kms",
            EncryptionArgs(region="eu-west-1", account_id=ACCOUNT_ID),
            opts=pulumi.ResourceOptions(**kwargs),
        )
        return {"key_arn": enc.key_arn, "key_id": enc.key_id, "alias": enc.alias_name}

    return offline(program, config={"aws:region": "eu-west-1"}, stack=stack)


def test_key_rotates_and_has_alias(offline: Callable[..., OfflineRun]) -> None:
    run = _encryption(offline)
    key = run.named(KEY, "tessera-kms-key")
    assert key.inputs["enableKeyRotation"] is True
    assert key.inputs["deletionWindowInDays"] == 30
    alias = run.named(ALIAS, "tessera-kms-alias")
    assert alias.inputs["name"] == "alias/tessera-dev-tessera-kms"
    assert alias.inputs["targetKeyId"] == key.outputs["keyId"]
    assert run.outputs["alias"] == "alias/tessera-dev-tessera-kms"
    assert run.outputs["key_arn"] == key.outputs["arn"] and run.outputs["key_arn"].startswith("arn:aws:kms:")
    assert run.outputs["key_id"] == key.outputs["keyId"]


def test_alias_carries_the_stack_so_stacks_share_an_account(offline: Callable[..., OfflineRun]) -> None:
    # An alias is unique per account and region: the same component in two stacks must not claim one name.
    aliases = {
        stack: _encryption(offline, stack=stack).named(ALIAS, "tessera-kms-alias").inputs["name"]
        for stack in ("dev", "prod-data")
    }
    assert aliases == {
        "dev": "alias/tessera-dev-tessera-kms",
        "prod-data": "alias/tessera-prod-data-tessera-kms",
    }


def test_key_policy_account_administers_logs_only_for_own_groups(offline: Callable[..., OfflineRun]) -> None:
    policy = json.loads(_encryption(offline).named(KEY, "tessera-kms-key").inputs["policy"])
    statements = policy["Statement"]
    admin = [s for s in statements if s["Principal"] == {"AWS": f"arn:aws:iam::{ACCOUNT_ID}:root"}]
    assert len(admin) == 1 and admin[0]["Effect"] == "Allow" and admin[0]["Action"] == "kms:*"

    logs = [s for s in statements if s["Principal"] == {"Service": "logs.eu-west-1.amazonaws.com"}]
    assert len(logs) == 1
    assert "kms:Decrypt*" in logs[0]["Action"] and "kms:GenerateDataKey*" in logs[0]["Action"]
    assert "kms:*" not in logs[0]["Action"]
    assert logs[0]["Condition"] == {
        "ArnLike": {"kms:EncryptionContext:aws:logs:arn": f"arn:aws:logs:eu-west-1:{ACCOUNT_ID}:log-group:*"}
    }
    # Nobody else: no wildcard principal, no other account (CloudWatch alarms: the test below).
    assert len(statements) == 3
    for statement in statements:
        principal = statement["Principal"]
        assert principal != "*" and principal.get("AWS", f"arn:aws:iam::{ACCOUNT_ID}:root").endswith(
            f"::{ACCOUNT_ID}:root"
        )


def test_deletion_window_outside_kms_limits_is_rejected() -> None:
    for days in (6, 31):
        with pytest.raises(ValueError, match="deletion_window_days"):
            EncryptionArgs(region="us-east-1", account_id=ACCOUNT_ID, deletion_window_days=days)


def test_protect_reaches_key_and_alias(offline: Callable[..., OfflineRun]) -> None:
    run = _encryption(offline, protect=True)
    children = [r for r in run.resources if r.type in (KEY, ALIAS)]
    assert len(children) == 2
    assert all(r.protect for r in children)


def test_cloudwatch_may_encrypt_alarm_notifications_only_for_own_alarms(
    offline: Callable[..., OfflineRun],
) -> None:
    # The autostop's alerts topic is encrypted with this key: without this grant its alarm fires but no
    # notification is ever delivered.
    policy = json.loads(_encryption(offline).named(KEY, "tessera-kms-key").inputs["policy"])
    [alarms] = [s for s in policy["Statement"] if s["Principal"].get("Service") == "cloudwatch.amazonaws.com"]
    assert set(alarms["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey*"}
    assert alarms["Condition"]["StringEquals"] == {"aws:SourceAccount": ACCOUNT_ID}
    assert (
        alarms["Condition"]["ArnLike"]["aws:SourceArn"]
        == f"arn:aws:cloudwatch:eu-west-1:{ACCOUNT_ID}:alarm:*"
    )
