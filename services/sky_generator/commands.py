"""``tessera sky ...``: render a sky job here (``render``), put one on the queue (``submit``), run the
celnav loop end to end (``demo``); and ``tessera worker sky-generator``."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.errors import UserError
from services.jobs.commands import (
    add_queue_worker_options,
    log_to_stderr,
    serve_until_stopped,
    user_errors,
    worker_overrides,
)

QUEUE_ENV = "TESSERA_QUEUE_SKY_REQUESTS_URL"


def check_directory(directory: Path) -> None:
    """Refuse, before any rendering, a directory that cannot be made or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".tessera-probe-"):
            pass
    except OSError as error:
        raise UserError(
            f"cannot write to {directory}: {error.strerror or error}; give another --out"
        ) from None


def _render(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.sky_generator.job import load_job_file, samples
    from services.sky_generator.shards import MANIFEST, merge_parts, render_shard, write_text
    from services.sky_generator.stellarium import find_programs, stellarium_version

    job = load_job_file(args.job)
    if args.out:
        job_dir = Path(args.out)
    elif job.output.startswith("s3://"):
        raise UserError(
            f"the job writes to {job.output}: `tessera sky render` renders here, so give --out DIR "
            "(or `tessera sky submit` the job to the workers, which write to S3)"
        )
    else:
        job_dir = Path(job.output) / job.job_id
    shards = _chosen_shards(args.shards, job.shards)
    find_programs()
    for shard in shards:  # every frame drawn before any is rendered: a nightless range is refused now
        samples(job, shard)
    check_directory(job_dir)
    version = stellarium_version()
    console = Console(stderr=True)
    frames = sum(min(job.frames_per_shard, job.count - s * job.frames_per_shard) for s in shards)
    console.print(
        f"job {job.job_id}: {frames} frames in {len(shards)} shards of {job.frames_per_shard}, "
        f"{job.camera.width}x{job.camera.height} px, Stellarium {version}; Ctrl-C stops"
    )
    progress = Progress(
        TextColumn("[bold]frames"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task("frames", total=frames, note="")
    started = time.monotonic()
    results = []
    with progress:
        for shard in shards:
            progress.update(task, note=f"shard {shard}")
            results.append(
                render_shard(job, shard, job_dir, version=version, on_frame=lambda _: progress.advance(task))
            )
    parts = sorted(job_dir.glob("parts/shard-*.jsonl"))
    merged = merge_parts(p.read_text() for p in parts)
    write_text(job_dir / MANIFEST, merged)
    seconds = time.monotonic() - started
    verdicts = [r["geometry"]["verdict"] for result in results for r in result.rows]
    medians = sorted(m for result in results if (m := result.median_px) is not None)
    worst = max((w for result in results if (w := result.worst_px) is not None), default=None)
    print(f"job        {job.job_id}")
    rate = len(verdicts) / seconds if seconds > 0 else 0.0
    print(f"frames     {len(verdicts)} in {len(results)} shards ({seconds:.1f} s, {rate:.2f} frames/s)")
    print(
        f"geometry   {verdicts.count('pass')} frames proven, {verdicts.count('unverifiable')} with too few "
        "bright stars to tell"
        + (
            f"; median error {medians[len(medians) // 2]:.2f} px, worst star {worst:.2f} px"
            if medians
            else ""
        )
    )
    print(f"manifest   {job_dir / MANIFEST} ({len(merged.splitlines())} frames from {len(parts)} parts)")
    print(f"frames in  {job_dir / 'frames'}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    import json

    from services.cloud.queue import send_message
    from services.sky_generator.job import load_job_file

    job = load_job_file(args.job)
    queue_url = args.queue_url or os.environ.get(QUEUE_ENV)
    if not queue_url:
        raise UserError(f"no sky-requests queue: pass --queue-url or set {QUEUE_ENV}")
    message_id = send_message(queue_url, job.to_json())
    print(job.job_id)
    print(
        f"submitted sky job {job.job_id}: {job.count} frames in {job.shards} shards (message {message_id})",
        file=sys.stderr,
    )
    if args.print_job:
        print(json.dumps(job.to_json(), indent=2), file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from datetime import date

    from services.sky_generator.demo import DemoSettings, run_demo

    try:
        night_of = date.fromisoformat(args.night_of)
    except ValueError:
        raise UserError(f"--night-of {args.night_of!r}: give a date such as 2024-01-15") from None
    settings = DemoSettings(
        out_dir=Path(args.out_dir),
        frames=args.frames,
        workers=args.workers,
        seed=args.seed,
        size=args.size,
        image_size=args.image_size,
        latitude=(args.latitude[0], args.latitude[1]),
        longitude=(args.longitude[0], args.longitude[1]),
        night_of=night_of,
        epochs=args.epochs,
        learning_curve=not args.no_learning_curve,
        timeout_s=args.timeout,
    )
    return run_demo(settings)


def _chosen_shards(text: str | None, total: int) -> list[int]:
    """``--shards`` (``3``, ``0-4``, ``1,5,7``) as shard numbers, checked against the job's ``total``."""
    if not text:
        return list(range(total))
    chosen: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            first, last = int(low), int(high or low)
            chosen.update(range(first, last + 1))
    except ValueError:
        raise UserError(f"--shards {text!r}: give shard numbers like 3, 0-4 or 1,5,7") from None
    bad = sorted(s for s in chosen if not 0 <= s < total)
    if bad or not chosen:
        raise UserError(f"--shards {text!r}: the job has shards 0..{total - 1}")
    return sorted(chosen)


def register(subparsers: Any) -> None:
    """Add ``sky`` (``render``, ``submit``, ``demo``) to the ``tessera`` command parser's subparsers."""
    sky = subparsers.add_parser("sky", help="labelled night-sky images for celestial navigation (Stellarium)")
    verbs = sky.add_subparsers(dest="verb", required=True, metavar="VERB")
    render = verbs.add_parser("render", help="render a sky job here, one Stellarium per shard, with progress")
    render.add_argument("job", help="the job file (YAML; see services/sky_generator/sample-job.yaml)")
    render.add_argument("--out", help="the directory to write (default: the job's output/<job_id>)")
    render.add_argument("--shards", help="only these shards: 3, 0-4 or 1,5,7 (default: all)")
    render.set_defaults(handler=user_errors("sky render", _render))
    submit = verbs.add_parser("submit", help="put a sky job on the sky generator's queue")
    submit.add_argument("job", help="the job file (YAML)")
    submit.add_argument("--queue-url", help=f"the sky-requests queue (default: ${QUEUE_ENV})")
    submit.add_argument("--print-job", action="store_true", help="also print the job sent, as JSON")
    submit.set_defaults(handler=user_errors("sky submit", _submit))
    demo = verbs.add_parser(
        "demo",
        help="celestial navigation end to end on the embedded default: render a night with two workers, "
        "train sky-position, score it against the centre of the region",
    )
    demo.add_argument(
        "--out-dir", default="out/sky-demo", help="where everything goes (default: out/sky-demo)"
    )
    demo.add_argument("--frames", type=int, default=300, help="frames to render (default: 300)")
    demo.add_argument("--workers", type=int, default=2, help="sky worker processes (default: 2)")
    demo.add_argument("--seed", type=int, default=7, help="the job's and the training's seed (default: 7)")
    demo.add_argument("--size", type=int, default=256, help="frame width and height rendered (default: 256)")
    demo.add_argument(
        "--image-size",
        type=int,
        default=128,
        help="frame size the network sees, a multiple of 64 (default: 128)",
    )
    demo.add_argument(
        "--latitude",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=[42.0, 44.0],
        help="the region's latitude band, degrees (default: 42 44)",
    )
    demo.add_argument(
        "--longitude",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=[-70.0, -68.0],
        help="the region's longitude band, degrees east (default: -70 -68)",
    )
    demo.add_argument(
        "--night-of", default="2024-01-15", help="the night's evening date (default: 2024-01-15)"
    )
    demo.add_argument("--epochs", type=int, default=200, help="training epochs (default: 200)")
    demo.add_argument(
        "--no-learning-curve",
        action="store_true",
        help="skip the smaller training runs that estimate the frames needed when the model loses",
    )
    demo.add_argument(
        "--timeout", type=float, default=900.0, help="give up on the sky job after this many seconds"
    )
    demo.set_defaults(handler=user_errors("sky demo", _demo))


def add_worker_options(worker: argparse.ArgumentParser) -> None:
    """The options of ``tessera worker sky-generator``."""
    add_queue_worker_options(worker, wait_s=1, records="the shards it renders")


def run_worker(args: argparse.Namespace) -> int:
    """Serve the sky-requests queue (``tessera worker sky-generator``)."""
    return user_errors("worker", _worker)(args)


def _worker(args: argparse.Namespace) -> int:
    from services.sky_generator.worker import Worker, WorkerSettings

    log_to_stderr()
    settings = WorkerSettings.from_env(**worker_overrides(args))
    return serve_until_stopped(
        lambda: Worker(settings), on_signal="finishing the shard in hand, then stopping"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m services.sky_generator.commands ...``."""
    from services.cli import main as cli_main

    return cli_main(["sky", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
