"""The model runner's worker loop: serve the region queue first, then the image queue, one message at a time.

Each message is handled under a visibility heartbeat (which also extends the region or finalisation lease
the message holds). The message is deleted once its work is recorded; a message another worker is busy
with is hidden until that worker's lease lapses; after an unexpected error the message is left alone, so
SQS delivers it again and, after ``maxReceiveCount`` deliveries, moves it to the dead-letter queue.

Stopping (SIGTERM) drains: the region in hand may finish for the drain time; then its model's batches are
stopped, the region is handed back (PENDING) and its message made visible at once, so another worker takes
it over without waiting for the visibility timeout. A batch that runs past ``TESSERA_BATCH_TIMEOUT_S`` fails
its region with the reason; one that cannot even be stopped makes the worker exit to be restarted.

Run it as ``tessera worker model-runner`` (or ``python -m services.model_runner.worker``); it reads the
environment the platform gives the container (see ``services/cloud/embedded.py`` for the names).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.cloud import database, objects
from services.cloud.queue import (
    Heartbeat,
    Message,
    QueueSettings,
    queue_settings,
    receive_messages,
    sqs_client,
)
from services.errors import UserError
from services.inference.run_control import RunStoppedError
from services.jobs.queue_worker import QueueWorker, last_delivery, reconnected, settle
from services.model_runner import handler, jobs
from services.model_runner.metrics import Metrics

log = logging.getLogger(__name__)

IMAGE_QUEUE_ENV = "TESSERA_QUEUE_IMAGE_REQUESTS_URL"
REGION_QUEUE_ENV = "TESSERA_QUEUE_REGION_REQUESTS_URL"


@dataclass(frozen=True)
class WorkerSettings:
    """Where a worker takes its work from, and how."""

    region_queue_url: str
    image_queue_url: str | None = None
    database_url: str | None = None
    worker_id: str = ""
    providers: str = "auto"
    #: Seconds a receive long-polls the region queue when both queues were empty last time.
    wait_s: int = 1
    #: Stop after handling this many messages (None: serve until stopped).
    max_messages: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Settings from the container environment (queue URLs, database); ``overrides`` win."""
        env = os.environ if env is None else env
        region = overrides.pop("region_queue_url", None) or env.get(REGION_QUEUE_ENV)
        if not region:
            raise UserError(f"{REGION_QUEUE_ENV} is not set: the worker needs the region queue's URL")
        return cls(
            region_queue_url=region,
            image_queue_url=overrides.pop("image_queue_url", None) or env.get(IMAGE_QUEUE_ENV),
            **overrides,
        )


class Worker(QueueWorker):
    """Serves the region and image queues until stopped (or ``max_messages`` are handled)."""

    def __init__(self, settings: WorkerSettings, *, metrics: Metrics | None = None) -> None:
        super().__init__(settings.worker_id, settings.max_messages)
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.sqs = sqs_client()
        self.s3 = objects.s3_client()
        self.region_queue: QueueSettings = queue_settings(settings.region_queue_url, self.sqs)
        self.image_queue: QueueSettings | None = (
            queue_settings(settings.image_queue_url, self.sqs) if settings.image_queue_url else None
        )
        self.database_url = settings.database_url or database.database_url()
        self.conn = database.connect(self.database_url)
        database.apply_migrations(self.conn)
        # The heartbeat thread extends leases on its own connection, never inside the main thread's work.
        self.lease_conn = database.connect(self.database_url)
        self.detectors = handler.DetectorCache(settings.providers, s3_client=self.s3)

    def context(self) -> handler.Context:
        """What the handlers get; the lease is half the region queue's visibility timeout."""
        return handler.Context(
            conn=self.conn,
            worker=self.worker_id,
            region_queue_url=self.settings.region_queue_url,
            lease_s=self.region_queue.visibility_timeout_s / 2,
            detectors=self.detectors,
            metrics=self.metrics,
            sqs=self.sqs,
            s3=self.s3,
            s3_endpoint=os.environ.get("AWS_ENDPOINT_URL") or None,
        )

    def poll(self, wait_s: int | None = None) -> bool:
        """Receive and handle at most one message, region queue first; False when both queues were empty."""
        self._reconnect_if_needed()
        wait = self.settings.wait_s if wait_s is None else wait_s
        queues: list[tuple[str, str, QueueSettings]] = [
            ("region", self.settings.region_queue_url, self.region_queue)
        ]
        if self.settings.image_queue_url and self.image_queue is not None:
            queues.append(("image", self.settings.image_queue_url, self.image_queue))
        for position, (kind, url, queue) in enumerate(queues):
            # Long-poll only the last queue, so the region queue is never starved by a wait on the other.
            last = position == len(queues) - 1
            messages = receive_messages(url, max_messages=1, wait_s=wait if last else 0, client=self.sqs)
            if messages:
                self.handle(kind, messages[0], queue)
                return True
        return False

    def handle(self, kind: str, message: Message, queue: QueueSettings) -> None:
        """Handle one message under a heartbeat; delete, hide or leave it according to the outcome."""
        self.metrics.record(
            {"QueueLag": max(0.0, time.time() - message.sent_at)}, Queue=kind, Worker=self.worker_id
        )
        ctx = self.context()
        leases = handler.Leases(self.lease_conn, self.worker_id, ctx.lease_s)
        beat = Heartbeat(
            message, visibility_s=queue.visibility_timeout_s, client=self.sqs, on_beat=leases.extend
        )
        try:
            with beat:
                if kind == "region":
                    outcome = handler.handle_region_request(ctx, message, leases)
                else:
                    outcome = handler.handle_image_request(ctx, message)
        except RunStoppedError as stopped:
            self._hand_back(kind, message, str(stopped))
            return
        except Exception as error:
            last = last_delivery(message, queue)
            log.exception(
                "%s message %s failed unexpectedly (delivery %d%s); it will be delivered again",
                kind,
                message.message_id,
                message.receive_count,
                f" of {queue.max_receive_count}" if queue.max_receive_count else "",
            )
            try:
                self._reconnect_if_needed()
                handler.on_unexpected(self.context(), message, kind, error, last_attempt=last)
            except Exception:
                log.exception("cleaning up after the failed message failed too")
            self.handled += 1
            return
        self.handled += 1
        log.info("%s message %s: %s", kind, message.message_id, outcome.note)
        settle(message, self.sqs, delete=outcome.delete, defer_s=outcome.defer_s)

    def abort(self, reason: str) -> None:
        """Stop the batches of the region in hand; :meth:`handle` hands the region and its message back."""
        log.warning(
            "worker %s: %s; stopping the model and handing the region in hand back", self.worker_id, reason
        )
        self.detectors.stop(f"the worker is stopping ({reason})")

    @property
    def restart_needed(self) -> bool:
        """Whether a model batch outlived its timeout and did not stop (a thread is lost to this process)."""
        return self.detectors.stuck

    def restart_reason(self) -> str:
        """Which limit the lost batch outlived."""
        return "a model batch ran past TESSERA_BATCH_TIMEOUT_S and did not stop when told"

    def _hand_back(self, kind: str, message: Message, reason: str) -> None:
        """The work was stopped before it was done: its region back to PENDING, its message visible now."""
        try:
            self._reconnect_if_needed()
            if kind == "region":
                region = handler.parse_region_request(message.body)
                jobs.release_region(
                    self.conn, region.job_id, region.index, self.worker_id, f"handed back: {reason}"
                )
            settle(message, self.sqs, delete=False, defer_s=0)
            log.info("%s message %s handed back: %s", kind, message.message_id, reason)
        except Exception:
            log.exception(
                "handing %s message %s back failed; it returns after its visibility timeout",
                kind,
                message.message_id,
            )

    def describe(self) -> str:
        """The queues, in the order they are served."""
        return f"{self.settings.region_queue_url} then {self.settings.image_queue_url or '(no image queue)'}"

    def close(self) -> None:
        """Close the detectors' threads and the database connections."""
        self.detectors.close()
        for conn in (self.conn, self.lease_conn):
            conn.close()

    def _reconnect_if_needed(self) -> None:
        self.conn = reconnected(self.conn, self.database_url)
        self.lease_conn = reconnected(self.lease_conn, self.database_url)


def main() -> int:
    """``python -m services.model_runner.worker``: serve with settings from the environment."""
    from services.model_runner.commands import main as commands_main

    return commands_main(["worker", "model-runner"])


if __name__ == "__main__":
    raise SystemExit(main())
