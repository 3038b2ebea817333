"""SQS work queues: send, receive, delete, and a heartbeat that keeps a message hidden while it is worked on.

Clients honour ``AWS_ENDPOINT_URL`` (botocore reads it), which is how workers reach the embedded default.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import boto3

from services.errors import UserError

log = logging.getLogger(__name__)

#: SQS takes at most ten entries per batch call.
BATCH = 10


def sqs_client(endpoint_url: str | None = None) -> Any:
    """An SQS client; ``endpoint_url`` (or ``AWS_ENDPOINT_URL``) points it at a stand-in such as moto."""
    return boto3.client("sqs", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None)


@dataclass(frozen=True)
class Message:
    """One received message."""

    queue_url: str
    message_id: str
    receipt_handle: str
    body: str
    #: How many times SQS has handed this message out, this time included.
    receive_count: int
    #: When the message was first sent, seconds since the epoch (SQS ``SentTimestamp``).
    sent_at: float


@dataclass(frozen=True)
class QueueSettings:
    """The settings of a queue a worker needs: how long a receive hides a message, when it goes to the DLQ."""

    visibility_timeout_s: int
    #: Receives before SQS moves a message to the dead-letter queue; None when the queue has no DLQ.
    max_receive_count: int | None


def queue_settings(queue_url: str, client: Any = None) -> QueueSettings:
    """Read a queue's visibility timeout and redrive policy."""
    attributes = (client or sqs_client()).get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["VisibilityTimeout", "RedrivePolicy"]
    )["Attributes"]
    redrive = json.loads(attributes["RedrivePolicy"]) if attributes.get("RedrivePolicy") else None
    return QueueSettings(
        visibility_timeout_s=int(attributes["VisibilityTimeout"]),
        max_receive_count=int(redrive["maxReceiveCount"]) if redrive else None,
    )


def send_message(queue_url: str, body: Mapping[str, Any], client: Any = None) -> str:
    """Send one JSON message; returns its message id. A queue that does not exist, or SQS out of reach or
    refusing the credentials, raises UserError saying what to check."""
    import botocore.exceptions

    try:
        response = (client or sqs_client()).send_message(QueueUrl=queue_url, MessageBody=json.dumps(body))
    except botocore.exceptions.ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if "NonExistentQueue" in code or "QueueDoesNotExist" in code:
            raise UserError(
                f"queue {queue_url} does not exist: check the queue URL (the stack output queueUrls) and "
                "the region"
            ) from None
        raise UserError(f"SQS refused the message to {queue_url}: {code or error}") from None
    except botocore.exceptions.NoCredentialsError:
        raise UserError(
            "no AWS credentials to send to the queue: run `aws configure` / `aws sso login`, or set "
            "AWS_PROFILE"
        ) from None
    except botocore.exceptions.EndpointConnectionError as error:
        raise UserError(
            f"cannot reach SQS ({error}); check the network, AWS_REGION and AWS_ENDPOINT_URL"
        ) from None
    return str(response["MessageId"])


def send_messages(queue_url: str, bodies: Iterable[Mapping[str, Any]], client: Any = None) -> int:
    """Send JSON messages in batches of ten; raises if SQS refuses any. Returns how many were sent."""
    sqs = client or sqs_client()
    batch: list[dict[str, str]] = []
    sent = 0

    def flush() -> None:
        nonlocal sent
        if not batch:
            return
        response = sqs.send_message_batch(QueueUrl=queue_url, Entries=batch)
        if response.get("Failed"):
            raise RuntimeError(f"SQS refused {len(response['Failed'])} messages: {response['Failed'][:3]}")
        sent += len(batch)
        batch.clear()

    for body in bodies:
        batch.append({"Id": str(len(batch)), "MessageBody": json.dumps(body)})
        if len(batch) == BATCH:
            flush()
    flush()
    return sent


def receive_messages(
    queue_url: str, *, max_messages: int = 1, wait_s: int = 0, client: Any = None
) -> list[Message]:
    """Receive up to ``max_messages`` (1..10), long-polling up to ``wait_s`` seconds (0..20)."""
    response = (client or sqs_client()).receive_message(
        QueueUrl=queue_url,
        MaxNumberOfMessages=max(1, min(max_messages, BATCH)),
        WaitTimeSeconds=max(0, min(wait_s, 20)),
        MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
    )
    return [
        Message(
            queue_url=queue_url,
            message_id=m["MessageId"],
            receipt_handle=m["ReceiptHandle"],
            body=m["Body"],
            receive_count=int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
            sent_at=int(m.get("Attributes", {}).get("SentTimestamp", 0)) / 1000.0,
        )
        for m in response.get("Messages", [])
    ]


def delete_message(message: Message, client: Any = None) -> None:
    """Delete a message once its work is recorded."""
    (client or sqs_client()).delete_message(QueueUrl=message.queue_url, ReceiptHandle=message.receipt_handle)


def set_visibility(message: Message, seconds: int, client: Any = None) -> None:
    """Hide a received message for ``seconds`` from now (0 makes it visible again at once)."""
    (client or sqs_client()).change_message_visibility(
        QueueUrl=message.queue_url, ReceiptHandle=message.receipt_handle, VisibilityTimeout=int(seconds)
    )


class Heartbeat:
    """Keeps a received message hidden while its work runs, by extending its visibility on a thread.

    Every ``visibility_s / 3`` seconds the message's visibility is set to ``visibility_s`` from now, so a
    live worker never loses its message however long the work takes, while a worker that dies stops beating
    and its message comes back within one visibility timeout. ``on_beat`` runs after each extension (the
    model runner extends its region lease there). Failures are logged, never raised into the work.

    Use as a context manager around the work::

        with Heartbeat(message, visibility_s=settings.visibility_timeout_s):
            do_the_work()
    """

    def __init__(
        self,
        message: Message,
        *,
        visibility_s: int,
        client: Any = None,
        on_beat: Callable[[], None] | None = None,
        interval_s: float | None = None,
    ) -> None:
        self.message = message
        self.visibility_s = max(1, int(visibility_s))
        self.interval_s = interval_s if interval_s is not None else self.visibility_s / 3
        self.client = client or sqs_client()
        self.on_beat = on_beat
        #: Successful visibility extensions so far.
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{message.message_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                set_visibility(self.message, self.visibility_s, self.client)
                self.beats += 1
            except Exception:  # the work goes on; at worst the message is redelivered
                log.warning(
                    "could not extend the visibility of message %s", self.message.message_id, exc_info=True
                )
                continue
            if self.on_beat is not None:
                try:
                    self.on_beat()
                except Exception:
                    log.warning("heartbeat callback failed", exc_info=True)

    def start(self) -> Heartbeat:
        """Start beating; call once."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and wait for the thread to end."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
