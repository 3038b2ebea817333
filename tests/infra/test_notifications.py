"""S3 event notifications to SQS: the imagery bucket tells the fits-frames queue of every frame that arrives
under ``fits/incoming/``, only S3 may send to that queue and only for that bucket, and the notification is
made after the queue's policy (S3 validates the destination when the configuration is put)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pulumi
import pulumi_aws as aws
import pytest

from infra.notifications import (
    S3_PRINCIPAL,
    QueueNotifications,
    QueueNotificationsArgs,
    QueueRoute,
    events_overlap,
)
from infra.queues import Queues, QueuesArgs
from services.cloud.events import FITS_INCOMING_PREFIX, NOTIFICATIONS, OBJECT_CREATED
from stacks.graph import check_s3_notifications_deliverable, queue_senders
from stacks.offline import ACCOUNT_ID, Declared, OfflineRun, TesseraMocks
from stacks.plan import Plan
from stacks.services import SERVICES

NOTIFICATION = "aws:s3/bucketNotification:BucketNotification"
QUEUE_POLICY = "aws:sqs/queuePolicy:QueuePolicy"
QUEUE = "aws:sqs/queue:Queue"


def _route(bucket: aws.s3.Bucket, queues: Queues, queue: str, **kwargs: Any) -> QueueRoute:
    settings: dict[str, Any] = {"id": f"{queue}-route", "prefix": "in/", **kwargs}
    return QueueRoute(
        bucket=str(bucket._name),
        bucket_name=bucket.bucket,
        bucket_arn=bucket.arn,
        queue=queue,
        queue_url=queues.urls[queue],
        queue_arn=queues.arns[queue],
        **settings,
    )


def _statement(run: OfflineRun, queue_url: str) -> dict[str, Any]:
    [policy] = [p for p in run.of_type(QUEUE_POLICY) if p.inputs["queueUrl"] == queue_url]
    [statement] = json.loads(policy.inputs["policy"])["Statement"]
    return dict(statement)


# --- the component ---------------------------------------------------------------------------------------


def test_one_configuration_per_bucket_one_policy_per_queue(offline: Callable[..., OfflineRun]) -> None:
    def program() -> dict[str, Any]:
        queues = Queues("q", QueuesArgs())
        frames, logs = aws.s3.Bucket("frames"), aws.s3.Bucket("logs")
        QueueNotifications(
            "n",
            QueueNotificationsArgs(
                account_id=ACCOUNT_ID,
                routes=[
                    _route(frames, queues, "fits-frames", id="a", prefix="fits/incoming/"),
                    _route(frames, queues, "sky-requests", id="b", prefix="sky/"),
                    _route(logs, queues, "fits-frames", id="c", prefix="fits/"),
                ],
            ),
        )
        return {"urls": queues.urls, "arns": queues.arns, "buckets": [frames.arn, logs.arn]}

    run = offline(program)
    notifications = {n.name: n for n in run.of_type(NOTIFICATION)}
    assert set(notifications) == {"n-frames", "n-logs"}
    assert [(q["id"], q["filterPrefix"]) for q in notifications["n-frames"].inputs["queues"]] == [
        ("a", "fits/incoming/"),
        ("b", "sky/"),
    ]
    # One policy per queue, naming every bucket that feeds it.
    assert len(run.of_type(QUEUE_POLICY)) == 2
    fits = _statement(run, run.outputs["urls"]["fits-frames"])
    assert fits["Condition"]["ArnEquals"]["aws:SourceArn"] == sorted(run.outputs["buckets"])
    sky = _statement(run, run.outputs["urls"]["sky-requests"])
    assert sky["Condition"]["ArnEquals"]["aws:SourceArn"] == run.outputs["buckets"][0]
    # The frames configuration waits for both policies it names, the logs one for its one.
    assert set(notifications["n-frames"].depends_on) == {
        (QUEUE_POLICY, "n-fits-frames-policy"),
        (QUEUE_POLICY, "n-sky-requests-policy"),
    }
    assert notifications["n-logs"].depends_on == ((QUEUE_POLICY, "n-fits-frames-policy"),)


def test_overlapping_routes_of_a_bucket_are_refused() -> None:
    def route(rid: str, prefix: str, *events: str) -> QueueRoute:
        return QueueRoute(
            rid, "b", "b", "arn:aws:s3:::b", "q", "url", "arn", prefix, events or (OBJECT_CREATED,)
        )

    with pytest.raises(ValueError, match="overlap"):
        QueueNotificationsArgs(ACCOUNT_ID, [route("a", "fits/"), route("b", "fits/incoming/")])
    with pytest.raises(ValueError, match="overlap"):
        QueueNotificationsArgs(ACCOUNT_ID, [route("a", "", "s3:ObjectCreated:Put"), route("b", "x/")])
    with pytest.raises(ValueError, match="id 'a'"):
        QueueNotificationsArgs(ACCOUNT_ID, [route("a", "x/"), route("a", "y/")])
    # Disjoint prefixes, or disjoint events on one prefix, are fine.
    QueueNotificationsArgs(ACCOUNT_ID, [route("a", "fits/incoming/"), route("b", "fits/done/")])
    QueueNotificationsArgs(ACCOUNT_ID, [route("a", "x/"), route("b", "x/", "s3:ObjectRemoved:*")])
    assert events_overlap(["s3:ObjectCreated:*"], ["s3:ObjectCreated:CompleteMultipartUpload"])
    assert not events_overlap(["s3:ObjectCreated:Put"], ["s3:ObjectCreated:Copy"])


# --- the platform as shipped --------------------------------------------------------------------------------


def _fits_notification(plan: Plan) -> tuple[Declared, dict[str, Any]]:
    [notification] = plan.run.of_type(NOTIFICATION)
    [target] = notification.inputs["queues"]
    return notification, target


@pytest.mark.parametrize("stack", ["dev", "prod-data"])
def test_the_imagery_bucket_notifies_fits_frames_of_created_objects_under_the_incoming_prefix(
    stack: str, shipped_plan: Callable[[str], Plan]
) -> None:
    plan = shipped_plan(stack)
    notification, target = _fits_notification(plan)
    assert notification.inputs["bucket"] == plan.run.outputs["bucketNames"]["imagery"]
    assert target["queueArn"] == plan.run.outputs["queueArns"]["fits-frames"]
    assert target["events"] == ["s3:ObjectCreated:*"]
    assert target["filterPrefix"] == FITS_INCOMING_PREFIX == "fits/incoming/"
    assert target["id"] == "fits-frames-incoming"
    assert "filterSuffix" not in target  # .fits, .fit, .fts, .fits.fz...: the worker sorts them out
    # In the data layer (prod-data protects it with everything else there).
    assert notification.protect is (stack == "prod-data")


@pytest.mark.parametrize("stack", ["dev", "prod-data"])
def test_only_s3_may_send_to_fits_frames_and_only_for_the_imagery_bucket_of_this_account(
    stack: str, shipped_plan: Callable[[str], Plan]
) -> None:
    run = shipped_plan(stack).run
    queue_url, queue_arn = run.outputs["queueUrls"]["fits-frames"], run.outputs["queueArns"]["fits-frames"]
    imagery_arn = run.outputs["bucketArns"]["imagery"]
    [policy] = run.of_type(QUEUE_POLICY)  # the one queue policy of the platform
    assert policy.inputs["queueUrl"] == queue_url
    document = json.loads(policy.inputs["policy"])
    assert document["Statement"] == [
        {
            "Sid": "S3EventNotificationsFromOwnBuckets",
            "Effect": "Allow",
            "Principal": {"Service": S3_PRINCIPAL},
            "Action": "sqs:SendMessage",
            "Resource": queue_arn,
            "Condition": {
                "ArnEquals": {"aws:SourceArn": imagery_arn},
                "StringEquals": {"aws:SourceAccount": ACCOUNT_ID},
            },
        }
    ]
    assert [principal for principal, _ in queue_senders(policy.inputs["policy"])] == [
        {"Service": S3_PRINCIPAL}
    ]


def test_no_service_role_may_put_messages_on_fits_frames(dev: Plan) -> None:
    # The policy grants S3 alone; no role of the platform grants itself sqs:SendMessage on the queue either,
    # so an event on it came from the imagery bucket (the worker still checks bucket and prefix).
    queue_arn = dev.run.outputs["queueArns"]["fits-frames"]
    granted: dict[str, set[str]] = {}
    for policy in dev.run.of_type("aws:iam/rolePolicy:RolePolicy"):
        for statement in json.loads(str(policy.inputs["policy"]))["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            resources = statement.get("Resource")
            if queue_arn in (resources if isinstance(resources, list) else [resources]):
                granted.setdefault(policy.name, set()).update(actions)
    assert not any({"sqs:SendMessage", "sqs:*", "*"} & actions for actions in granted.values()), granted
    # ...while its consumer, the frame classifier, may receive from it.
    assert (
        [name for name, actions in granted.items() if "sqs:ReceiveMessage" in actions]
        == [name for name in granted if "fits-classifier" in name]
        != []
    )


@pytest.mark.parametrize("stack", ["dev", "prod-data"])
def test_the_notification_is_made_after_the_queue_policy(
    stack: str, shipped_plan: Callable[[str], Plan]
) -> None:
    run = shipped_plan(stack).run
    notification, _ = _fits_notification(shipped_plan(stack))
    [policy] = run.of_type(QUEUE_POLICY)
    assert (policy.type, policy.name) in notification.depends_on


@pytest.mark.parametrize("stack", ["dev", "prod-data"])
def test_s3_can_use_the_fits_frames_encryption(stack: str, shipped_plan: Callable[[str], Plan]) -> None:
    run = shipped_plan(stack).run
    for url in (run.outputs["queueUrls"]["fits-frames"], run.outputs["deadLetterQueueUrls"]["fits-frames"]):
        queue = run.by_id(url)
        assert queue is not None and queue.type == QUEUE
        # SSE-SQS: S3 sends with no grant on the platform key (the AWS managed aws/sqs key would refuse it).
        assert queue.inputs["sqsManagedSseEnabled"] is True and "kmsMasterKeyId" not in queue.inputs
    # Every other queue keeps the platform key.
    key = run.outputs["kmsKeyArn"]
    others = [q for q in run.of_type(QUEUE) if "fits-frames" not in q.name]
    assert others and all(q.inputs["kmsMasterKeyId"] == key for q in others)
    assert list(check_s3_notifications_deliverable(run)) == []


def test_the_compute_stack_declares_no_notification(prod_compute: Plan) -> None:
    assert prod_compute.run.of_type(NOTIFICATION) == []
    assert prod_compute.run.of_type(QUEUE_POLICY) == []


def test_what_a_route_announces_its_queues_consumer_may_read() -> None:
    for route in NOTIFICATIONS:
        consumers = [s for s in SERVICES if route.queue in s.consumes]
        assert consumers, f"nobody consumes {route.queue}"
        for spec in consumers:
            assert any(
                use.purpose == route.bucket and route.prefix.startswith(use.prefix) for use in spec.reads
            ), f"{spec.name} may not read s3://{route.bucket}/{route.prefix}"


# --- the graph check finds a notification that AWS would refuse or drop ------------------------------------


def _graph(
    policy: dict[str, Any] | None, *, depends: bool = True, key: str | None = None, key_policy: Any = None
) -> OfflineRun:
    queue_arn = f"arn:aws:sqs:us-east-1:{ACCOUNT_ID}:q"
    url = f"https://sqs.us-east-1.amazonaws.com/{ACCOUNT_ID}/q"
    queue_inputs: dict[str, Any] = {"kmsMasterKeyId": key} if key else {"sqsManagedSseEnabled": True}
    resources = [
        Declared("aws:s3/bucket:Bucket", "b", {}, {"bucket": "b", "arn": "arn:aws:s3:::b"}),
        Declared(QUEUE, "q", queue_inputs, {"arn": queue_arn, "url": url}),
        Declared(
            NOTIFICATION,
            "n",
            {"bucket": "b", "queues": [{"queueArn": queue_arn, "events": [OBJECT_CREATED]}]},
            {},
            depends_on=((QUEUE_POLICY, "p"),) if depends else (),
        ),
    ]
    if policy is not None:
        resources.append(Declared(QUEUE_POLICY, "p", {"queueUrl": url, "policy": json.dumps(policy)}, {}))
    if key_policy is not None:
        resources.append(
            Declared("aws:kms/key:Key", "k", {"policy": json.dumps(key_policy)}, {"arn": key, "keyId": "k-1"})
        )
    return OfflineRun(resources=resources, outputs={}, mocks=TesseraMocks())


def _send_policy(source_arn: str = "arn:aws:s3:::b") -> dict[str, Any]:
    return {
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": S3_PRINCIPAL},
                "Action": "sqs:SendMessage",
                "Resource": "arn",
                "Condition": {"ArnEquals": {"aws:SourceArn": source_arn}},
            }
        ]
    }


def _details(run: OfflineRun) -> list[str]:
    return [f.detail for f in check_s3_notifications_deliverable(run)]


def test_a_deliverable_notification_has_no_finding() -> None:
    assert _details(_graph(_send_policy())) == []


def test_a_queue_s3_may_not_send_to_is_found() -> None:
    assert "does not let s3.amazonaws.com send" in _details(_graph(None))[0]
    assert "does not let s3.amazonaws.com send" in _details(_graph(_send_policy("arn:aws:s3:::other")))[0]


def test_a_notification_made_before_its_queue_policy_is_found() -> None:
    assert "does not depend on p" in _details(_graph(_send_policy(), depends=False))[0]


def test_a_queue_encrypted_with_a_key_s3_cannot_use_is_found() -> None:
    managed = f"arn:aws:kms:us-east-1:{ACCOUNT_ID}:alias/aws/sqs"
    assert "alias/aws/sqs" in _details(_graph(_send_policy(), key=managed))[0]
    key = f"arn:aws:kms:us-east-1:{ACCOUNT_ID}:key/k-1"
    admin_only = {"Statement": [{"Effect": "Allow", "Principal": {"AWS": "root"}, "Action": "kms:*"}]}
    assert "kms:GenerateDataKey" in _details(_graph(_send_policy(), key=key, key_policy=admin_only))[0]
    grant = {
        "Effect": "Allow",
        "Principal": {"Service": S3_PRINCIPAL},
        "Action": ["kms:GenerateDataKey", "kms:Decrypt"],
        "Resource": "*",
    }
    with_grant = {"Statement": [*admin_only["Statement"], grant]}
    assert _details(_graph(_send_policy(), key=key, key_policy=with_grant)) == []


def test_the_component_keeps_every_resource_under_itself(offline: Callable[..., OfflineRun]) -> None:
    def program() -> None:
        queues = Queues("q", QueuesArgs())
        bucket = aws.s3.Bucket("frames")
        QueueNotifications(
            "n",
            QueueNotificationsArgs(ACCOUNT_ID, [_route(bucket, queues, "fits-frames")]),
            opts=pulumi.ResourceOptions(protect=True),
        )

    run = offline(program)
    children = [r for r in run.resources if r.parent == "n"]
    assert {r.type for r in children} == {NOTIFICATION, QUEUE_POLICY}
    assert all(r.protect for r in children)
