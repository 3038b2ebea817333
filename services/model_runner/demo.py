"""``tessera demo``: the model runner end to end on the embedded default, scored against known objects.

1. start moto's server (S3, SQS) and an embedded PostgreSQL, with the platform's buckets and queues;
2. write a georeferenced, tiled GeoTIFF scene with known objects (``services/scenes``) and upload it, and
   the demo detector, to the imagery and models buckets;
3. submit an image request (the model by its ``s3://`` URI) and start worker processes
   (``python -m services.cli worker model-runner``) that share its regions through the region queue;
4. follow the job in PostgreSQL until it is done, download the GeoJSON from the results bucket, match the
   features' ``pixel_bbox`` against the known objects (IoU >= 0.5), and write a preview PNG.

Workers and servers are shut down on the way out, Ctrl-C included.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import UserError
from services.jobs.crew import Crew
from services.scenes.scoring import Score, score_detections
from services.scenes.truth import read_detections

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "tessera-demo-detector.onnx"
ROOT = Path(__file__).resolve().parent.parent.parent
WORKER_COMMAND: tuple[str, ...] = ("-m", "services.cli", "worker", "model-runner")
#: Detections scoring below this are not written (the demo detector's README suggests 0.25-0.3).
SCORE_THRESHOLD = 0.3
IOU_MATCH = 0.5
PREVIEW_MAX_SIDE = 1600


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs on."""

    out_dir: Path = Path("out/demo")
    width: int = 8192
    height: int = 8192
    region: int = 2048
    workers: int = 2
    seed: int = 7
    model: Path | None = None
    timeout_s: float = 600.0
    worker_command: tuple[str, ...] = WORKER_COMMAND


@dataclass
class DemoResult:
    """The figures the demo prints (and its tests read)."""

    job_id: str
    status: str
    reason: str | None
    regions: int
    tiles: int
    seconds: float
    detections: int
    #: Detections matched to the scene's known objects (precision, recall).
    score: Score
    regions_by_worker: dict[str, int]
    worker_tiles_per_second: dict[str, float]
    geojson: Path | None
    preview: Path | None
    provider: str = ""
    workers: int = 0

    @property
    def tiles_per_second(self) -> float:
        """Tiles per wall-clock second from submission to the job's end."""
        return self.tiles / self.seconds if self.seconds > 0 else 0.0


def run_demo(settings: DemoSettings) -> int:
    """Run the demo and print its summary; 0 when the job succeeded."""
    from rich.console import Console

    console = Console()
    try:
        result = demo(settings, console=console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; workers and servers are stopped[/]")
        return 130
    print_summary(result, console)
    return 0 if result.status == "SUCCESS" else 1


def demo(settings: DemoSettings, *, console: Any = None) -> DemoResult:
    """Everything :func:`run_demo` does except printing the summary."""
    from rich.console import Console

    from services.cloud.database import apply_migrations, connect
    from services.cloud.embedded import EmbeddedPlatform

    console = console or Console()
    model = settings.model or DEFAULT_MODEL
    if not model.is_file():
        raise UserError(
            f"the demo detector {model} is missing; restore it with git, or re-train it as "
            "services/models/README.md says (`tessera train detector --dataset synthetic --size full ...`)"
        )
    if settings.workers < 1:
        raise UserError(f"the demo needs at least one worker, got {settings.workers}")
    out_dir = settings.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    platform = EmbeddedPlatform()
    crew: Crew | None = None
    try:
        with console.status("starting moto (S3, SQS) and PostgreSQL"):
            platform.start()
            with connect(platform.database_url) as conn:
                apply_migrations(conn)
        console.print(
            f"embedded platform: moto at {platform.endpoint_url}, PostgreSQL in {platform.directory}"
        )
        assert platform.directory is not None
        scene_path = platform.directory / f"scene-{settings.seed}.tif"
        layout = _write_scene(settings, scene_path, console)
        s3 = platform.client("s3")
        image_url = f"s3://{platform.bucket('imagery')}/scenes/{scene_path.name}"
        model_url = f"s3://{platform.bucket('models')}/detectors/{model.name}"
        s3.upload_file(str(scene_path), platform.bucket("imagery"), f"scenes/{scene_path.name}")
        s3.upload_file(str(model), platform.bucket("models"), f"detectors/{model.name}")
        env = {**os.environ, **platform.env, "PYTHONUNBUFFERED": "1"}
        crew = Crew(settings.worker_command, settings.workers, env, out_dir)
        crew.start()
        with console.status(f"starting {settings.workers} worker processes"):
            crew.wait_until_serving(settings.timeout_s)
        console.print(f"{settings.workers} workers serving the region and image queues (logs in {out_dir})")

        job_id = f"demo-{settings.seed}-{uuid.uuid4().hex[:6]}"
        request = _request(settings, job_id, image_url, model_url, platform.bucket("results"))
        platform.client("sqs").send_message(
            QueueUrl=platform.queue_url("image-requests"), MessageBody=json.dumps(request)
        )
        submitted = time.monotonic()
        console.print(f"submitted job {job_id}: {image_url} with {model_url}")
        progress = _follow(platform.database_url, job_id, crew, settings.timeout_s, console)
        seconds = time.monotonic() - submitted
        return _result(
            platform=platform,
            settings=settings,
            job_id=job_id,
            progress=progress,
            seconds=seconds,
            layout=layout,
            scene_path=scene_path,
            s3=s3,
        )
    finally:
        if crew is not None:
            crew.stop()
        platform.stop()


def _write_scene(settings: DemoSettings, path: Path, console: Any) -> Any:
    from rich.progress import Progress

    from services.scenes.geotiff import write_scene_geotiff

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"writing a {settings.width} x {settings.height} scene", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        layout = write_scene_geotiff(
            path, settings.width, settings.height, seed=settings.seed, progress=advance
        )
    counts = np.bincount(layout.labels, minlength=len(layout.classes)).tolist()
    kinds = ", ".join(f"{n} {c}" for c, n in zip(layout.classes, counts, strict=True))
    console.print(
        f"scene: {settings.width} x {settings.height} px GeoTIFF, {len(layout)} known objects ({kinds})"
    )
    return layout


def _request(settings: DemoSettings, job_id: str, image: str, model: str, results: str) -> dict[str, Any]:
    from services.model_runner.request import parse_request

    request = {
        "schema": "tessera.image-request/v1",
        "job_id": job_id,
        "image": image,
        "model": model,
        "region_size": [settings.region, settings.region],
        "merge": {"score_threshold": SCORE_THRESHOLD},
        "outputs": {"s3": f"s3://{results}/demo"},
        "properties": {"scene_seed": settings.seed},
        "batch_size": 4,
    }
    return parse_request(request).to_json()


def _follow(database_url: str, job_id: str, crew: Crew, timeout_s: float, console: Any) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.cloud.database import connect
    from services.model_runner import jobs

    deadline = time.monotonic() + timeout_s
    columns = (TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with connect(database_url) as conn, Progress(*columns, console=console) as bar:
        regions = bar.add_task("regions", total=None)
        tiles = bar.add_task("tiles", total=None)
        while True:
            progress = jobs.job_progress(conn, job_id)
            if progress is not None:
                bar.update(regions, total=progress.regions_total or None, completed=progress.regions_closed)
                bar.update(tiles, total=progress.tiles_total or None, completed=progress.tiles_done)
                if progress.status in jobs.FINAL:
                    return progress
            if crew.all_exited():
                raise RuntimeError("every worker exited before the job finished; see the worker logs")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the job did not finish within {timeout_s:.0f} s")
            time.sleep(0.25)


def _result(
    *,
    platform: Any,
    settings: DemoSettings,
    job_id: str,
    progress: Any,
    seconds: float,
    layout: Any,
    scene_path: Path,
    s3: Any,
) -> DemoResult:
    from services.cloud.database import connect
    from services.model_runner import jobs

    with connect(platform.database_url) as conn:
        job = jobs.get_job(conn, job_id)
        rates = conn.execute(
            "SELECT worker, sum(tiles) / NULLIF(sum(seconds), 0) FROM regions"
            " WHERE job_id = %s AND status = 'DONE' GROUP BY worker ORDER BY worker",
            (job_id,),
        ).fetchall()
    assert job is not None
    result = DemoResult(
        job_id=job_id,
        status=job.status,
        reason=job.reason,
        regions=job.regions_total or 0,
        tiles=job.tiles or 0,
        seconds=seconds,
        detections=job.detections or 0,
        score=Score(true_positives=0, false_positives=0, false_negatives=len(layout)),
        regions_by_worker=dict(sorted(progress.regions_by_worker.items())),
        worker_tiles_per_second={w: float(r or 0.0) for w, r in rates},
        geojson=None,
        preview=None,
        provider=_provider(settings.out_dir),
        workers=settings.workers,
    )
    if job.status not in ("SUCCESS", "PARTIAL") or not job.output_uris:
        return result
    bucket, key = job.output_uris[0][len("s3://") :].split("/", 1)
    geojson = settings.out_dir / "detections.geojson"
    s3.download_file(bucket, key, str(geojson))
    boxes, scores, labels = read_detections(geojson, layout.classes)
    result.score = score_detections(
        boxes, scores, labels, layout.boxes, layout.labels, iou_threshold=IOU_MATCH
    )
    result.geojson = geojson
    result.preview = draw_preview(
        scene_path,
        boxes=boxes,
        labels=labels,
        true_boxes=layout.boxes,
        true_labels=layout.labels,
        path=settings.out_dir / "preview.png",
    )
    return result


def _provider(out_dir: Path) -> str:
    """The execution provider the workers reported in their metrics."""
    providers = set()
    for path in sorted(out_dir.glob("worker-*.metrics.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if '"Provider"' in line:
                providers.add(json.loads(line)["Provider"])
    return ", ".join(sorted(providers))


def matches(
    boxes: np.ndarray,
    labels: np.ndarray,
    true_boxes: np.ndarray,
    true_labels: np.ndarray,
    iou: float = IOU_MATCH,
) -> tuple[np.ndarray, np.ndarray]:
    """Which detections and which known objects found a partner of the same class at IoU >= ``iou``
    (each used once, best IoU first): two boolean masks, for drawing."""
    import shapely
    from shapely import STRtree

    found = np.zeros(len(boxes), bool)
    seen = np.zeros(len(true_boxes), bool)
    if len(boxes) == 0 or len(true_boxes) == 0:
        return found, seen
    tree = STRtree(shapely.box(*np.asarray(true_boxes, np.float64).T))
    pred, true = tree.query(shapely.box(*np.asarray(boxes, np.float64).T), predicate="intersects")
    a, b = np.asarray(boxes, np.float64)[pred], np.asarray(true_boxes, np.float64)[true]
    inter = np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0, None).prod(axis=1)
    union = (a[:, 2:] - a[:, :2]).prod(axis=1) + (b[:, 2:] - b[:, :2]).prod(axis=1) - inter
    overlap = inter / np.maximum(union, 1e-9)
    ok = (overlap >= iou) & (labels[pred] == true_labels[true])
    for i in np.argsort(-overlap[ok], kind="stable"):
        p, t = pred[ok][i], true[ok][i]
        if not found[p] and not seen[t]:
            found[p] = seen[t] = True
    return found, seen


def draw_preview(
    scene: Path,
    *,
    boxes: np.ndarray,
    labels: np.ndarray,
    true_boxes: np.ndarray,
    true_labels: np.ndarray,
    path: Path,
    max_side: int = PREVIEW_MAX_SIDE,
) -> Path:
    """A downscaled PNG of the scene: matched detections green, false ones orange, missed objects red."""
    import rasterio
    from PIL import Image, ImageDraw
    from rasterio.enums import Resampling

    with rasterio.open(scene) as dataset:
        scale = min(1.0, max_side / max(dataset.width, dataset.height))
        shape = (3, max(1, round(dataset.height * scale)), max(1, round(dataset.width * scale)))
        # A decimated read: GDAL never decodes more than it needs for the small picture.
        pixels = dataset.read([1, 2, 3], out_shape=shape, resampling=Resampling.average)
    image = Image.fromarray(np.ascontiguousarray(np.moveaxis(pixels, 0, -1)))
    draw = ImageDraw.Draw(image)
    found, seen = matches(boxes, labels, true_boxes, true_labels)
    for box in np.asarray(true_boxes)[~seen] * scale:
        draw.rectangle(box.tolist(), outline=(235, 30, 30), width=2)
    for box, ok in zip(np.asarray(boxes) * scale, found.tolist(), strict=True):
        draw.rectangle(box.tolist(), outline=(40, 220, 60) if ok else (255, 150, 0), width=1)
    image.save(path)
    return path


def print_summary(result: DemoResult, console: Any) -> None:
    """The demo's figures as a table."""
    from rich.table import Table

    table = Table(title=f"tessera demo: job {result.job_id}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("status", result.status + (f" ({result.reason})" if result.reason else ""))
    table.add_row("regions", str(result.regions))
    table.add_row("tiles", str(result.tiles))
    table.add_row(
        "tiles/s", f"{result.tiles_per_second:.2f} end to end ({result.seconds:.1f} s from submission)"
    )
    for worker, rate in result.worker_tiles_per_second.items():
        table.add_row(f"  {worker}", f"{rate:.2f} tiles/s while running a region")
    table.add_row("provider", result.provider or "?")
    table.add_row("detections", str(result.detections))
    score = result.score
    table.add_row(
        f"precision @ IoU {IOU_MATCH}",
        _share(score.true_positives, score.true_positives + score.false_positives, "detections"),
    )
    table.add_row(
        f"recall @ IoU {IOU_MATCH}",
        _share(score.true_positives, score.true_positives + score.false_negatives, "known objects"),
    )
    table.add_row(
        "regions per worker", ", ".join(f"{w}: {n}" for w, n in result.regions_by_worker.items()) or "none"
    )
    if len(result.regions_by_worker) < result.workers:
        table.add_row("[yellow]note[/]", "[yellow]not every worker ran a region (too few regions?)[/]")
    if result.geojson:
        table.add_row("GeoJSON", str(result.geojson))
    if result.preview:
        table.add_row("preview", f"{result.preview} (green: found, orange: false, red: missed)")
    console.print(table)


def _share(part: int, whole: int, of: str) -> str:
    """``5,367 of 5,369 detections (99.96%)``: the counts first, never a rate rounded up to 1.000."""
    if not whole:
        return f"none: 0 {of}"
    return f"{part:,} of {whole:,} {of} ({math.floor(10000 * part / whole) / 100:.2f}%)"
