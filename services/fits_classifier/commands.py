"""``tessera fits ...``: classify telescope frames (``classify``), the cron replacement (``watch``), the
endpoint for other systems (``serve``), the whole loop on the embedded default (``demo``); and
``tessera worker fits-classifier``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from services.errors import UserError
from services.jobs.commands import user_errors

MODEL_ENV = "TESSERA_FITS_MODEL"
#: Exit status of ``classify`` when some frame was unreadable (its verdict says why).
EXIT_UNREADABLE = 1


def load_classifier(model: str | None, *, providers: str = "auto") -> Any:
    """The classifier at ``model`` (a path or ``s3://`` URL; default ``$TESSERA_FITS_MODEL``, else the shipped
    one)."""
    from services.fits_classifier.model import SHIPPED_MODEL, FrameClassifier

    chosen = model or os.environ.get(MODEL_ENV) or str(SHIPPED_MODEL)
    if chosen.startswith("s3://"):
        from services.cloud.objects import read_object

        return FrameClassifier(read_object(chosen), providers=providers, name=Path(chosen).stem)
    if not Path(chosen).is_file():
        raise UserError(f"model {chosen} does not exist; give --model PATH or s3://bucket/key.onnx")
    return FrameClassifier(chosen, providers=providers)


def _classify(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.fits_classifier.batch import classify_sources
    from services.fits_classifier.output import AnnotatedStore
    from services.fits_classifier.sources import list_sources
    from services.fits_classifier.verdicts import CLASSIFIED, Verdict

    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    classifier = load_classifier(args.model)
    sources = list_sources(args.targets)
    report: IO[str] | None = None
    if args.report:
        report_path = Path(args.report)
        try:
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report = report_path.open("w", encoding="utf-8")
        except OSError as error:
            raise UserError(f"cannot write the report {report_path}: {error.strerror or error}") from None
    store = AnnotatedStore(args.annotated) if args.annotated else None
    database = _database(args.record)
    console = Console(stderr=True)
    console.print(f"{len(sources)} frames; model {classifier.describe()}")
    progress = Progress(
        TextColumn("[bold]frames"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    task = progress.add_task("frames", total=len(sources))
    verdicts: list[Verdict] = []

    def on_verdict(verdict: Verdict, raw: bytes) -> None:
        annotated = store.put(verdict, raw) if store is not None and verdict.status == CLASSIFIED else None
        if database is not None:
            from services.fits_classifier.records import record

            record(database, verdict, annotated=annotated)
        if report is not None:
            report.write(json.dumps({**verdict.as_json(), "annotated": annotated}) + "\n")
            report.flush()
        verdicts.append(verdict)
        progress.advance(task)

    started = time.perf_counter()
    try:
        with progress:
            classify_sources(
                classifier, sources, batch_size=args.batch, hdu=_hdu(args.hdu), on_verdict=on_verdict
            )
    finally:
        if report is not None:
            report.close()
        if database is not None:
            database.close()
    seconds = time.perf_counter() - started
    _print_table(verdicts, sys.stdout)
    tally = Counter(v.verdict for v in verdicts)
    rate = len(verdicts) / seconds if seconds > 0 else 0.0
    print(
        f"{len(verdicts)} frames in {seconds:.1f} s ({rate:.2f} frames/s): "
        + ", ".join(f"{n} {name}" for name, n in sorted(tally.items()))
    )
    if args.report:
        print(f"report: {args.report}")
    unreadable = sum(1 for v in verdicts if v.status != CLASSIFIED)
    return EXIT_UNREADABLE if unreadable else 0


def _hdu(text: str | None) -> int | str | None:
    if text is None:
        return None
    return int(text) if text.isdigit() else text


def _database(wanted: bool) -> Any:
    if not wanted:
        return None
    from services.cloud.database import apply_migrations, connect

    conn = connect()
    apply_migrations(conn)
    return conn


def _print_table(verdicts: Sequence[Any], out: IO[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    for column in ("frame", "verdict", "score", "note"):
        table.add_column(column, justify="right" if column == "score" else "left")
    for verdict in verdicts:
        table.add_row(
            verdict.source,
            verdict.verdict,
            "" if verdict.score is None else f"{verdict.score:.3f}",
            verdict.reason or "",
        )
    Console(file=out, width=200, soft_wrap=True).print(table)


def _watch(args: argparse.Namespace) -> int:
    import signal
    import threading

    from services.fits_classifier.output import AnnotatedStore
    from services.fits_classifier.verdicts import Verdict
    from services.fits_classifier.watch import Watcher

    for name in ("settle", "patience", "poll"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be 0 or more seconds, got {getattr(args, name)}")
    classifier = load_classifier(args.model)
    database = _database(args.record)

    def show(verdict: Verdict) -> None:
        score = "" if verdict.score is None else f" {verdict.score:.3f}"
        note = f"  ({verdict.reason})" if verdict.reason else ""
        print(
            f"{verdict.classified_at:%H:%M:%S}  {verdict.verdict:<14}{score:>6}  {verdict.source}{note}",
            flush=True,
        )

    watcher = Watcher(
        Path(args.directory),
        classifier,
        Path(args.report),
        settle_s=args.settle,
        patience_s=args.patience,
        annotated=AnnotatedStore(args.annotated) if args.annotated else None,
        on_verdict=show,
        database=database,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(
        f"watching {args.directory} (a frame is judged once unchanged for {args.settle:g} s); "
        f"model {classifier.name} {classifier.version}; report {args.report}; Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    try:
        if args.once:
            watcher.scan(now=float("inf"))  # everything present counts as settled
        else:
            watcher.run(stop, args.poll)
    finally:
        watcher.close()
        if database is not None:
            database.close()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from services.fits_classifier.demo import DemoSettings, run_demo

    settings = DemoSettings(
        out_dir=Path(args.out),
        frames=args.frames,
        side=args.side,
        workers=args.workers,
        seed=args.seed,
        model=Path(args.model) if args.model else None,
        timeout_s=args.timeout,
        interval_s=args.interval,
    )
    return run_demo(settings)


def _evaluate(args: argparse.Namespace) -> int:
    from services.fits_classifier.demo import evaluate

    if args.frames < 1:
        raise UserError(f"--frames must be at least 1, got {args.frames}")
    classifier = load_classifier(args.model)
    print(f"model {classifier.describe()}", file=sys.stderr)
    result = evaluate(classifier, args.frames, side=args.side, seed=args.seed)
    names = list(next(iter(result.confusion.values())))
    width = max(len(n) for n in names) + 2
    print(
        f"{result.correct} of {result.frames} verdicts right ({result.accuracy:.1%}) on generated frames "
        f"of {args.side} px, seed {args.seed}"
    )
    print("truth \\ verdict".ljust(18) + "".join(n.rjust(width) for n in names))
    for truth, row in result.confusion.items():
        print(truth.ljust(18) + "".join(str(row[n]).rjust(width) for n in names))
    print(f"{result.seconds_per_frame:.2f} s per frame (generating included)")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "frames": result.frames,
                    "correct": result.correct,
                    "accuracy": result.accuracy,
                    "confusion": result.confusion,
                },
                indent=2,
            )
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from services.fits_classifier.endpoint import serve
    from services.jobs.commands import log_to_stderr

    log_to_stderr()
    classifier = load_classifier(args.model)
    database_url = None
    if args.record:
        from services.cloud.database import database_url as configured_database

        database_url = configured_database()
    return serve(
        classifier,
        host=args.host,
        port=args.port,
        max_bytes=args.max_bytes,
        timeout_s=args.timeout,
        database_url=database_url,
        max_concurrent=args.max_concurrent,
    )


def add_worker_options(worker: argparse.ArgumentParser) -> None:
    """The options of ``tessera worker fits-classifier``."""
    from services.jobs.commands import add_queue_worker_options

    add_queue_worker_options(worker, wait_s=1, records="the frames it judges")
    worker.add_argument(
        "--providers", choices=["auto", "cpu", "cuda"], default="auto", help="ONNX Runtime provider"
    )


def run_worker(args: argparse.Namespace) -> int:
    """Serve the fits-frames queue (``tessera worker fits-classifier``)."""
    return user_errors("worker", _worker)(args)


def _worker(args: argparse.Namespace) -> int:
    from services.fits_classifier.worker import Worker, WorkerSettings
    from services.jobs.commands import log_to_stderr, serve_until_stopped, worker_overrides

    log_to_stderr()
    settings = WorkerSettings.from_env(**worker_overrides(args))
    classifier = load_classifier(settings.model, providers=args.providers)
    return serve_until_stopped(
        lambda: Worker(settings, classifier), on_signal="finishing the frame in hand, then stopping"
    )


def register(subparsers: Any) -> None:
    """Add ``fits`` (``classify``) to the ``tessera`` command parser's subparsers."""
    fits = subparsers.add_parser("fits", help="telescope frames checked for mirror wobble and shutter faults")
    verbs = fits.add_subparsers(dest="verb", required=True, metavar="VERB")
    classify = verbs.add_parser(
        "classify",
        help="classify FITS frames (files, folders, s3:// prefixes) with a table and a JSON lines report",
        description=(
            "Classify every FITS frame named (folders and s3:// prefixes searched for .fits, .fit, .fts, "
            "their .gz forms and .fz). Exit status 0 when every frame was classified, 1 when some were "
            "unreadable (their verdicts say why), 2 on a usage error."
        ),
    )
    classify.add_argument("targets", nargs="+", metavar="FILE|DIR|s3://prefix")
    classify.add_argument(
        "--model", help=f"the classifier (.onnx path or s3:// URL; default ${MODEL_ENV} or the shipped one)"
    )
    classify.add_argument("--report", help="write one JSON line per frame here")
    classify.add_argument(
        "--annotated",
        metavar="DIR|s3://prefix",
        help="write a copy of each frame with its verdict in the header",
    )
    classify.add_argument(
        "--record", action="store_true", help="record the verdicts in the database ($TESSERA_DB_URL)"
    )
    classify.add_argument(
        "--hdu", help="classify this HDU (EXTNAME or index) in every file (default: the first image)"
    )
    classify.add_argument("--batch", type=int, default=8, help="frames per model call (default 8)")
    classify.set_defaults(handler=user_errors("fits classify", _classify))
    watch = verbs.add_parser(
        "watch",
        help="classify new frames as they arrive in a folder, each once (the cron job's replacement)",
        description=(
            "Watch DIR (recursively) and classify each new or changed FITS frame once it is complete: "
            "unchanged for --settle seconds; a frame still cut short then gets --patience seconds more. "
            "What was judged is kept in the report, so a restarted watcher judges only what is new."
        ),
    )
    watch.add_argument("directory", metavar="DIR")
    watch.add_argument("--model", help="the classifier (.onnx path or s3:// URL)")
    watch.add_argument(
        "--report", default="fits-verdicts.jsonl", help="JSON lines report and memory (default %(default)s)"
    )
    watch.add_argument(
        "--annotated", metavar="DIR|s3://prefix", help="write a copy of each frame with its verdict"
    )
    watch.add_argument(
        "--record", action="store_true", help="record the verdicts in the database ($TESSERA_DB_URL)"
    )
    watch.add_argument(
        "--settle", type=float, default=2.0, help="seconds a file must stay unchanged (default 2)"
    )
    watch.add_argument(
        "--patience", type=float, default=60.0, help="seconds a cut-short file may still grow (default 60)"
    )
    watch.add_argument("--poll", type=float, default=1.0, help="seconds between looks (default 1)")
    watch.add_argument("--once", action="store_true", help="judge what is there now, then exit")
    watch.set_defaults(handler=user_errors("fits watch", _watch))
    serve = verbs.add_parser(
        "serve",
        help="classify frames POSTed over HTTP (POST /classify, GET /health), for other systems",
        description=(
            "Serve the classifier over HTTP: POST /classify with a FITS file as the body (?name= names the "
            "frame) answers its verdict as JSON, 200, or 422 when the file is unreadable; GET /health "
            "answers "
            "without a token. Binds 127.0.0.1 unless --host says otherwise; any other address needs a bearer "
            "token in $TESSERA_FITS_TOKEN (clients send 'Authorization: Bearer <token>'). SIGTERM or Ctrl-C "
            "stops."
        ),
    )
    serve.add_argument("--model", help="the classifier (.onnx path or s3:// URL; default: the shipped one)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    serve.add_argument(
        "--port", type=int, default=8090, help="port (default %(default)s; 0 picks a free one)"
    )
    serve.add_argument("--max-bytes", type=int, default=64 * 2**20, help="largest body accepted (bytes)")
    serve.add_argument(
        "--timeout", type=float, default=60.0, help="seconds for headers, and again for the body"
    )
    serve.add_argument(
        "--max-concurrent",
        type=int,
        help="uploads read and classified at once; more get 503 with Retry-After "
        "(default: $TESSERA_FITS_MAX_CONCURRENT, else 4)",
    )
    serve.add_argument("--record", action="store_true", help="record the verdicts in the database")
    serve.set_defaults(handler=user_errors("fits serve", _serve))
    evaluate = verbs.add_parser(
        "evaluate",
        help="score a classifier on freshly generated labelled frames (accuracy and confusion matrix)",
    )
    evaluate.add_argument("--model", help="the classifier (default: the shipped one)")
    evaluate.add_argument("--frames", type=int, default=150, help="frames to generate (default %(default)s)")
    evaluate.add_argument("--side", type=int, default=2048, help="frame side in pixels (default %(default)s)")
    evaluate.add_argument("--seed", type=int, default=777, help="seed of the frames (default %(default)s)")
    evaluate.add_argument("--json", help="also write the figures here")
    evaluate.set_defaults(handler=user_errors("fits evaluate", _evaluate))
    demo = verbs.add_parser(
        "demo",
        help="a night of frames classified as they arrive, on the embedded default (moto + PostgreSQL)",
    )
    demo.add_argument(
        "--out", default="out/fits-demo", help="where the contact sheet and logs go (%(default)s)"
    )
    demo.add_argument("--frames", type=int, default=60, help="frames in the night (default %(default)s)")
    demo.add_argument("--side", type=int, default=2048, help="frame side in pixels (default %(default)s)")
    demo.add_argument("--workers", type=int, default=2, help="worker processes (default %(default)s)")
    demo.add_argument("--seed", type=int, default=2026, help="the night's seed (default %(default)s)")
    demo.add_argument("--model", help="the classifier (default: the shipped one)")
    demo.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the verdicts")
    demo.add_argument(
        "--interval",
        type=float,
        default=0.0,
        help="seconds between uploads, like a camera's cadence (default: 0, as fast as they are made)",
    )
    demo.set_defaults(handler=user_errors("fits demo", _demo))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m services.fits_classifier.commands ...``."""
    from services.cli import main as cli_main

    return cli_main(["fits", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
