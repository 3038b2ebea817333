"""SQS work queues, each with a dead-letter queue, encrypted and long-polled.

Queues use the platform's KMS key, except those an AWS service sends to (``QueueSpec.sse_sqs``): S3 event
notifications cannot use a customer managed key unless its key policy lets the S3 service principal use it,
so those queues use SQS-managed encryption (SSE-SQS), which S3 can send to with no key grant at all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

MAX_VISIBILITY_TIMEOUT_S = 43_200  # 12 hours, the SQS limit
MIN_RETENTION_S, MAX_RETENTION_S = 60, 1_209_600  # 1 minute .. 14 days, the SQS limits
DLQ_RETENTION_S = MAX_RETENTION_S  # the longest SQS allows: time to look at a failure and redrive it
LONG_POLL_S = 20  # the longest receive wait: fewer empty receives, lower cost
_PURPOSE = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")


def check_visibility_timeout(setting: str, seconds: int) -> None:
    """Raise ValueError naming ``setting`` unless ``seconds`` is a visibility timeout SQS accepts."""
    if not 0 <= seconds <= MAX_VISIBILITY_TIMEOUT_S:
        raise ValueError(
            f"{setting}={seconds} is outside what SQS accepts; set {setting} to "
            f"0..{MAX_VISIBILITY_TIMEOUT_S} seconds (workers that need longer must extend the visibility "
            "with a heartbeat)"
        )


def check_max_receive_count(setting: str, count: int) -> None:
    """Raise ValueError naming ``setting`` unless ``count`` is a maxReceiveCount SQS accepts."""
    if not 1 <= count <= 1000:
        raise ValueError(
            f"{setting}={count} is outside what SQS accepts; set {setting} to 1..1000 receives before "
            "a message goes to the dead-letter queue"
        )


def check_retention(setting: str, seconds: int) -> None:
    """Raise ValueError naming ``setting`` unless ``seconds`` is a message retention SQS accepts."""
    if not MIN_RETENTION_S <= seconds <= MAX_RETENTION_S:
        raise ValueError(
            f"{setting}={seconds} is outside what SQS accepts; set {setting} to "
            f"{MIN_RETENTION_S}..{MAX_RETENTION_S} seconds"
        )


@dataclass
class QueuePairArgs:
    """A work queue and its dead-letter queue."""

    visibility_timeout_s: int = 300
    """Seconds a received message stays hidden from other consumers (0..43200)."""
    message_retention_s: int = 345_600
    """Seconds an unreceived message is kept in the work queue (60..1209600; default 4 days)."""
    max_receives: int = 3
    """Receives before a message moves to the dead-letter queue (1..1000)."""
    kms_key_arn: pulumi.Input[str] | None = None
    """KMS key for server-side encryption; None uses SQS-managed encryption (SSE-SQS)."""

    def __post_init__(self) -> None:
        check_visibility_timeout("visibility_timeout_s", self.visibility_timeout_s)
        check_retention("message_retention_s", self.message_retention_s)
        check_max_receive_count("max_receives", self.max_receives)


class QueuePair(pulumi.ComponentResource):
    """A work queue with its dead-letter queue."""

    url: pulumi.Output[str]
    arn: pulumi.Output[str]
    name: pulumi.Output[str]
    dlq_url: pulumi.Output[str]
    dlq_arn: pulumi.Output[str]
    dlq_name: pulumi.Output[str]

    def __init__(self, name: str, args: QueuePairArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tessera:infra:QueuePair", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        # Exactly one of the two: SQS refuses a queue with both a KMS key and SSE-SQS.
        sse_sqs = True if args.kms_key_arn is None else None
        self.dead_letters = aws.sqs.Queue(
            f"{name}-dlq",
            message_retention_seconds=DLQ_RETENTION_S,
            visibility_timeout_seconds=args.visibility_timeout_s,
            receive_wait_time_seconds=LONG_POLL_S,
            kms_master_key_id=args.kms_key_arn,
            sqs_managed_sse_enabled=sse_sqs,
            opts=child,
        )
        self.queue = aws.sqs.Queue(
            name,
            visibility_timeout_seconds=args.visibility_timeout_s,
            message_retention_seconds=args.message_retention_s,
            receive_wait_time_seconds=LONG_POLL_S,
            redrive_policy=pulumi.Output.json_dumps(
                {"deadLetterTargetArn": self.dead_letters.arn, "maxReceiveCount": args.max_receives}
            ),
            kms_master_key_id=args.kms_key_arn,
            sqs_managed_sse_enabled=sse_sqs,
            opts=child,
        )
        # Only this work queue may use the DLQ (separate resource: the DLQ exists before the queue's ARN).
        aws.sqs.RedriveAllowPolicy(
            f"{name}-dlq-allow",
            queue_url=self.dead_letters.url,
            redrive_allow_policy=pulumi.Output.json_dumps(
                {"redrivePermission": "byQueue", "sourceQueueArns": [self.queue.arn]}
            ),
            opts=child,
        )
        self.url, self.arn, self.name = self.queue.url, self.queue.arn, self.queue.name
        self.dlq_url, self.dlq_arn = self.dead_letters.url, self.dead_letters.arn
        self.dlq_name = self.dead_letters.name
        self.register_outputs(
            {
                "url": self.url,
                "arn": self.arn,
                "name": self.name,
                "dlq_url": self.dlq_url,
                "dlq_arn": self.dlq_arn,
                "dlq_name": self.dlq_name,
            }
        )


@dataclass(frozen=True)
class QueueSpec:
    """One work queue of the platform."""

    purpose: str
    """Key of the queue in the outputs and part of its name."""
    visibility_timeout_s: int = 300
    """Seconds a received message stays hidden; longer than one attempt takes, or a heartbeat extends it."""
    message_retention_s: int = 345_600
    """Seconds an unreceived message is kept (default 4 days)."""
    sse_sqs: bool = False
    """Encrypt with SQS-managed keys (SSE-SQS) even where the platform key is given: for a queue an AWS
    service sends to (S3 event notifications, ``infra/notifications.py``). The platform key would need a
    key-policy grant to the S3 service principal, and the key exists before the bucket and queue it would be
    scoped to; SSE-SQS needs none. What such a queue carries is event metadata (bucket, key, size, ETag);
    the objects themselves stay encrypted with the platform key."""

    def __post_init__(self) -> None:
        if not _PURPOSE.match(self.purpose):
            raise ValueError(
                f"QueueSpec.purpose={self.purpose!r} cannot be part of a queue name; set purpose to "
                "lowercase letters, digits and hyphens"
            )
        check_visibility_timeout(
            f"QueueSpec({self.purpose!r}).visibility_timeout_s", self.visibility_timeout_s
        )
        check_retention(f"QueueSpec({self.purpose!r}).message_retention_s", self.message_retention_s)


RECOVERY_GOAL_S = 60
"""How soon the work of a worker that died (SIGKILL, a lost instance) must be handed to another."""
RECOVERY_S = RECOVERY_GOAL_S - 5
"""The visibility timeout of the queue-fed services' queues: the goal less the few seconds a worker takes to
poll the message once it is visible again (bench/recovery.py measured visibility + 0.0-0.6 s). Workers
extend a message's visibility with a heartbeat every third of it while they work, so a live worker keeps its
message however long the work takes; with ``max_receive_count`` 3 a message that kills every worker
reaches the dead-letter queue in under 3 minutes."""

DEFAULT_QUEUES: tuple[QueueSpec, ...] = (
    QueueSpec("image-requests", visibility_timeout_s=RECOVERY_S),
    QueueSpec("region-requests", visibility_timeout_s=RECOVERY_S),
    # One training box: a job waits for it to come back rather than running twice; still under 5 minutes.
    QueueSpec("training-jobs", visibility_timeout_s=300),
    QueueSpec("sky-requests", visibility_timeout_s=RECOVERY_S),
    # Fed by the imagery bucket's S3 event notifications (services/cloud/events.py NOTIFICATIONS).
    QueueSpec("fits-frames", visibility_timeout_s=RECOVERY_S, sse_sqs=True),
)


@dataclass
class QueuesArgs:
    """The platform's work queues."""

    max_receive_count: int = 3
    """Receives before a message goes to its queue's dead-letter queue (1..1000)."""
    kms_key_arn: pulumi.Input[str] | None = None
    """KMS key for every queue but those whose spec asks for SSE-SQS; None uses SSE-SQS for all."""
    queues: Sequence[QueueSpec] = field(default_factory=lambda: DEFAULT_QUEUES)
    """One queue pair per spec, keyed by purpose."""

    def __post_init__(self) -> None:
        check_max_receive_count("QueuesArgs.max_receive_count", self.max_receive_count)
        purposes = [q.purpose for q in self.queues]
        if len(set(purposes)) != len(purposes):
            raise ValueError(
                f"QueuesArgs.queues has a purpose twice: {purposes}; give every queue its own purpose"
            )


class Queues(pulumi.ComponentResource):
    """One :class:`QueuePair` per :class:`QueueSpec`; outputs are keyed by purpose."""

    urls: dict[str, pulumi.Output[str]]
    arns: dict[str, pulumi.Output[str]]
    names: dict[str, pulumi.Output[str]]
    dlq_urls: dict[str, pulumi.Output[str]]
    dlq_arns: dict[str, pulumi.Output[str]]
    dlq_names: dict[str, pulumi.Output[str]]

    def __init__(self, name: str, args: QueuesArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tessera:infra:Queues", name, None, opts)
        self.pairs: dict[str, QueuePair] = {
            spec.purpose: QueuePair(
                f"{name}-{spec.purpose}",
                QueuePairArgs(
                    visibility_timeout_s=spec.visibility_timeout_s,
                    message_retention_s=spec.message_retention_s,
                    max_receives=args.max_receive_count,
                    kms_key_arn=None if spec.sse_sqs else args.kms_key_arn,
                ),
                opts=pulumi.ResourceOptions(parent=self),
            )
            for spec in args.queues
        }
        self.urls = {p: q.url for p, q in self.pairs.items()}
        self.arns = {p: q.arn for p, q in self.pairs.items()}
        self.names = {p: q.name for p, q in self.pairs.items()}
        self.dlq_urls = {p: q.dlq_url for p, q in self.pairs.items()}
        self.dlq_arns = {p: q.dlq_arn for p, q in self.pairs.items()}
        self.dlq_names = {p: q.dlq_name for p, q in self.pairs.items()}
        self.register_outputs(
            {
                "urls": self.urls,
                "arns": self.arns,
                "names": self.names,
                "dlq_urls": self.dlq_urls,
                "dlq_arns": self.dlq_arns,
                "dlq_names": self.dlq_names,
            }
        )
