"""The sky generator's worker: sky jobs in, shards out, frames and labels stored.

One queue (``sky-requests``) carries two kinds of message:

- a **job** (``tessera.sky-job/v1``, what ``tessera sky submit`` sends): checked under the worker's trust
  policy, recorded with its shards in PostgreSQL, and fanned out as one **shard** message per open shard;
  a job delivered again resumes (its open shards are sent again), a finished one is just deleted; a bad
  one is recorded FAILED with every problem and its JSON path.
- a **shard** (``tessera.sky-shard/v1``): claimed under a lease (extended by the message's heartbeat),
  rendered with Stellarium in a scratch directory, every frame's geometry checked, the frames and the
  shard's manifest part stored under fixed names, then recorded DONE once; the worker that closes the last
  open shard merges the parts into ``manifest.jsonl`` and ends the job SUCCESS, PARTIAL or FAILED with the
  reasons.

A frame that fails the geometry check, or a job that cannot be rendered (a nightless time range), fails its
shard at once; a Stellarium that hangs or crashes hands the shard back to be tried again, and fails it on
the queue's last delivery. Run it as ``tessera worker sky-generator``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.cloud.queue import Heartbeat, Message, send_messages
from services.errors import UserError
from services.jobs.documents import job_id_of, new_job_id
from services.jobs.queue_worker import (
    QueueWorker,
    QueueWorkerSettings,
    ServedQueue,
    Settlement,
    last_delivery,
    setting,
)
from services.sky_generator import records
from services.sky_generator.job import SkyJob, parse_job, samples
from services.sky_generator.shards import (
    FRAMES_DIR,
    MANIFEST,
    PARTS_DIR,
    GeometryError,
    merge_parts,
    part_name,
    render_shard,
)
from services.sky_generator.stellarium import RenderError, stellarium_version
from services.sky_generator.store import JobStore

log = logging.getLogger(__name__)

QUEUE_ENV = "TESSERA_QUEUE_SKY_REQUESTS_URL"
SHARD_SCHEMA = "tessera.sky-shard/v1"
#: Seconds past a live lease before a message held by another worker is looked at again.
LEASE_SLACK_S = 2.0


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(QueueWorkerSettings):
    """Where the worker takes its work from, and how."""

    queue_url: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Settings from the container environment; ``overrides`` win."""
        needed = "the sky generator needs the sky-requests queue's URL"
        return cls(queue_url=setting(env, overrides, "queue_url", QUEUE_ENV, needed), **overrides)


def shard_message(job_id: str, shard: int) -> dict[str, Any]:
    """The body of a shard message."""
    return {"schema": SHARD_SCHEMA, "job_id": job_id, "shard": shard}


class Worker(QueueWorker[WorkerSettings]):
    """Serves the sky-requests queue until stopped (or ``max_messages`` are handled). A message is deleted
    when handled, hidden when another worker holds its shard, and left to be delivered again after an
    unexpected error (:meth:`QueueWorker.failed`)."""

    def __init__(self, settings: WorkerSettings) -> None:
        super().__init__(settings)
        self.open_queues(("sky", settings.queue_url))
        self.open_database(lease_conn=True)
        self.version = stellarium_version()
        #: Set by :meth:`abort`: the Stellarium in hand is stopped and its shard handed back.
        self.cancel = threading.Event()
        #: The shards the message in hand holds: the heartbeat extends their leases.
        self.held: list[tuple[str, int]] = []

    def heartbeat(self, message: Message, queue: ServedQueue) -> Heartbeat:
        """A heartbeat that also extends the lease of the shard in hand."""
        return Heartbeat(
            message, visibility_s=queue.visibility_timeout_s, client=self.sqs, on_beat=self._extend_leases
        )

    def _extend_leases(self) -> None:
        for job_id, shard in list(self.held):
            records.extend_lease(self.lease_conn, job_id, shard, self.worker_id, self.lease_s)

    def work(self, message: Message, queue: ServedQueue) -> Settlement:
        """A shard message renders its shard; any other is a job."""
        body = _body(message.body)
        if body.get("schema") == SHARD_SCHEMA:
            return self.handle_shard(message, queue, body)
        return Settlement(delete=self.handle_job(message))

    # ---- jobs -------------------------------------------------------------------------------------------

    def handle_job(self, message: Message) -> bool:
        """Record a job and its shards, and send one message per open shard; True (delete the message)."""
        try:
            job = parse_job(message.body)
        except UserError as error:
            job_id = job_id_of(message.body) or new_job_id()
            raw = _body(message.body)
            if not records.create_job(self.conn, raw or {"job_id": job_id}, output="", shard_frames=[]):
                job_id = new_job_id()  # the id is another job's: record the refusal under a fresh one
                records.create_job(self.conn, {"job_id": job_id, "refused": raw}, output="", shard_frames=[])
            records.fail_job(self.conn, job_id, str(error))
            log.warning("sky job %s FAILED: %s", job_id, error)
            return True
        per = job.frames_per_shard
        sizes = [min(per, job.count - s * per) for s in range(job.shards)]
        created = records.create_job(self.conn, job.to_json(), output=job.output, shard_frames=sizes)
        record = records.get_job(self.conn, job.job_id)
        if not created and record is not None and record.status in records.FINAL:
            log.info("sky job %s is %s already", job.job_id, record.status)
            return True
        try:
            samples(job, 0)  # a time range with no night fails here, before any shard is sent
        except UserError as error:
            records.fail_job(self.conn, job.job_id, str(error))
            log.warning("sky job %s FAILED: %s", job.job_id, error)
            return True
        open_now = records.open_shards(self.conn, job.job_id)
        send_messages(self.settings.queue_url, [shard_message(job.job_id, s) for s in open_now], self.sqs)
        records.mark_in_progress(self.conn, job.job_id)
        log.info("sky job %s: %d frames, %d shard messages sent", job.job_id, job.count, len(open_now))
        return True

    # ---- shards -----------------------------------------------------------------------------------------

    def handle_shard(self, message: Message, queue: ServedQueue, body: Mapping[str, Any]) -> Settlement:
        """Render one shard at most once; delete the message, or hide it while another worker holds it."""
        job_id, shard = str(body.get("job_id")), body.get("shard")
        if not isinstance(shard, int):
            log.warning("shard message without a shard number: %s", message.body[:200])
            return Settlement(delete=True)
        claim = records.claim_shard(self.conn, job_id, shard, self.worker_id, self.lease_s)
        if claim.state == "leased":
            return Settlement(delete=False, defer_s=claim.lease_left_s + LEASE_SLACK_S)
        if claim.state in ("missing", "finished"):
            self.finalise(job_id)
            return Settlement(delete=True)
        record = records.get_job(self.conn, job_id)
        assert record is not None
        job = parse_job(record.job)
        self.held.append((job_id, shard))
        try:
            result = self.render(job, shard)
        except (GeometryError, UserError) as error:
            records.fail_shard(self.conn, job_id, shard, str(error))
            log.warning("sky job %s shard %d FAILED: %s", job_id, shard, error)
        except RenderError as error:
            if self.cancel.is_set():
                records.release_shard(self.conn, job_id, shard, self.worker_id, f"handed back: {error}")
                return Settlement(delete=False, defer_s=0)
            if last_delivery(message, queue):
                records.fail_shard(
                    self.conn, job_id, shard, f"gave up after {message.receive_count} tries: {error}"
                )
            else:
                records.release_shard(self.conn, job_id, shard, self.worker_id, str(error))
                log.warning("sky job %s shard %d: %s; it will be tried again", job_id, shard, error)
                return Settlement(delete=False)
        else:
            records.complete_shard(
                self.conn,
                job_id,
                shard,
                self.worker_id,
                result.seconds,
                len(result.checked),
                result.median_px,
                result.worst_px,
            )
            log.info(
                "sky job %s shard %d: %d frames in %.1f s", job_id, shard, len(result.rows), result.seconds
            )
        finally:
            self.held.remove((job_id, shard))
        self.finalise(job_id)
        return Settlement(delete=True)

    def render(self, job: SkyJob, shard: int) -> Any:
        """Render the shard in a scratch directory and store its frames, then its manifest part."""
        store = JobStore(job.output, job.job_id, s3_client=self.s3)
        with tempfile.TemporaryDirectory(prefix=f"tessera-sky-{job.job_id}-{shard}-") as scratch:
            work = Path(scratch)
            result = render_shard(job, shard, work, version=self.version, cancel=self.cancel)
            for path in result.frames:
                store.put_file(f"{FRAMES_DIR}/{path.name}", path, "image/png")
            store.put_file(part_name(shard), work / part_name(shard), "application/x-ndjson")
        return result

    def finalise(self, job_id: str) -> None:
        """When no shard is open: merge the parts into the manifest and close the job (once)."""
        if records.open_shards(self.conn, job_id):
            return
        record = records.get_job(self.conn, job_id)
        if record is None or record.status in records.FINAL:
            return
        store = JobStore(record.output, job_id, s3_client=self.s3)
        merged = merge_parts(store.texts(PARTS_DIR))
        manifest = None
        if merged:
            store.put_text(MANIFEST, merged)
            manifest = store.uri(MANIFEST)
        status = records.finish_job(self.conn, job_id, manifest=manifest)
        if status is not None:
            log.info("sky job %s %s: %s", job_id, status, manifest or "no frames")

    def abort(self, reason: str) -> None:
        """Stop the Stellarium in hand; its shard is handed back (PENDING) and its message made visible."""
        log.warning("worker %s: %s; stopping Stellarium and handing the shard back", self.worker_id, reason)
        self.cancel.set()


def _body(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def main() -> int:
    """``python -m services.sky_generator.worker``: serve with settings from the environment."""
    from services.cli import main as cli_main

    return cli_main(["worker", "sky-generator"])


if __name__ == "__main__":
    raise SystemExit(main())
