"""Work queues: every message that keeps failing ends in a dead-letter queue; everything is encrypted."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pulumi
import pytest

from infra.queues import Queues, QueuesArgs, QueueSpec
from stacks.offline import Declared, OfflineRun

QUEUE = "aws:sqs/queue:Queue"
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/0000-queues"
VISIBILITY = {
    "image-requests": 55,
    "region-requests": 55,
    "training-jobs": 300,
    "sky-requests": 55,
    "fits-frames": 55,
}
FOURTEEN_DAYS = 14 * 24 * 3600


def _queues(
    offline: Callable[..., OfflineRun], opts: dict[str, Any] | None = None, **kwargs: Any
) -> OfflineRun:
    def program() -> dict[str, Any]:
        queues = Queues("q", QueuesArgs(**kwargs), opts=pulumi.ResourceOptions(**(opts or {})))
        return {
            "urls": queues.urls,
            "arns": queues.arns,
            "names": queues.names,
            "dlq_urls": queues.dlq_urls,
            "dlq_arns": queues.dlq_arns,
            "dlq_names": queues.dlq_names,
        }

    return offline(program)


def _queue(run: OfflineRun, url: str) -> Declared:
    queue = run.by_id(url)
    assert queue is not None and queue.type == QUEUE
    return queue


def test_every_queue_has_its_own_dlq_with_configured_receives(offline: Callable[..., OfflineRun]) -> None:
    run = _queues(offline, max_receive_count=5, kms_key_arn=KEY_ARN)
    assert set(run.outputs["urls"]) == set(VISIBILITY)
    assert len(run.of_type(QUEUE)) == 2 * len(VISIBILITY)
    allow = {a.inputs["queueUrl"]: a for a in run.of_type("aws:sqs/redriveAllowPolicy:RedriveAllowPolicy")}
    for purpose, url in run.outputs["urls"].items():
        queue = _queue(run, url)
        redrive = json.loads(queue.inputs["redrivePolicy"])
        assert redrive == {"deadLetterTargetArn": run.outputs["dlq_arns"][purpose], "maxReceiveCount": 5}
        dlq = _queue(run, run.outputs["dlq_urls"][purpose])
        assert dlq.outputs["arn"] == run.outputs["dlq_arns"][purpose] != queue.outputs["arn"]
        assert dlq.inputs["messageRetentionSeconds"] == FOURTEEN_DAYS
        assert "redrivePolicy" not in dlq.inputs
        # Only this queue may send to its DLQ.
        policy = json.loads(allow[dlq.outputs["url"]].inputs["redriveAllowPolicy"])
        assert policy == {"redrivePermission": "byQueue", "sourceQueueArns": [queue.outputs["arn"]]}


def test_default_max_receive_count_is_3(offline: Callable[..., OfflineRun]) -> None:
    run = _queues(offline)
    counts = {
        json.loads(q.inputs["redrivePolicy"])["maxReceiveCount"]
        for q in run.of_type(QUEUE)
        if q.inputs.get("redrivePolicy")
    }
    assert counts == {3}


def test_queues_encrypted_with_the_key(offline: Callable[..., OfflineRun]) -> None:
    run = _queues(offline, kms_key_arn=KEY_ARN)
    assert len(run.of_type(QUEUE)) == 10
    # S3 event notifications feed fits-frames: SSE-SQS, which S3 can send to without a grant on the key.
    s3_fed = {run.outputs["urls"]["fits-frames"], run.outputs["dlq_urls"]["fits-frames"]}
    for queue in run.of_type(QUEUE):
        if queue.outputs["url"] in s3_fed:
            assert queue.inputs["sqsManagedSseEnabled"] is True
            assert "kmsMasterKeyId" not in queue.inputs
        else:
            assert queue.inputs["kmsMasterKeyId"] == KEY_ARN
            assert not queue.inputs.get("sqsManagedSseEnabled")


def test_queues_use_sse_sqs_without_a_key(offline: Callable[..., OfflineRun]) -> None:
    queues = _queues(offline).of_type(QUEUE)
    assert len(queues) == 10
    for queue in queues:
        assert queue.inputs["sqsManagedSseEnabled"] is True
        assert "kmsMasterKeyId" not in queue.inputs


def test_visibility_timeouts_and_long_polling(offline: Callable[..., OfflineRun]) -> None:
    run = _queues(offline)
    for purpose, seconds in VISIBILITY.items():
        queue = _queue(run, run.outputs["urls"][purpose])
        assert queue.inputs["visibilityTimeoutSeconds"] == seconds, purpose
    assert all(q.inputs["receiveWaitTimeSeconds"] == 20 for q in run.of_type(QUEUE))


def test_outputs_name_the_declared_queues(offline: Callable[..., OfflineRun]) -> None:
    run = _queues(offline)
    for purpose in VISIBILITY:
        queue = _queue(run, run.outputs["urls"][purpose])
        assert run.outputs["names"][purpose] == queue.outputs["name"]
        assert run.outputs["arns"][purpose] == queue.outputs["arn"]
        assert (
            run.outputs["dlq_names"][purpose] == _queue(run, run.outputs["dlq_urls"][purpose]).outputs["name"]
        )


@pytest.mark.parametrize("seconds", [-1, 43_201])
def test_visibility_timeout_outside_sqs_limits_is_rejected(seconds: int) -> None:
    with pytest.raises(ValueError, match=r"visibility_timeout_s=.*set .*visibility_timeout_s to 0\.\.43200"):
        QueueSpec("image-requests", visibility_timeout_s=seconds)


@pytest.mark.parametrize("count", [0, 1001])
def test_max_receive_count_outside_sqs_limits_is_rejected(count: int) -> None:
    with pytest.raises(ValueError, match=r"set QueuesArgs\.max_receive_count to 1\.\.1000"):
        QueuesArgs(max_receive_count=count)


def test_retention_outside_sqs_limits_is_rejected() -> None:
    with pytest.raises(ValueError, match="message_retention_s"):
        QueueSpec("fits-frames", message_retention_s=FOURTEEN_DAYS + 1)


def test_duplicate_purposes_are_rejected() -> None:
    with pytest.raises(ValueError, match="purpose twice"):
        QueuesArgs(queues=[QueueSpec("a"), QueueSpec("a")])


def test_protect_reaches_every_queue(offline: Callable[..., OfflineRun]) -> None:
    run = _queues(offline, opts={"protect": True})
    children = [r for r in run.resources if r.type != "tessera:infra:Queues"]
    assert len(children) == 5 * 4  # pair component, queue, DLQ, redrive-allow policy
    assert all(r.protect for r in children)


def test_a_dead_workers_message_returns_within_a_minute_and_poison_reaches_the_dlq_within_five(
    offline: Callable[..., OfflineRun],
) -> None:
    # A SIGKILLed worker extends nothing: its message comes back after one visibility timeout. A message
    # that kills every worker is received max_receive_count times before the dead-letter queue takes it.
    run = _queues(offline)
    for purpose in ("image-requests", "region-requests", "sky-requests", "fits-frames"):
        queue = _queue(run, run.outputs["urls"][purpose])
        visibility = queue.inputs["visibilityTimeoutSeconds"]
        receives = json.loads(queue.inputs["redrivePolicy"])["maxReceiveCount"]
        assert visibility <= 60 - 5, purpose  # the worker's poll after the message is visible again
        assert visibility * receives <= 5 * 60, purpose
