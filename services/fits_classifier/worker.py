"""The frame classifier's worker: S3 event notifications in, verdicts recorded, annotated copies out.

The imagery bucket notifies the ``fits-frames`` queue of every object created under its incoming prefix
(``fits/incoming/``; the Pulumi program and the embedded default wire it). For each record of a message the
worker

1. checks the object is one it may read: an allowed bucket (the worker's trust policy) and a key under the
   incoming prefix (``TESSERA_FITS_INCOMING_PREFIX``); anything else is refused and logged, never read;
2. reads the frame (objects over :data:`~services.frames.reading.MAX_FITS_BYTES` are not loaded: their
   verdict says so), and computes its checksum: a frame this model already judged (a redelivered event,
   the same file uploaded twice) is not judged again;
3. judges it; writes a copy with the verdict in its header to the results bucket
   (``s3://<results>/fits/annotated/<checksum12>-<name>``), then records the verdict in PostgreSQL, once per
   (checksum, model version). An unreadable frame is recorded UNREADABLE with the reason.

The message is deleted when every record is settled. An object deleted before it was read is logged and
skipped; a message that is not an S3 event (or S3's ``s3:TestEvent``) is logged and deleted. A database or
S3 outage leaves the message on the queue (the worker backs off and retries), and a frame that crashes the
worker every time reaches the dead-letter queue after the queue's ``maxReceiveCount`` deliveries.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from botocore.exceptions import ClientError

from services.cloud.events import FITS_INCOMING_PREFIX
from services.cloud.queue import Message
from services.errors import UserError
from services.fits_classifier import records
from services.fits_classifier.model import FrameClassifier
from services.fits_classifier.output import AnnotatedStore
from services.fits_classifier.sources import (
    FrameSource,
    is_fits_name,
    oversized_reason,
    s3_source,
    streamed_checksum,
)
from services.fits_classifier.verdicts import CLASSIFIED, Verdict, checksum, judge, unreadable
from services.jobs.queue_worker import (
    QueueWorker,
    QueueWorkerSettings,
    ServedQueue,
    Settlement,
    optional_setting,
    setting,
)
from services.jobs.trust import TrustError, policy_in_force, s3_location

log = logging.getLogger(__name__)

QUEUE_ENV = "TESSERA_QUEUE_FITS_FRAMES_URL"
RESULTS_BUCKET_ENV = "TESSERA_BUCKET_RESULTS"
INCOMING_ENV = "TESSERA_FITS_INCOMING_PREFIX"
ANNOTATED_ENV = "TESSERA_FITS_ANNOTATED"
#: The prefix the platform's notification route watches: ``services.cloud.events.FITS_INCOMING_PREFIX``, the
#: one definition (this name stays for the tests that hold the two together).
DEFAULT_INCOMING_PREFIX = FITS_INCOMING_PREFIX
ANNOTATED_PREFIX = "fits/annotated/"


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(QueueWorkerSettings):
    """Where the worker takes frames from, which model it runs and where its copies go."""

    queue_url: str
    annotated: str
    model: str | None = None
    incoming_prefix: str = FITS_INCOMING_PREFIX
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Settings from the container environment; ``overrides`` win."""
        env = os.environ if env is None else env
        needed = "the frame classifier needs the fits-frames queue's URL"
        queue = setting(env, overrides, "queue_url", QUEUE_ENV, needed)
        annotated = optional_setting(env, overrides, "annotated", ANNOTATED_ENV)
        if not annotated:
            results = env.get(RESULTS_BUCKET_ENV)
            if not results:
                raise UserError(
                    f"neither {ANNOTATED_ENV} nor {RESULTS_BUCKET_ENV} is set: say where annotated frames go"
                )
            annotated = f"s3://{results}/{ANNOTATED_PREFIX}"
        prefix = optional_setting(env, overrides, "incoming_prefix", INCOMING_ENV) or FITS_INCOMING_PREFIX
        model = optional_setting(env, overrides, "model", "TESSERA_FITS_MODEL")
        return cls(queue_url=queue, annotated=annotated, incoming_prefix=prefix, model=model, **overrides)


@dataclass(frozen=True)
class FrameEvent:
    """One S3 object-created record: the bucket, the key (decoded) and the size S3 reported."""

    bucket: str
    key: str
    size: int


def frame_events(body: str) -> list[FrameEvent]:
    """The object-created records of an S3 event notification; [] for S3's test event.

    UserError when ``body`` is not an S3 event notification at all.
    """
    try:
        document = json.loads(body)
    except json.JSONDecodeError as error:
        raise UserError(f"the message is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise UserError("the message is not an S3 event notification (a JSON object with Records)")
    if document.get("Event") == "s3:TestEvent":
        return []
    found = document.get("Records")
    if not isinstance(found, list) or not found:
        raise UserError("the message is not an S3 event notification: it has no Records")
    events = []
    for index, item in enumerate(found):
        try:
            name = str(item["eventName"])
            s3 = item["s3"]
            bucket, key = str(s3["bucket"]["name"]), unquote_plus(str(s3["object"]["key"]))
            size = int(s3["object"].get("size", 0))
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"Records[{index}] is not an S3 object record: missing {error}") from None
        if not name.startswith("ObjectCreated:"):
            log.info("ignoring %s of s3://%s/%s", name, bucket, key)
            continue
        events.append(FrameEvent(bucket, key, size))
    return events


class Worker(QueueWorker[WorkerSettings]):
    """Serves the fits-frames queue until stopped (or ``max_messages`` are handled)."""

    def __init__(self, settings: WorkerSettings, classifier: FrameClassifier | None = None) -> None:
        super().__init__(settings)
        self.open_queues(("frame event", settings.queue_url))
        self.open_database()
        if classifier is None:
            from services.fits_classifier.commands import load_classifier

            classifier = load_classifier(settings.model)
        self.classifier: FrameClassifier = classifier
        self.store = AnnotatedStore(settings.annotated, s3_client=self.s3)

    def describe(self) -> str:
        """What the worker serves."""
        return f"{self.settings.queue_url} with {self.classifier.describe()}"

    def work(self, message: Message, queue: ServedQueue) -> Settlement:
        """Every frame of one event message; the message deleted when all are settled."""
        try:
            events = frame_events(message.body)
        except UserError as error:
            log.warning("worker %s: dropping message %s: %s", self.worker_id, message.message_id, error)
            events = []
        for event in events:
            self.classify_event(event)
        return Settlement(delete=True)

    def failed(self, message: Message, queue: ServedQueue, error: Exception) -> None:
        """Out of :meth:`poll`: :meth:`serve` backs off on an outage, and any other error ends the worker (a
        frame that does so every time reaches the dead-letter queue); the message stays on the queue."""
        raise error

    def classify_event(self, event: FrameEvent) -> Verdict | None:
        """Judge, store and record one frame; None when it is refused, gone or already judged (logged)."""
        url = f"s3://{event.bucket}/{event.key}"
        problem = self._refusal(url, event)
        if problem:
            log.warning("worker %s: refusing %s: %s", self.worker_id, url, problem)
            return None
        started = time.perf_counter()
        try:
            source = _object_source(self.s3, event)
            oversized = oversized_reason(source)
            raw = b"" if oversized else source.load()
            digest = streamed_checksum(source) if oversized else checksum(raw)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
                log.warning("worker %s: %s was deleted before it could be read; skipped", self.worker_id, url)
                return None
            raise
        existing = records.find(self.conn, digest, self.classifier.name, self.classifier.version)
        if existing is not None:
            log.info("%s: judged %s by this model before (verdict %d)", url, existing.verdict, existing.id)
            return None
        if oversized:
            verdict = unreadable(
                self.classifier, url, b"", oversized, started=started, digest=digest, size=source.size
            )
        else:
            [verdict] = judge(self.classifier, [(url, raw)])
        annotated = self.store.put(verdict, raw) if verdict.status == CLASSIFIED else None
        records.record(self.conn, verdict, annotated=annotated)
        score = "" if verdict.score is None else f" {verdict.score:.3f}"
        log.info("%s: %s%s%s", url, verdict.verdict, score, f" ({verdict.reason})" if verdict.reason else "")
        return verdict

    def _refusal(self, url: str, event: FrameEvent) -> str | None:
        try:
            s3_location(url, policy_in_force(), what="frame")
        except TrustError as error:
            return str(error)
        if not event.key.startswith(self.settings.incoming_prefix):
            return f"the key is not under the incoming prefix {self.settings.incoming_prefix}"
        if not is_fits_name(event.key.rsplit("/", 1)[-1]):
            return "the name is not a FITS file's (.fits, .fit, .fts, their .gz forms or .fz)"
        return None


def _object_source(client: Any, event: FrameEvent) -> FrameSource:
    """The event's object as a frame source (its size asked of S3, not taken from the message)."""
    head = client.head_object(Bucket=event.bucket, Key=event.key)
    return s3_source(client, event.bucket, event.key, int(head["ContentLength"]))
