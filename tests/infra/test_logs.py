"""Service log groups: one per service, kept for a bounded time, encrypted with the platform key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pulumi
import pytest

from infra.logs import ServiceLogs, ServiceLogsArgs
from stacks.offline import OfflineRun

LOG_GROUP = "aws:cloudwatch/logGroup:LogGroup"
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/0000-logs"


def _logs(offline: Callable[..., OfflineRun], **opts: Any) -> OfflineRun:
    def program() -> dict[str, Any]:
        logs = ServiceLogs(
            "logs",
            ServiceLogsArgs(
                prefix="dev", services=["model-runner", "trainer"], retention_days=14, kms_key_arn=KEY_ARN
            ),
            opts=pulumi.ResourceOptions(**opts),
        )
        return {"names": logs.group_names, "arns": logs.group_arns}

    return offline(program)


def test_one_encrypted_group_per_service_with_retention(offline: Callable[..., OfflineRun]) -> None:
    run = _logs(offline)
    groups = {g.inputs["name"]: g for g in run.of_type(LOG_GROUP)}
    assert set(groups) == {"/tessera/dev/model-runner", "/tessera/dev/trainer"}
    for group in groups.values():
        assert group.inputs["retentionInDays"] == 14
        assert group.inputs["kmsKeyId"] == KEY_ARN
    assert run.outputs["names"] == {
        "model-runner": "/tessera/dev/model-runner",
        "trainer": "/tessera/dev/trainer",
    }
    assert run.outputs["arns"]["trainer"] == groups["/tessera/dev/trainer"].outputs["arn"]


def test_default_retention_is_30_days(offline: Callable[..., OfflineRun]) -> None:
    run = offline(lambda: {"n": ServiceLogs("l", ServiceLogsArgs(prefix="p", services=["api"])).group_names})
    (group,) = run.of_type(LOG_GROUP)
    assert group.inputs["retentionInDays"] == 30


@pytest.mark.parametrize("days", [0, 2, 10_000])
def test_retention_cloudwatch_refuses_is_rejected(days: int) -> None:
    with pytest.raises(ValueError, match=r"set ServiceLogsArgs\.retention_days to one of"):
        ServiceLogsArgs(prefix="dev", services=["api"], retention_days=days)


def test_bad_service_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="services"):
        ServiceLogsArgs(prefix="dev", services=["Model Runner"])
    with pytest.raises(ValueError, match="twice"):
        ServiceLogsArgs(prefix="dev", services=["api", "api"])


def test_protect_reaches_every_group(offline: Callable[..., OfflineRun]) -> None:
    groups = _logs(offline, protect=True).of_type(LOG_GROUP)
    assert len(groups) == 2
    assert all(g.protect for g in groups)
