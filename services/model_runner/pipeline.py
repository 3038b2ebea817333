"""The detection pipeline over one image, in process: what ``tessera run`` runs and what workers reuse.

    open the raster lazily -> regions -> per region: its tiles (ROI-filtered) -> prefetched batches ->
    detector -> boxes shifted to image pixels -> merge within the region -> (all regions) seam merge ->
    GeoJSON features -> outputs

A worker runs :func:`detect_region` for the regions it is given and the finaliser runs
:func:`merge_seams` and :func:`write_outputs`; :func:`run_image` strings them together in one process.
Memory is bounded by the region (its strips, batches and detections), never by the image.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from shapely.geometry.base import BaseGeometry

from services.errors import UserError
from services.inference.detections import BoxChecks, Detections, check_tiles
from services.inference.detector import Detector, OnnxDetector
from services.inference.merge import merge_detections, whole_boxes_in_image
from services.inference.side_by_side import BusyClock
from services.model_runner.model_setup import (
    input_scaling,
    native_detector,
    open_detector,
    reader_threads,
    settle_grid,
)
from services.model_runner.outputs import check_outputs, write_outputs
from services.model_runner.request import ImageRequest, MergeSettings
from services.tiling.batches import TileBatch, TileBatchStream
from services.tiling.reader import RasterSource
from services.tiling.roi import RoiCoordinates, parse_roi, roi_pixel_polygon, tiles_in_roi
from services.tiling.scaling import InputScaling, ScalingRule
from services.tiling.windows import Grid, Window

log = logging.getLogger(__name__)

#: Called with the number of tiles just finished (detected or skipped as nodata).
TileProgress = Callable[[int], None]


@dataclass(frozen=True)
class JobPlan:
    """The regions of an image that hold tiles to run (after the ROI), and how many tiles each holds."""

    grid: Grid
    image_width: int
    image_height: int
    regions: list[Window]
    tiles_per_region: list[int]
    roi: BaseGeometry | None = None
    """The region of interest in image pixels the plan was made with (tiles outside it are not run)."""

    @property
    def tiles_total(self) -> int:
        """Tiles over all regions."""
        return int(sum(self.tiles_per_region))


@dataclass(frozen=True)
class RegionOutcome:
    """One region's detections (image pixels, merged within the region) and what it took.

    ``model_seconds``: wall seconds during which the model was running at least one of the region's
    batches (with batches side by side on several CPU sessions, not the sum of their own run times).
    ``checks``: what the checks on the model's output dropped and changed
    (:func:`~services.inference.detections.check_boxes`); ``checks.metrics()`` are its metric values.
    """

    detections: Detections
    tiles: int
    skipped: int
    seconds: float
    model_seconds: float
    batches: int
    checks: BoxChecks = field(default_factory=BoxChecks)

    @property
    def tiles_per_second(self) -> float:
        """Tiles (run or skipped) per wall-clock second of the region."""
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    @property
    def model_latency_ms(self) -> float:
        """Mean milliseconds of ``model_seconds`` per model batch."""
        return 1000.0 * self.model_seconds / self.batches if self.batches else 0.0


def roi_polygon(request: ImageRequest, source: RasterSource) -> BaseGeometry | None:
    """The request's region of interest in the image's pixel space (None: the whole image)."""
    if request.roi is None:
        return None
    crs: RoiCoordinates = "lonlat" if request.roi.crs == "lonlat" else "map"
    geometry = parse_roi(request.roi.geometry, crs_of_text=crs)
    return roi_pixel_polygon(geometry, crs_of_text=crs, crs=source.crs, transform=source.transform)


def region_tiles(
    grid: Grid, region: Window, image_width: int, image_height: int, roi: BaseGeometry | None
) -> list[Window]:
    """The tiles a region runs: the global-grid tiles with their origin in it, less those outside the ROI."""
    tiles = grid.tiles_of(region, image_width, image_height)
    return tiles_in_roi(tiles, roi) if roi is not None else tiles


def plan_job(grid: Grid, source: RasterSource, roi: BaseGeometry | None) -> JobPlan:
    """The regions of the image that have tiles to run, and their tile counts.

    Regions with no tile inside the ROI are left out; an ROI that misses the image is a UserError.
    """
    regions, counts = [], []
    for region in grid.regions(source.width, source.height):
        count = len(region_tiles(grid, region, source.width, source.height, roi))
        if count:
            regions.append(region)
            counts.append(count)
    if not regions:
        raise UserError(f"the region of interest does not overlap the image {source.url}")
    return JobPlan(grid, source.width, source.height, regions, counts, roi)


def region_batches(
    source: RasterSource,
    detector: Detector,
    tiles: Sequence[Window],
    *,
    batch_size: int,
    scaling: InputScaling | None = None,
    threads: int | None = None,
    prefetch: int = 2,
    on_reads_done: Callable[[], None] | None = None,
) -> TileBatchStream:
    """The batches :func:`detect_region` feeds ``detector`` for ``tiles``, not yet started: uint8 pixels
    when the model takes them (:func:`native_detector`), else float32. Anything the image or the scaling
    makes impossible is refused here (UserError), before any read. Arguments as for detect_region."""
    scaling = scaling or input_scaling(detector)
    native = native_detector(detector, scaling, source)
    return TileBatchStream(
        source,
        tiles,
        batch_size,
        scaling,
        tile_shape=(detector.tile_height, detector.tile_width),
        threads=threads or reader_threads(detector),
        prefetch=prefetch,
        native_pad=native[1] if native is not None else None,
        on_reads_done=on_reads_done,
    )


def detect_region(
    source: RasterSource,
    detector: Detector,
    tiles: Sequence[Window],
    *,
    batch_size: int,
    merge: MergeSettings,
    scaling: InputScaling | None = None,
    on_tiles: TileProgress | None = None,
    threads: int | None = None,
    prefetch: int = 2,
    batches: TileBatchStream | None = None,
) -> RegionOutcome:
    """Run the detector on a region's tiles and merge the duplicates among them.

    Per tile, boxes cut by an interior tile side are dropped (``merge.edge_margin``); the rest are shifted to
    image pixels and merged (``merge.algorithm``). Tiles that are all nodata are skipped (and counted).
    What the model returns is checked first (non-finite, inverted and off-tile boxes dropped, boxes clipped
    to the tile; :func:`~services.inference.detections.check_boxes`), and the counts logged and returned.
    ``threads`` decode strips (default: :func:`reader_threads`); ``prefetch`` batches are prepared ahead.
    ``batches``: these tiles' stream from :func:`region_batches` with the same arguments, perhaps already
    started (:func:`run_image` starts the next region's while this one drains); it is closed here.
    """
    started = time.perf_counter()
    scaling = scaling or input_scaling(detector)
    found_per_tile: list[Detections] = []  # the model's checked boxes per tile run, in tile pixels
    tiles_run: list[Window] = []
    batch_count, skipped = 0, 0
    native = native_detector(detector, scaling, source)
    model: Detector = native[0] if native is not None else detector
    stream = (
        batches
        if batches is not None
        else region_batches(
            source,
            detector,
            tiles,
            batch_size=batch_size,
            scaling=scaling,
            threads=threads,
            prefetch=prefetch,
        )
    )
    # The batches handed to the model, oldest first, with the skipped tiles counted up to them. The model's
    # session threads draw them (one at a time), so this is appended to there and taken from here.
    in_flight: deque[tuple[TileBatch, int]] = deque()
    # Tiles skipped (all nodata) with no batch to carry them: reported from here, after the next result.
    unreported: deque[int] = deque()

    def feed() -> Generator[np.ndarray, None, None]:
        nonlocal skipped
        with stream:
            for batch in stream:
                skipped += batch.skipped
                if batch.tiles:
                    in_flight.append((batch, batch.skipped))
                    yield batch.pixels
                elif batch.skipped:
                    unreported.append(batch.skipped)

    def report_skipped() -> None:
        while unreported:
            done = unreported.popleft()
            if on_tiles is not None:
                on_tiles(done)

    checks = BoxChecks()

    def count(found: BoxChecks) -> None:
        nonlocal checks
        checks += found

    busy = BusyClock()
    fed = feed()
    results = detect_batches(model, fed, on_checks=count, busy=busy)
    try:
        for found in results:
            batch, batch_skipped = in_flight.popleft()
            batch.release()  # the model has returned: its pixels may take a later batch
            batch_count += 1
            if len(found) != len(batch.tiles):
                raise UserError(
                    f"model {model.name} returned detections for {len(found)} tiles of a batch of "
                    f"{len(batch.tiles)}: each tile of a batch needs its own (possibly empty) result"
                )
            found_per_tile.extend(found)
            tiles_run.extend(batch.tiles)
            if on_tiles is not None:
                on_tiles(len(batch.tiles) + batch_skipped)
            report_skipped()
        report_skipped()
    finally:
        # On an error: stop the reader first (a session thread waiting for its next batch is released),
        # then the batches in flight, then the feed.
        stream.close()
        results.close()
        fed.close()
    model_seconds = busy.seconds
    if checks != BoxChecks():
        log.warning(
            "model %s returned unusable boxes: %d dropped (%d non-finite, %d inverted or empty, %d outside "
            "the tile), %d clipped to the tile, %d scores clamped to [0, 1]",
            detector.name,
            checks.dropped,
            checks.non_finite,
            checks.inverted,
            checks.outside,
            checks.clipped,
            checks.score_clamped,
        )
    # Boxes cut by an interior tile side dropped and the rest moved to image pixels for the whole region at
    # once: a few array operations per region, not per batch on the thread that hands out the batches.
    kept = whole_boxes_in_image(
        found_per_tile, tiles_run, source.width, source.height, margin=merge.edge_margin
    )
    merged = merge_detections(
        kept, iou_threshold=merge.iou, ios_threshold=merge.ios, algorithm=merge.algorithm
    )
    return RegionOutcome(
        detections=merged,
        tiles=len(tiles),
        skipped=skipped,
        seconds=time.perf_counter() - started,
        model_seconds=model_seconds,
        batches=batch_count,
        checks=checks,
    )


def detect_batches(
    detector: Detector,
    batches: Iterable[np.ndarray],
    *,
    on_checks: Callable[[BoxChecks], None] | None = None,
    busy: BusyClock | None = None,
) -> Generator[list[Detections], None, None]:
    """Each batch's checked detections, in order: side by side on an :class:`OnnxDetector`'s CPU sessions
    (:meth:`OnnxDetector.detect_many`, which checks its model's output), one batch after another on any
    other detector (an endpoint), whose output is checked here. ``on_checks`` gets what the checks did;
    ``busy`` adds up the wall time the model was running a batch."""
    if isinstance(detector, OnnxDetector):
        yield from detector.detect_many(batches, on_checks=on_checks, busy=busy)
        return
    for batch in batches:
        with busy or contextlib.nullcontext():
            found = detector.detect(batch)
        counts = [len(d) for d in found]
        checked, checks = check_tiles(
            Detections.concat(found), counts, detector.tile_width, detector.tile_height
        )
        if on_checks is not None:
            on_checks(checks)
        yield checked


def merge_seams(
    parts: Sequence[Detections], regions: Sequence[Window], grid: Grid, merge: MergeSettings
) -> Detections:
    """Merge the regions' detections across region seams.

    Within a region duplicates are merged already; across regions they can only lie near a seam (a region's
    tiles reach past its right/bottom edge by the overlap, so an object on a seam is seen whole by one
    region and cut or whole by the other). Boxes within one tile of an interior region edge are merged
    together; the others pass untouched, so the cost follows the seams, not the image.
    """
    everything = Detections.concat(list(parts))
    if len(regions) < 2 or len(everything) < 2:
        return everything
    boxes = everything.boxes
    near = np.zeros(len(everything), dtype=bool)
    for x in sorted({r.col_off for r in regions if r.col_off > 0}):
        near |= (boxes[:, 2] > x - grid.tile_w) & (boxes[:, 0] < x + grid.tile_w)
    for y in sorted({r.row_off for r in regions if r.row_off > 0}):
        near |= (boxes[:, 3] > y - grid.tile_h) & (boxes[:, 1] < y + grid.tile_h)
    if not near.any():
        return everything
    merged = merge_detections(
        everything.select(near), iou_threshold=merge.iou, ios_threshold=merge.ios, algorithm=merge.algorithm
    )
    return Detections.concat([everything.select(~near), merged])


class RegionReadAhead:
    """The regions' batch streams, each next one started as soon as the current one's reads are all
    handed out: its first strips are decoded while the current region's last tiles are cut and run, so
    the cores do not idle at every region's start and drain. At most two regions' reads are under way.

    ``open_stream(tiles, on_reads_done)`` opens a region's stream (:func:`region_batches`) and
    ``tiles_of[i]()`` gives region ``i``'s tiles. Streams are opened and started under a lock (the start
    comes from the current stream's assembler thread); a next region that cannot be opened there is
    opened again, and its error raised, when its turn comes. Leaving the ``with`` block closes any
    stream still open (a run stopped by an error leaves no reader running).
    """

    def __init__(
        self,
        open_stream: Callable[[list[Window], Callable[[], None]], TileBatchStream],
        tiles_of: Sequence[Callable[[], list[Window]]],
    ) -> None:
        self._open_stream = open_stream
        self._tiles_of = tiles_of
        self._lock = threading.Lock()
        self._opened: dict[int, tuple[list[Window], TileBatchStream]] = {}
        self._closed = False

    def _open(self, index: int) -> tuple[list[Window], TileBatchStream]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the regions' read-ahead is closed")
            if index not in self._opened:
                tiles = self._tiles_of[index]()
                stream = self._open_stream(tiles, functools.partial(self._start, index + 1))
                self._opened[index] = (tiles, stream)
            return self._opened[index]

    def _start(self, index: int) -> None:
        if index >= len(self._tiles_of):
            return
        try:
            self._open(index)[1].start()
        except Exception as error:  # opened again, and raised, when its turn comes
            log.debug("could not start reading region %d ahead: %s", index, error)

    def take(self, index: int) -> tuple[list[Window], TileBatchStream]:
        """Region ``index``'s tiles and stream (started, or started when iterated); the caller closes it."""
        tiles, stream = self._open(index)
        with self._lock:
            del self._opened[index]
        return tiles, stream

    def __enter__(self) -> RegionReadAhead:
        return self

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._closed = True
            left = [stream for _, stream in self._opened.values()]
            self._opened.clear()
        for stream in left:
            stream.close()


@dataclass(frozen=True)
class RunSummary:
    """What ``tessera run`` reports."""

    job_id: str
    regions: int
    tiles: int
    skipped: int
    detections: int
    seconds: float
    model_seconds: float
    provider: str
    outputs: list[str]
    #: What the checks on the model's output dropped and changed, over all regions.
    checks: BoxChecks = field(default_factory=BoxChecks)

    @property
    def tiles_per_second(self) -> float:
        """Tiles per wall-clock second, end to end (open to written)."""
        return self.tiles / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class ImageOutcome:
    """A whole image's detections (image pixels, merged within regions and across seams) and what it took:
    tiles skipped as nodata, the regions' ``model_seconds`` added up and their ``checks``."""

    detections: Detections
    skipped: int
    model_seconds: float
    checks: BoxChecks


def detect_image(
    source: RasterSource,
    detector: Detector,
    plan: JobPlan,
    merge: MergeSettings,
    *,
    scaling: InputScaling | None = None,
    on_tiles: TileProgress | None = None,
) -> ImageOutcome:
    """Every region of ``plan`` through :func:`detect_region`, each next region's reads started while the
    current one drains (:class:`RegionReadAhead`), then :func:`merge_seams`: what ``tessera run`` does
    between opening the image and writing the outputs (the regions' tiles within ``plan.roi``)."""
    scaling = scaling or input_scaling(detector)
    grid, roi = plan.grid, plan.roi
    parts, skipped, model_seconds, checks = [], 0, 0.0, BoxChecks()
    region_tiles_of = [
        functools.partial(region_tiles, grid, region, source.width, source.height, roi)
        for region in plan.regions
    ]
    with RegionReadAhead(
        lambda tiles, on_reads_done: region_batches(
            source,
            detector,
            tiles,
            batch_size=detector.batch_size,
            scaling=scaling,
            on_reads_done=on_reads_done,
        ),
        region_tiles_of,
    ) as ahead:
        for index in range(len(plan.regions)):
            tiles, stream = ahead.take(index)
            with stream:  # closed here too: detect_region may fail before it reads
                outcome = detect_region(
                    source,
                    detector,
                    tiles,
                    batch_size=detector.batch_size,
                    merge=merge,
                    scaling=scaling,
                    on_tiles=on_tiles,
                    batches=stream,
                )
            parts.append(outcome.detections)
            skipped += outcome.skipped
            model_seconds += outcome.model_seconds
            checks += outcome.checks
    return ImageOutcome(merge_seams(parts, plan.regions, grid, merge), skipped, model_seconds, checks)


def run_image(
    request: ImageRequest,
    *,
    providers: str = "auto",
    on_plan: Callable[[JobPlan], None] | None = None,
    on_tiles: TileProgress | None = None,
    s3_endpoint: str | None = None,
    scaling_rule: ScalingRule | None = None,
    detector: Detector | None = None,
) -> RunSummary:
    """Run a whole request in this process (no queues, no database): every region, seam merge, outputs.

    ``scaling_rule`` states how the image's pixels become model input where the model's metadata does not
    cover them (float, signed or single-band images; services/tiling/scaling.py). ``detector``: one already
    opened for this request (it stays open; by default the request's model is opened here and closed).
    """
    started = time.perf_counter()
    check_outputs(request.outputs, request.job_id, image=request.image)
    if detector is not None:
        return _run_opened(request, detector, started, on_plan, on_tiles, s3_endpoint, scaling_rule)
    opened = open_detector(request, providers=providers)
    try:
        return _run_opened(request, opened, started, on_plan, on_tiles, s3_endpoint, scaling_rule)
    finally:
        if isinstance(opened, OnnxDetector):
            opened.close()


def _run_opened(  # noqa: PLR0917 - run_image's arguments, passed on
    request: ImageRequest,
    detector: Detector,
    started: float,
    on_plan: Callable[[JobPlan], None] | None,
    on_tiles: TileProgress | None,
    s3_endpoint: str | None,
    scaling_rule: ScalingRule | None,
) -> RunSummary:
    scaling = input_scaling(detector, scaling_rule)
    with RasterSource.open(request.image, s3_endpoint=s3_endpoint) as source:
        grid = settle_grid(request, detector)
        roi = roi_polygon(request, source)
        plan = plan_job(grid, source, roi)
        if on_plan is not None:
            on_plan(plan)
        found = detect_image(source, detector, plan, request.merge, scaling=scaling, on_tiles=on_tiles)
        detections = found.detections
        uris = write_outputs(detections, source, request, class_names=detector.class_names)
    return RunSummary(
        job_id=request.job_id,
        regions=len(plan.regions),
        tiles=plan.tiles_total,
        skipped=found.skipped,
        detections=len(detections),
        seconds=time.perf_counter() - started,
        model_seconds=found.model_seconds,
        provider=detector.provider,
        outputs=uris,
        checks=found.checks,
    )
