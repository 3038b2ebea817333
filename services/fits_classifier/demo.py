"""``tessera fits demo``: a night of telescope frames classified as they arrive, on the embedded default.

1. start moto's server (S3, SQS) and an embedded PostgreSQL, with the platform's buckets and queues and the
   imagery bucket notifying the ``fits-frames`` queue of every frame under ``fits/incoming/``;
2. start worker processes (``python -m services.cli worker fits-classifier``) with the shipped classifier;
3. generate a night of frames (:mod:`services.frames.synthetic`: good ones, mirror wobbles and shutter
   faults in a seeded mix, written as a CCD writes them) and upload them one by one as a camera would;
4. follow the verdicts in PostgreSQL until every frame has one, then score them against the known labels
   (accuracy, a confusion matrix), report the throughput, and write a PNG contact sheet of a few frames per
   verdict with the truth next to it.

Workers and servers are stopped on the way out, Ctrl-C included (a platform the caller started and passed
in is left running for the caller to read and stop). ``frames``, ``side`` and ``interval_s`` (seconds
between two frames, a camera's cadence) make the night as small and as paced as wanted.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import UserError
from services.jobs.crew import Crew

WORKER_COMMAND: tuple[str, ...] = ("-m", "services.cli", "worker", "fits-classifier")
#: The share of each class in the generated night (the rest are good).
FAULT_SHARE = {"mirror_wobble": 0.2, "shutter_fault": 0.2}
SHEET_PER_VERDICT = 4
THUMB = 192


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs."""

    out_dir: Path = Path("out/fits-demo")
    frames: int = 60
    side: int = 2048
    workers: int = 2
    seed: int = 2026
    model: Path | None = None
    timeout_s: float = 600.0
    #: Seconds between two uploads (a camera's cadence); 0 uploads each frame as soon as it is generated.
    interval_s: float = 0.0


@dataclass
class DemoResult:
    """The figures the demo prints (and its tests read)."""

    frames: int
    correct: int
    accuracy: float
    confusion: dict[str, dict[str, int]]
    verdicts: dict[str, int]
    seconds: float
    frames_per_second: float
    model_seconds_per_frame: float
    model: str
    contact_sheet: str
    night: str
    per_frame: list[dict[str, Any]] = field(default_factory=list)
    #: The worker processes' ids (all stopped when the demo returns).
    worker_pids: list[int] = field(default_factory=list)


def run_demo(settings: DemoSettings, *, platform: Any = None) -> int:
    """The demo with a summary printed; the exit status (``platform``: see :func:`demo`)."""
    from rich.console import Console

    console = Console()
    result = demo(settings, console=console, platform=platform)
    print_summary(result, console)
    return 0


def demo(settings: DemoSettings, *, console: Any = None, platform: Any = None) -> DemoResult:
    """Everything :func:`run_demo` does except printing the summary.

    ``platform``: an :class:`~services.cloud.embedded.EmbeddedPlatform` already started, used and left
    running (its caller stops it); by default the demo starts one and stops it on the way out.
    """
    from rich.console import Console

    from services.cloud.database import apply_migrations, connect
    from services.cloud.embedded import EmbeddedPlatform
    from services.fits_classifier.model import SHIPPED_MODEL, FrameClassifier

    console = console or Console()
    model = settings.model or SHIPPED_MODEL
    if not model.is_file():
        raise UserError(
            f"the classifier {model} is missing; train it with `tessera train classifier --dataset "
            "synthetic` (services/models/README.md gives the command)"
        )
    if settings.frames < 1 or settings.workers < 1:
        raise UserError("the demo needs at least one frame and one worker")
    if settings.side < 32:
        raise UserError(f"generated frames need a side of at least 32 pixels, got {settings.side}")
    if not settings.interval_s >= 0:
        raise UserError(f"the interval between frames must be 0 or more seconds, got {settings.interval_s}")
    classifier = FrameClassifier(model)
    out_dir = settings.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    owned = platform is None
    platform = platform if platform is not None else EmbeddedPlatform()
    crew: Crew | None = None
    try:
        with console.status("starting moto (S3, SQS) and PostgreSQL"):
            if owned:
                platform.start()
            with connect(platform.database_url) as conn:
                apply_migrations(conn)
        console.print(
            f"embedded platform: moto at {platform.endpoint_url}, PostgreSQL in {platform.directory}"
        )
        env = {**os.environ, **platform.env, "PYTHONUNBUFFERED": "1", "TESSERA_FITS_MODEL": str(model)}
        crew = Crew(WORKER_COMMAND, settings.workers, env, out_dir)
        crew.start()
        with console.status(f"starting {settings.workers} worker processes"):
            crew.wait_until_serving(settings.timeout_s)
        console.print(f"{settings.workers} workers serving the fits-frames queue (logs in {out_dir})")
        s3 = platform.client("s3")
        night = dt.date(2026, 12, 5).isoformat()
        prefix = f"fits/incoming/{night}/"
        truth = _upload_night(settings, s3, platform.bucket("imagery"), prefix, console)
        started = min(t["uploaded_at"] for t in truth.values())
        rows = _follow(platform.database_url, set(truth), crew, settings.timeout_s, console)
        seconds = time.monotonic() - started
        result = _result(settings, classifier, truth, rows, seconds, s3, platform.bucket("imagery"), night)
        result.worker_pids = [process.pid for process in crew.processes]
        (out_dir / "result.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        return result
    finally:
        if crew is not None:
            crew.stop()
        if owned:
            platform.stop()


def night_labels(count: int, seed: int) -> list[str]:
    """The classes of a night's ``count`` frames in order: a seeded shuffle of the :data:`FAULT_SHARE` mix."""
    faults = [name for name, share in FAULT_SHARE.items() for _ in range(round(count * share))]
    labels = (faults + ["good"] * count)[:count]
    order = np.random.default_rng(seed).permutation(count)
    return [labels[i] for i in order]


@dataclass
class Evaluation:
    """A classifier scored on generated frames it never saw: accuracy with its counts, and the confusion."""

    frames: int
    correct: int
    confusion: dict[str, dict[str, int]]
    seconds_per_frame: float

    @property
    def accuracy(self) -> float:
        """The share of right verdicts."""
        return self.correct / self.frames if self.frames else 0.0


def evaluate(classifier: Any, count: int, *, side: int = 2048, seed: int = 777, batch: int = 8) -> Evaluation:
    """Score ``classifier`` through the service's own path (FITS bytes -> :func:`judge`) on ``count`` fresh
    generated frames of ``side`` pixels in the demo's mix, drawn from ``seed`` (not the training seed)."""
    import tempfile

    from services.fits_classifier.verdicts import judge
    from services.frames import generate_frame, write_fits

    labels = night_labels(count, seed)
    confusion = {t: dict.fromkeys([*classifier.class_names, "unreadable"], 0) for t in classifier.class_names}
    started = time.perf_counter()
    correct = 0
    with tempfile.TemporaryDirectory() as scratch:
        for start in range(0, count, batch):
            chunk = []
            for index in range(start, min(count, start + batch)):
                frame = generate_frame(labels[index], seed * 10_000 + index, (side, side))
                chunk.append(
                    (labels[index], write_fits(Path(scratch) / f"f{index}.fits", frame).read_bytes())
                )
            verdicts = judge(classifier, [(str(i), raw) for i, (_, raw) in enumerate(chunk)])
            for (truth, _), verdict in zip(chunk, verdicts, strict=True):
                confusion[truth][verdict.verdict] += 1
                correct += truth == verdict.verdict
    return Evaluation(count, correct, confusion, (time.perf_counter() - started) / max(1, count))


def _upload_night(settings: DemoSettings, s3: Any, bucket: str, prefix: str, console: Any) -> dict[str, Any]:
    """Generate and upload the frames one by one; the truth per object key."""
    import tempfile

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.frames import generate_frame, write_fits

    truth: dict[str, Any] = {}
    labels = night_labels(settings.frames, settings.seed)
    columns = (TextColumn("[bold]uploading"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with tempfile.TemporaryDirectory() as scratch, Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("frames", total=len(labels))
        for index, label in enumerate(labels):
            if index and settings.interval_s:
                time.sleep(settings.interval_s)
            frame = generate_frame(label, settings.seed * 10_000 + index, (settings.side, settings.side))
            name = f"r{index + 1:05d}.fits" if index % 5 else f"r{index + 1:05d}.fits.fz"
            path = write_fits(Path(scratch) / name, frame)
            key = prefix + name
            s3.upload_file(str(path), bucket, key)
            truth[f"s3://{bucket}/{key}"] = {
                "label": label,
                "uploaded_at": time.monotonic(),
                "uploaded_utc": dt.datetime.now(dt.UTC),
            }
            path.unlink()
            bar.advance(task)
    console.print(f"uploaded {len(labels)} frames ({dict(Counter(labels))}) to s3://{bucket}/{prefix}")
    return truth


def _follow(database_url: str, sources: set[str], crew: Crew, timeout_s: float, console: Any) -> list[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.cloud.database import connect

    deadline = time.monotonic() + timeout_s
    columns = (TextColumn("[bold]verdicts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with connect(database_url) as conn, Progress(*columns, console=console) as bar:
        task = bar.add_task("verdicts", total=len(sources))
        while True:
            rows = conn.execute(
                "SELECT source, status, verdict, score, seconds, annotated, reason, classified_at"
                " FROM fits_verdicts"
                " WHERE source = ANY(%s)",
                (sorted(sources),),
            ).fetchall()
            bar.update(task, completed=len(rows))
            if len(rows) >= len(sources):
                return list(rows)
            if crew.all_exited():
                raise RuntimeError("every worker exited before the night was classified; see the worker logs")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(sources) - len(rows)} frames had no verdict after {timeout_s:.0f} s"
                )
            time.sleep(0.25)


def _result(  # noqa: PLR0917 (one caller, every figure it gathered)
    settings: DemoSettings,
    classifier: Any,
    truth: dict[str, Any],
    rows: list[Any],
    seconds: float,
    s3: Any,
    bucket: str,
    night: str,
) -> DemoResult:
    classes = [*classifier.class_names, "unreadable"]
    confusion = {t: dict.fromkeys(classes, 0) for t in classifier.class_names}
    per_frame = []
    for source, status, verdict, score, spent, annotated, reason, classified_at in sorted(rows):
        label = truth[source]["label"]
        confusion[label][verdict] = confusion[label].get(verdict, 0) + 1
        per_frame.append(
            {
                "source": source,
                "truth": label,
                "verdict": verdict,
                "score": score,
                "status": status,
                "seconds": spent,
                "annotated": annotated,
                "reason": reason,
                "uploaded_at": _iso(truth[source]["uploaded_utc"]),
                "classified_at": _iso(classified_at),
            }
        )
    correct = sum(1 for f in per_frame if f["truth"] == f["verdict"])
    sheet = settings.out_dir / "contact-sheet.png"
    _contact_sheet(per_frame, classifier, s3, bucket, sheet)
    return DemoResult(
        frames=len(per_frame),
        correct=correct,
        accuracy=correct / len(per_frame),
        confusion=confusion,
        verdicts=dict(Counter(f["verdict"] for f in per_frame)),
        seconds=seconds,
        frames_per_second=len(per_frame) / seconds if seconds > 0 else 0.0,
        model_seconds_per_frame=float(
            np.median([f["seconds"] for f in per_frame if f["seconds"] is not None])
        ),
        model=f"{classifier.name} {classifier.version}",
        contact_sheet=str(sheet),
        night=night,
        per_frame=per_frame,
    )


def _iso(moment: dt.datetime) -> str:
    """``moment`` in UTC as ISO 8601 with microseconds and a Z."""
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _contact_sheet(
    per_frame: list[dict[str, Any]], classifier: Any, s3: Any, bucket: str, path: Path
) -> None:
    """A few frames per verdict, as the model saw them, each captioned with the truth and the score."""
    from PIL import Image, ImageDraw

    from services.frames import read_frame

    verdicts = sorted({f["verdict"] for f in per_frame})
    rows = [[f for f in per_frame if f["verdict"] == v][:SHEET_PER_VERDICT] for v in verdicts]
    caption = 34
    sheet = Image.new("L", (SHEET_PER_VERDICT * (THUMB + 8) + 8, len(rows) * (THUMB + caption + 8) + 8), 24)
    draw = ImageDraw.Draw(sheet)
    for r, (verdict, frames) in enumerate(zip(verdicts, rows, strict=True)):
        top = 8 + r * (THUMB + caption + 8)
        for c, frame in enumerate(frames):
            left = 8 + c * (THUMB + 8)
            key = frame["source"].split(f"s3://{bucket}/", 1)[1]
            raw = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            try:
                pixels = classifier.prepare(read_frame(raw).data)[0]
                thumb = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).resize((THUMB, THUMB))
                sheet.paste(thumb, (left, top))
            except UserError:
                draw.rectangle((left, top, left + THUMB, top + THUMB), outline=128)
            score = "" if frame["score"] is None else f" {frame['score']:.2f}"
            draw.text((left, top + THUMB + 3), f"{verdict}{score}", fill=255)
            mark = "ok" if frame["truth"] == verdict else "WRONG"
            draw.text((left, top + THUMB + 17), f"truth {frame['truth']} ({mark})", fill=200)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def print_summary(result: DemoResult, console: Any) -> None:
    """The demo's figures: accuracy with its counts, the confusion matrix, throughput, where the sheet is."""
    from rich.table import Table

    console.print(
        f"night {result.night}: {result.frames} frames, {result.correct} of {result.frames} verdicts right "
        f"({result.accuracy:.1%}) with {result.model}"
    )
    table = Table(title="truth (rows) x verdict (columns)")
    columns = [
        c for c in next(iter(result.confusion.values())) if any(r[c] for r in result.confusion.values())
    ]
    table.add_column("truth")
    for column in columns:
        table.add_column(column, justify="right")
    for truth, row in result.confusion.items():
        table.add_row(truth, *(str(row[c]) for c in columns))
    console.print(table)
    console.print(
        f"throughput: {result.frames_per_second:.2f} frames/s from the first upload to the last verdict "
        f"({result.seconds:.1f} s); median {result.model_seconds_per_frame * 1000:.0f} ms of work per frame"
    )
    console.print(f"contact sheet: {result.contact_sheet}")
