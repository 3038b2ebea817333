"""S3 event notifications: which bucket prefixes notify which work queue, and what S3 puts on the queue.

This module is the one place that says it. The Pulumi program (``stacks/program.py``, component
``infra/notifications.py``) wires each :data:`NOTIFICATIONS` route on AWS, and the embedded default
(:func:`services.cloud.embedded.create_resources`) wires the same routes on moto, so a worker reads the same
messages on both. It imports nothing but the standard library: services import it without Pulumi, and the
program imports it without boto3.

What a route puts on its queue, one message per object (``Records`` holds one record)::

    {"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
                  "eventTime": "2026-12-05T06:48:15.363Z", "eventName": "ObjectCreated:Put",
                  "s3": {"s3SchemaVersion": "1.0", "configurationId": "fits-frames-incoming",
                         "bucket": {"name": "<bucket>", "arn": "arn:aws:s3:::<bucket>"},
                         "object": {"key": "fits/incoming/night+1.fits", "size": 2880, "eTag": "..."}}}]}

``object.key`` is URL-encoded (``urllib.parse.unquote_plus`` decodes it: a space arrives as ``+``). AWS adds
fields moto leaves out (``userIdentity``, ``requestParameters``, ``responseElements``,
``bucket.ownerIdentity``, ``object.sequencer``, and ``object.versionId`` in a versioned bucket such as the
platform's imagery bucket); moto encodes ``/`` in keys as ``%2F`` where AWS leaves it. ``eventName`` is one
of ``ObjectCreated:Put``, ``:Post``, ``:Copy`` or ``:CompleteMultipartUpload`` for :data:`OBJECT_CREATED`.

When a bucket's notification configuration is put (``pulumi up``, or the embedded default starting), S3
sends each destination queue one test message, which is not an event and has no ``Records``::

    {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-12-05T06:48:15.354Z",
     "Bucket": "<bucket>"}

(AWS adds ``RequestId`` and ``HostId``.) A worker deletes it and goes on: :func:`is_test_event` tells it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Where telescope frames arrive in the imagery bucket; each object created under it is one message on the
#: ``fits-frames`` queue (the frame classifier reads under ``fits/``, see ``stacks/services.py``).
FITS_INCOMING_PREFIX = "fits/incoming/"
#: Every way an object comes to exist: PUT, POST, copy, and a completed multipart upload.
OBJECT_CREATED = "s3:ObjectCreated:*"
#: The ``Event`` of the message S3 sends a queue when a notification configuration naming it is put.
TEST_EVENT = "s3:TestEvent"

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")


@dataclass(frozen=True)
class NotificationRoute:
    """Objects created under ``prefix`` of a bucket become messages on a work queue."""

    id: str
    """The configuration id: the records' ``s3.configurationId``; unique among a bucket's routes."""
    bucket: str
    """The bucket, by purpose (``imagery``: ``infra/storage.py`` DEFAULT_BUCKETS)."""
    queue: str
    """The work queue, by purpose (``fits-frames``: ``infra/queues.py`` DEFAULT_QUEUES)."""
    prefix: str
    """Only keys starting with this notify; it ends in ``/`` so that ``fits/incoming-old/`` is not matched."""
    events: tuple[str, ...] = (OBJECT_CREATED,)
    """The S3 event types that notify."""

    def __post_init__(self) -> None:
        if not _ID.match(self.id):
            raise ValueError(
                f"NotificationRoute.id={self.id!r}: use letters, digits and hyphens (at most 64 characters)"
            )
        if not self.prefix.endswith("/") or self.prefix.startswith("/"):
            raise ValueError(
                f"NotificationRoute({self.id!r}).prefix={self.prefix!r}: give a key prefix such as "
                "'fits/incoming/' (no leading '/', a trailing '/')"
            )
        if not self.events or not all(e.startswith("s3:") for e in self.events):
            raise ValueError(
                f"NotificationRoute({self.id!r}).events={self.events!r}: name S3 event types such as "
                f"{OBJECT_CREATED!r}"
            )


#: The platform's routes. One bucket notifies one queue per route; a queue may be fed by several buckets.
NOTIFICATIONS: tuple[NotificationRoute, ...] = (
    # Telescope frames as they arrive, for the frame classifier (``tessera worker fits-classifier``).
    NotificationRoute(
        "fits-frames-incoming", bucket="imagery", queue="fits-frames", prefix=FITS_INCOMING_PREFIX
    ),
)


def is_test_event(message: Mapping[str, Any]) -> bool:
    """Whether a decoded message body is S3's test message rather than an event notification."""
    return message.get("Event") == TEST_EVENT and "Records" not in message
