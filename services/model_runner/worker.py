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

from services.cloud.queue import Heartbeat, Message
from services.inference.run_control import RunStoppedError
from services.jobs.queue_worker import (
    QueueWorker,
    QueueWorkerSettings,
    ServedQueue,
    last_delivery,
    setting,
    settle,
)
from services.model_runner import handler, jobs
from services.model_runner.metrics import Metrics

log = logging.getLogger(__name__)

IMAGE_QUEUE_ENV = "TESSERA_QUEUE_IMAGE_REQUESTS_URL"
REGION_QUEUE_ENV = "TESSERA_QUEUE_REGION_REQUESTS_URL"


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(QueueWorkerSettings):
    """Where a worker takes its work from, and how (``wait_s``: the region queue's long-poll when both queues
    were empty last time)."""

    region_queue_url: str
    image_queue_url: str | None = None
    providers: str = "auto"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Settings from the container environment (queue URLs, database); ``overrides`` win."""
        needed = "the worker needs the region queue's URL"
        region = setting(env, overrides, "region_queue_url", REGION_QUEUE_ENV, needed)
        image = overrides.pop("image_queue_url", None) or (os.environ if env is None else env).get(
            IMAGE_QUEUE_ENV
        )
        return cls(region_queue_url=region, image_queue_url=image, **overrides)


class Worker(QueueWorker[WorkerSettings]):
    """Serves the region and image queues until stopped (or ``max_messages`` are handled)."""

    #: The leases of the message in hand (made with its heartbeat, which extends them).
    leases: handler.Leases

    def __init__(self, settings: WorkerSettings, *, metrics: Metrics | None = None) -> None:
        super().__init__(settings)
        self.metrics = metrics or Metrics()
        # The region queue first, so it is never starved by a wait on the image queue.
        queues = [("region", settings.region_queue_url)]
        if settings.image_queue_url:
            queues.append(("image", settings.image_queue_url))
        self.open_queues(*queues)
        self.open_database(lease_conn=True)
        self.detectors = handler.DetectorCache(settings.providers, s3_client=self.s3)

    def context(self) -> handler.Context:
        """What the handlers get; the lease is half the region queue's visibility timeout."""
        return handler.Context(
            conn=self.conn,
            worker=self.worker_id,
            region_queue_url=self.settings.region_queue_url,
            lease_s=self.lease_s,
            detectors=self.detectors,
            metrics=self.metrics,
            sqs=self.sqs,
            s3=self.s3,
            s3_endpoint=os.environ.get("AWS_ENDPOINT_URL") or None,
        )

    def handle(self, message: Message, queue: ServedQueue) -> None:
        """Record the message's queue lag, then handle it (see :meth:`QueueWorker.handle`)."""
        self.metrics.record(
            {"QueueLag": max(0.0, time.time() - message.sent_at)}, Queue=queue.kind, Worker=self.worker_id
        )
        super().handle(message, queue)

    def heartbeat(self, message: Message, queue: ServedQueue) -> Heartbeat:
        """A heartbeat that also extends the leases of the regions (or finalisation) the message holds."""
        self.leases = handler.Leases(self.lease_conn, self.worker_id, self.lease_s)
        return Heartbeat(
            message, visibility_s=queue.visibility_timeout_s, client=self.sqs, on_beat=self.leases.extend
        )

    def work(self, message: Message, queue: ServedQueue) -> handler.Outcome:
        """Run a region, or split an image request into regions."""
        if queue.kind == "region":
            return handler.handle_region_request(self.context(), message, self.leases)
        return handler.handle_image_request(self.context(), message)

    def failed(self, message: Message, queue: ServedQueue, error: Exception) -> None:
        """A stopped run is handed back; any other error is recorded on its job (failed on the last
        delivery) and the message left to be delivered again."""
        if isinstance(error, RunStoppedError):
            self._hand_back(queue.kind, message, str(error))
            return
        log.exception(
            "%s message %s failed unexpectedly (delivery %d%s); it will be delivered again",
            queue.kind,
            message.message_id,
            message.receive_count,
            f" of {queue.max_receive_count}" if queue.max_receive_count else "",
        )
        try:
            self.reconnect()
            last = last_delivery(message, queue)
            handler.on_unexpected(self.context(), message, queue.kind, error, last_attempt=last)
        except Exception:
            log.exception("cleaning up after the failed message failed too")

    def abort(self, reason: str) -> None:
        """Stop the batches of the region in hand; :meth:`failed` hands the region and its message back."""
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
            self.reconnect()
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
        super().close()


def main() -> int:
    """``python -m services.model_runner.worker``: serve with settings from the environment."""
    from services.model_runner.commands import main as commands_main

    return commands_main(["worker", "model-runner"])


if __name__ == "__main__":
    raise SystemExit(main())
