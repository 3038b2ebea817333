"""S3 event notifications delivered to SQS work queues.

Per bucket, one ``BucketNotification`` (S3 keeps one notification configuration per bucket: it holds every
route of that bucket); per queue, one ``QueuePolicy`` (SQS keeps one policy per queue) that lets the S3
service send to it, and only for the listed buckets of this account. The notification is created after the
policy: S3 sends the destination a test message when the configuration is put and refuses a configuration
whose destination it cannot send to ("Unable to validate the following destination configurations").

A queue fed by S3 must not be encrypted with the AWS managed key ``alias/aws/sqs`` (its key policy cannot
be changed to let S3 use it). SSE-SQS works as it is; a customer managed key works only if its key policy
lets ``s3.amazonaws.com`` call ``kms:GenerateDataKey`` and ``kms:Decrypt``. The platform's queues fed by S3
use SSE-SQS (``infra/queues.py`` ``QueueSpec.sse_sqs``); ``stacks/graph.py`` checks each notification.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_aws as aws

#: The S3 service principal: the sender of event notifications (the same name in every partition).
S3_PRINCIPAL = "s3.amazonaws.com"


@dataclass(frozen=True)
class QueueRoute:
    """Objects created under ``prefix`` of one bucket become messages on one queue."""

    id: str
    """The configuration id, unique among the bucket's routes (records carry it as ``configurationId``)."""
    bucket: str
    """The bucket's key (its purpose): routes of one bucket share its one notification configuration."""
    bucket_name: pulumi.Input[str]
    bucket_arn: pulumi.Input[str]
    queue: str
    """The queue's key (its purpose): routes to one queue share its one policy."""
    queue_url: pulumi.Input[str]
    queue_arn: pulumi.Input[str]
    prefix: str
    """Key prefix that notifies ('' for the whole bucket)."""
    events: tuple[str, ...] = ("s3:ObjectCreated:*",)
    """S3 event types that notify."""


def _family(event: str) -> tuple[str, str]:
    """``s3:ObjectCreated:Put`` -> (``s3:ObjectCreated``, ``Put``); a bare or ``*`` event gives ``*``."""
    head, _, tail = event.rpartition(":")
    if head in ("", "s3"):  # s3:ReducedRedundancyLostObject, s3:IntelligentTiering
        return event, "*"
    return head, tail


def events_overlap(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two lists of S3 event types share an event (``s3:ObjectCreated:*`` covers ``...:Put``)."""
    for x in a:
        for y in b:
            (fx, tx), (fy, ty) = _family(x), _family(y)
            if fx == fy and (tx == ty or "*" in (tx, ty)):
                return True
    return False


@dataclass
class QueueNotificationsArgs:
    """The routes from buckets to queues, and the account they all belong to."""

    account_id: pulumi.Input[str]
    """The account of the buckets: S3 may send for them only (``aws:SourceAccount``)."""
    routes: Sequence[QueueRoute] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        seen: dict[tuple[str, str], QueueRoute] = {}
        for route in self.routes:
            if (route.bucket, route.id) in seen:
                raise ValueError(
                    f"QueueNotificationsArgs.routes: bucket {route.bucket!r} has two routes with id "
                    f"{route.id!r}; give every route of a bucket its own id"
                )
            for other in (r for (b, _), r in seen.items() if b == route.bucket):
                nested = route.prefix.startswith(other.prefix) or other.prefix.startswith(route.prefix)
                if nested and events_overlap(route.events, other.events):
                    # S3 refuses it: "Configurations overlap. Configurations on the same bucket cannot
                    # share a common event type."
                    raise ValueError(
                        f"QueueNotificationsArgs.routes: {other.id!r} ({other.prefix!r}) and {route.id!r} "
                        f"({route.prefix!r}) of bucket {route.bucket!r} overlap in prefix and events; S3 "
                        "refuses overlapping routes: give them disjoint prefixes or event types"
                    )
            seen[(route.bucket, route.id)] = route


def queue_policy(queue_arn: str, bucket_arns: Sequence[str], account_id: str) -> dict[str, Any]:
    """The queue's whole policy: only the S3 service may send, and only for these buckets of the account.

    ``aws:SourceArn`` names the buckets and ``aws:SourceAccount`` their owner (a bucket name freed and taken
    by another account does not qualify). Nothing else is granted here: the consumer's role grants itself
    receive and delete (``infra/iam.py``).
    """
    arns = sorted(set(bucket_arns))
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "S3EventNotificationsFromOwnBuckets",
                "Effect": "Allow",
                "Principal": {"Service": S3_PRINCIPAL},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {
                    "ArnEquals": {"aws:SourceArn": arns[0] if len(arns) == 1 else arns},
                    "StringEquals": {"aws:SourceAccount": account_id},
                },
            }
        ],
    }


class QueueNotifications(pulumi.ComponentResource):
    """One notification configuration per bucket and one policy per queue, for :class:`QueueRoute` s."""

    policies: dict[str, aws.sqs.QueuePolicy]
    notifications: dict[str, aws.s3.BucketNotification]

    def __init__(
        self, name: str, args: QueueNotificationsArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("tessera:infra:QueueNotifications", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        by_queue: dict[str, list[QueueRoute]] = {}
        by_bucket: dict[str, list[QueueRoute]] = {}
        for route in args.routes:
            by_queue.setdefault(route.queue, []).append(route)
            by_bucket.setdefault(route.bucket, []).append(route)

        self.policies = {}
        for queue, routes in by_queue.items():
            document = pulumi.Output.all(
                routes[0].queue_arn, args.account_id, *[r.bucket_arn for r in routes]
            ).apply(lambda v: json.dumps(queue_policy(v[0], v[2:], v[1])))
            self.policies[queue] = aws.sqs.QueuePolicy(
                f"{name}-{queue}-policy", queue_url=routes[0].queue_url, policy=document, opts=child
            )

        self.notifications = {}
        for bucket, routes in by_bucket.items():
            self.notifications[bucket] = aws.s3.BucketNotification(
                f"{name}-{bucket}",
                bucket=routes[0].bucket_name,
                queues=[
                    aws.s3.BucketNotificationQueueArgs(
                        id=r.id, queue_arn=r.queue_arn, events=list(r.events), filter_prefix=r.prefix or None
                    )
                    for r in routes
                ],
                # S3 validates each destination when the configuration is put: the policy must be in place.
                opts=pulumi.ResourceOptions(
                    parent=self, depends_on=[self.policies[q] for q in dict.fromkeys(r.queue for r in routes)]
                ),
            )
        self.register_outputs({})
