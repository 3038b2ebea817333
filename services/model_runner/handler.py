"""One message: an image request (validate, record the job, plan regions, fan them out) or a region
request (claim the region, detect, store the result once, finalise the job if it was the last).

Handlers return what to do with the message (:class:`Outcome`); the worker deletes it, or hides it for a
while, after the handler returns. Errors a user can cause (UserError) are recorded as the job's or the
region's failure here and the message is deleted; any other exception propagates to the worker, which
leaves the message to be redelivered (and calls :func:`on_unexpected` to hand the region back).

Leases. A claimed region is held for half the queue's visibility timeout and the heartbeat extends both
together (visibility first), so a held lease never outlives the message: when a worker dies, its message
comes back after its lease has lapsed and the next worker takes the region over at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import psycopg

from services.cloud import objects
from services.cloud.queue import Message, send_messages
from services.errors import UserError
from services.inference.detector import Detector, OnnxDetector
from services.inference.run_control import RunStoppedError
from services.jobs.documents import job_id_of, new_job_id
from services.model_runner import jobs
from services.model_runner.metrics import Metrics
from services.model_runner.model_setup import input_scaling, open_detector, settle_grid
from services.model_runner.outputs import write_outputs
from services.model_runner.pipeline import detect_region, merge_seams, plan_job, region_tiles, roi_polygon
from services.model_runner.request import ImageRequest, local_model_path, parse_request
from services.registry import is_registry_ref, resolve_model_uri
from services.tiling.reader import RasterSource
from services.tiling.scaling import InputScaling

log = logging.getLogger(__name__)

REGION_SCHEMA = "tessera.region-request/v1"
#: Seconds added when hiding a message until another worker's lease lapses.
LEASE_SLACK_S = 1.0


class Finalising(StrEnum):
    """What :func:`finalise_if_ready` did with a job."""

    FINALISED = "finalised"
    #: Regions are still open, or the job is closed already.
    OPEN = "open"
    #: Another worker holds the finalisation.
    HELD = "held"


@dataclass(frozen=True)
class Outcome:
    """What to do with a handled message: delete it, or hide it ``defer_s`` seconds (then it comes back)."""

    delete: bool
    defer_s: float | None = None
    note: str = ""


class DetectorCache:
    """The last few detectors a worker opened, keyed by model version and settings.

    A worker serves many regions of one job; re-creating the session for each would dominate small regions.
    The key holds the S3 ETag (or the file's size and mtime), so a replaced model is loaded again.
    """

    def __init__(self, providers: str = "auto", size: int = 2, s3_client: Any = None) -> None:
        self.providers = providers
        self.size = size
        self.s3_client = s3_client
        self._entries: OrderedDict[tuple[Any, ...], tuple[Detector, InputScaling]] = OrderedDict()
        self._stop_reason: str | None = None
        self._stuck = False

    def get(self, request: ImageRequest) -> tuple[Detector, InputScaling]:
        """The detector and input scaling for a request (UserError when the model is missing or unfit)."""
        if request.endpoint is not None:
            key: tuple[Any, ...] = (
                "endpoint",
                request.endpoint,
                request.batch_size,
                request.merge.score_threshold,
            )
        else:
            assert request.model is not None
            key = (
                request.model,
                self._version(request.model),
                request.tile_size,
                request.batch_size,
                request.merge.score_threshold,
            )
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        if self._stop_reason is not None:
            raise RunStoppedError(self._stop_reason)
        detector = open_detector(request, providers=self.providers, s3_client=self.s3_client)
        entry = (detector, input_scaling(detector))
        self._entries[key] = entry
        while len(self._entries) > self.size:
            self._close(self._entries.popitem(last=False)[1][0])
        return entry

    def stop(self, reason: str) -> None:
        """Stop every cached detector's batches in flight and refuse new ones (a worker draining)."""
        self._stop_reason = reason
        for detector, _ in list(self._entries.values()):
            if isinstance(detector, OnnxDetector):
                detector.stop(reason)

    @property
    def stuck(self) -> bool:
        """Whether a detector's batch outlived its timeout and did not stop (see run_control)."""
        return self._stuck or any(
            isinstance(d, OnnxDetector) and d.stuck for d, _ in list(self._entries.values())
        )

    def _close(self, detector: Detector) -> None:
        if isinstance(detector, OnnxDetector):
            self._stuck = self._stuck or detector.stuck
            detector.close()

    def close(self) -> None:
        """Stop the detectors' threads."""
        while self._entries:
            self._close(self._entries.popitem()[1][0])

    def _version(self, model: str) -> str:
        if model.startswith("s3://"):
            return objects.object_etag(model, self.s3_client)
        stat = local_model_path(model).stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"


class Leases:
    """What the message being handled holds (a region, a finalisation), extended on every heartbeat.

    :meth:`extend` runs on the heartbeat thread with its own connection.
    """

    def __init__(self, conn: psycopg.Connection[Any], worker: str, lease_s: float) -> None:
        self.conn = conn
        self.worker = worker
        self.lease_s = lease_s
        self._lock = threading.Lock()
        self.regions: set[tuple[str, int]] = set()
        self.finalising: set[str] = set()

    def extend(self) -> None:
        """Push every held lease ``lease_s`` seconds from now."""
        with self._lock:
            regions, finalising = list(self.regions), list(self.finalising)
        for job_id, index in regions:
            jobs.extend_region_lease(self.conn, job_id, index, self.worker, self.lease_s)
        for job_id in finalising:
            jobs.extend_finalisation(self.conn, job_id, self.worker, self.lease_s)

    def hold_region(self, job_id: str, index: int) -> None:
        """Start extending a region's lease."""
        with self._lock:
            self.regions.add((job_id, index))

    def drop_region(self, job_id: str, index: int) -> None:
        """Stop extending a region's lease."""
        with self._lock:
            self.regions.discard((job_id, index))

    def hold_finalisation(self, job_id: str) -> None:
        """Start extending a finalisation claim."""
        with self._lock:
            self.finalising.add(job_id)

    def drop_finalisation(self, job_id: str) -> None:
        """Stop extending a finalisation claim."""
        with self._lock:
            self.finalising.discard(job_id)


@dataclass
class Context:
    """What the handlers need from the worker that runs them."""

    conn: psycopg.Connection[Any]
    worker: str
    region_queue_url: str
    #: Seconds a region (or a finalisation) claim lasts between heartbeats: half the visibility timeout.
    lease_s: float
    detectors: DetectorCache
    metrics: Metrics
    sqs: Any = None
    s3: Any = None
    s3_endpoint: str | None = None


@dataclass(frozen=True)
class RegionRequest:
    """A region message: which job, which region."""

    job_id: str
    index: int


def parse_region_request(body: str) -> RegionRequest:
    """Decode a region message; a malformed one is a bug upstream (ValueError, never a UserError)."""
    data = json.loads(body)
    if not isinstance(data, dict) or data.get("schema") != REGION_SCHEMA:
        raise ValueError(f"not a {REGION_SCHEMA} message: {body[:200]!r}")
    job_id, index = data.get("job_id"), data.get("region_index")
    if not isinstance(job_id, str) or not isinstance(index, int) or isinstance(index, bool):
        raise ValueError(f"region message without job_id/region_index: {body[:200]!r}")
    return RegionRequest(job_id, index)


def region_message(job_id: str, index: int) -> dict[str, Any]:
    """The body of a region message."""
    return {"schema": REGION_SCHEMA, "job_id": job_id, "region_index": index}


def pin_model(conn: psycopg.Connection[Any], request: ImageRequest) -> ImageRequest:
    """The request with a registry name replaced by that model version's URI, so every region of the job
    runs the same model even when a newer version is registered meanwhile."""
    if request.model is None or not is_registry_ref(request.model):
        return request
    return replace(request, model=resolve_model_uri(conn, request.model))


def handle_image_request(ctx: Context, message: Message) -> Outcome:
    """Validate a request, record its job, plan its regions and put one message per open region on the queue.

    A redelivered request (the job exists) resumes: missing regions are added and the open ones are sent
    again (a duplicate region message does no work twice). A finished job's request is just deleted.
    """
    try:
        request = pin_model(ctx.conn, parse_request(message.body))
    except UserError as error:
        try:
            raw = json.loads(message.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raw = None
        request_json = raw if isinstance(raw, dict) else None
        job_id = job_id_of(message.body) or new_job_id()
        if not jobs.record_rejected(ctx.conn, job_id, str(error), request_json):
            # The id is another job's: record the refusal under a fresh id and leave that job alone.
            taken, job_id = job_id, new_job_id()
            jobs.record_rejected(ctx.conn, job_id, f"(job id {taken} is taken) {error}", request_json)
        log.warning("job %s FAILED: %s", job_id, error)
        return Outcome(delete=True, note=f"job {job_id} FAILED: bad request")

    job_id = request.job_id
    if not jobs.create_job(ctx.conn, job_id, request.to_json()):
        job = jobs.get_job(ctx.conn, job_id)
        if job is not None and job.status in jobs.FINAL:
            return Outcome(delete=True, note=f"job {job_id} is {job.status} already")
        log.info("job %s: request delivered again; resuming", job_id)

    try:
        detector, _ = ctx.detectors.get(request)
        with RasterSource.open(request.image, s3_endpoint=ctx.s3_endpoint) as source:
            grid = settle_grid(request, detector)
            plan = plan_job(grid, source, roi_polygon(request, source))
    except UserError as error:
        jobs.fail_job(ctx.conn, job_id, str(error))
        log.warning("job %s FAILED: %s", job_id, error)
        return Outcome(delete=True, note=f"job {job_id} FAILED")

    jobs.add_regions(ctx.conn, job_id, plan.regions, plan.tiles_per_region)
    indices = jobs.open_regions(ctx.conn, job_id)
    send_messages(ctx.region_queue_url, [region_message(job_id, i) for i in indices], ctx.sqs)
    log.info(
        "job %s: %d regions (%d tiles) of %s; %d region messages sent",
        job_id,
        len(plan.regions),
        plan.tiles_total,
        request.image,
        len(indices),
    )
    return Outcome(delete=True, note=f"job {job_id}: {len(indices)} regions queued")


def handle_region_request(ctx: Context, message: Message, leases: Leases) -> Outcome:
    """Run one region at most once, store its result, and finalise the job if it was the last one open."""
    region = parse_region_request(message.body)
    job_id, index = region.job_id, region.index
    claim = jobs.claim_region(ctx.conn, job_id, index, ctx.worker, ctx.lease_s)
    if claim.state == jobs.ClaimState.MISSING:
        log.warning("job %s has no region %d; dropping the message", job_id, index)
        return Outcome(delete=True, note="no such region")
    if claim.state == jobs.ClaimState.LEASED:
        # Another worker holds it; its own message brings the region back if that worker dies.
        return Outcome(
            delete=False, defer_s=claim.lease_left_s + LEASE_SLACK_S, note="held by another worker"
        )
    if claim.state == jobs.ClaimState.FINISHED:
        return _after_region(ctx, leases, job_id, note=f"region {index} was done already")

    assert claim.window is not None
    leases.hold_region(job_id, index)
    try:
        job = jobs.get_job(ctx.conn, job_id)
        if job is None or job.request is None or job.status in jobs.FINAL:
            jobs.fail_region(ctx.conn, job_id, index, f"the job is {job.status if job else 'gone'}")
            return Outcome(delete=True, note="job closed")
        try:
            request = parse_request(job.request)
            detector, scaling = ctx.detectors.get(request)
            scaling = scaling.with_rule(request.scaling)  # the request's rule wins over the model's metadata
            with RasterSource.open(request.image, s3_endpoint=ctx.s3_endpoint) as source:
                grid = settle_grid(request, detector)
                tiles = region_tiles(
                    grid, claim.window, source.width, source.height, roi_polygon(request, source)
                )
                outcome = detect_region(
                    source,
                    detector,
                    tiles,
                    batch_size=detector.batch_size,
                    merge=request.merge,
                    scaling=scaling,
                )
        except UserError as error:
            jobs.fail_region(ctx.conn, job_id, index, str(error))
            log.warning("job %s region %d FAILED: %s", job_id, index, error)
            return _after_region(ctx, leases, job_id, note=f"region {index} FAILED")
        stored = jobs.complete_region(
            ctx.conn,
            job_id,
            index,
            outcome.detections,
            tiles=outcome.tiles,
            seconds=outcome.seconds,
            worker=ctx.worker,
        )
    finally:
        leases.drop_region(job_id, index)
    ctx.metrics.record(
        {
            "TilesPerSecond": outcome.tiles_per_second,
            "ModelLatency": outcome.model_latency_ms,
            "Tiles": outcome.tiles,
            "Detections": len(outcome.detections),
            "RegionSeconds": outcome.seconds,
            # Boxes the model returned that were dropped or changed at the model boundary.
            **outcome.checks.metrics(),
        },
        JobId=job_id,
        Region=index,
        Worker=ctx.worker,
        Provider=detector.provider,
    )
    note = f"region {index}: {outcome.tiles} tiles, {len(outcome.detections)} detections"
    if not stored:
        note += " (done by another worker first; result dropped)"
    return _after_region(ctx, leases, job_id, note=note)


def _after_region(ctx: Context, leases: Leases, job_id: str, *, note: str) -> Outcome:
    state, wait_s = finalise_if_ready(ctx, leases, job_id)
    if state == Finalising.HELD:
        # Another worker is finalising; keep this message until it is done, in case that worker dies.
        return Outcome(delete=False, defer_s=wait_s + LEASE_SLACK_S, note=note + "; job being finalised")
    return Outcome(delete=True, note=note + ("; job finalised" if state == Finalising.FINALISED else ""))


def finalise_if_ready(ctx: Context, leases: Leases, job_id: str) -> tuple[Finalising, float]:
    """Finalise the job if every region is closed and nobody else is: merge seams, write outputs, close it.

    Returns ``(FINALISED, 0)``, ``(OPEN, 0)`` (regions still open, or the job is closed already) or
    ``(HELD, seconds)`` (another worker holds the finalisation for that many more seconds).
    """
    if not jobs.claim_finalisation(ctx.conn, job_id, ctx.worker, ctx.lease_s):
        held_s = jobs.finalisation_held_s(ctx.conn, job_id)
        return (Finalising.OPEN, 0.0) if held_s is None else (Finalising.HELD, held_s)
    leases.hold_finalisation(job_id)
    started = time.perf_counter()
    try:
        _finalise(ctx, job_id)
    except BaseException:
        jobs.release_finalisation(ctx.conn, job_id, ctx.worker)
        raise
    finally:
        leases.drop_finalisation(job_id)
    log.info("job %s finalised in %.2f s", job_id, time.perf_counter() - started)
    return Finalising.FINALISED, 0.0


def _finalise(ctx: Context, job_id: str) -> None:
    job = jobs.get_job(ctx.conn, job_id)
    assert job is not None and job.request is not None
    results = jobs.region_results(ctx.conn, job_id)
    done = [r for r in results if r.status == "DONE"]
    failed = [r for r in results if r.status == "FAILED"]
    tiles = sum(r.tiles for r in done)
    reason = _failures(failed) if failed else None
    if not done:
        jobs.finish_job(
            ctx.conn,
            job_id,
            ctx.worker,
            status="FAILED",
            reason=reason,
            tiles=0,
            detections=0,
            output_uris=[],
        )
        return
    try:
        request = parse_request(job.request)
        detector, _ = ctx.detectors.get(request)
        with RasterSource.open(request.image, s3_endpoint=ctx.s3_endpoint) as source:
            grid = settle_grid(request, detector)
            detections = merge_seams(
                [r.detections for r in done], [r.window for r in done], grid, request.merge
            )
            uris = write_outputs(
                detections, source, request, class_names=detector.class_names, s3_client=ctx.s3
            )
    except UserError as error:
        jobs.finish_job(
            ctx.conn,
            job_id,
            ctx.worker,
            status="FAILED",
            reason=f"writing the output failed: {error}",
            tiles=tiles,
            detections=0,
            output_uris=[],
        )
        return
    jobs.finish_job(
        ctx.conn,
        job_id,
        ctx.worker,
        status="PARTIAL" if failed else "SUCCESS",
        reason=reason,
        tiles=tiles,
        detections=len(detections),
        output_uris=uris,
    )


def _failures(failed: list[jobs.RegionResult]) -> str:
    shown = "; ".join(f"region {r.index}: {r.error}" for r in failed[:5])
    more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
    return f"{len(failed)} region(s) failed: {shown}{more}"


def on_unexpected(
    ctx: Context, message: Message, queue: str, error: BaseException, *, last_attempt: bool
) -> None:
    """Clean up after an unexpected error; the message itself is left to be redelivered.

    A region is handed back (PENDING) so its next delivery claims it at once. On the last delivery before
    the dead-letter queue, the region (or the whole job, for an image request) is failed with the error,
    so the job still finishes (PARTIAL or FAILED) instead of waiting forever.
    """
    reason = f"unexpected error: {type(error).__name__}: {error}"
    if queue == "region":
        try:
            region = parse_region_request(message.body)
        except (ValueError, json.JSONDecodeError):
            return
        if last_attempt:
            gave_up = f"gave up after {message.receive_count} attempts: {reason}"
            jobs.fail_region(ctx.conn, region.job_id, region.index, gave_up)
            leases = Leases(ctx.conn, ctx.worker, ctx.lease_s)
            try:
                finalise_if_ready(ctx, leases, region.job_id)
            except Exception as again:
                # Finalisation itself keeps failing: close the job rather than leave it open for ever.
                log.exception("finalising job %s failed again", region.job_id)
                if not jobs.open_regions(ctx.conn, region.job_id):
                    jobs.fail_job(
                        ctx.conn, region.job_id, f"finalising failed: {type(again).__name__}: {again}"
                    )
        else:
            jobs.release_region(ctx.conn, region.job_id, region.index, ctx.worker, reason)
    elif last_attempt:
        job_id = job_id_of(message.body)
        if job_id is not None:
            jobs.fail_job(ctx.conn, job_id, f"gave up after {message.receive_count} attempts: {reason}")
            jobs.fail_open_regions(ctx.conn, job_id, "the job failed")
