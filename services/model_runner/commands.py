"""The model runner's commands: ``tessera run``, ``submit``, ``worker model-runner`` and ``demo``.

:func:`register` adds them to the ``tessera`` parser; every handler returns an exit status and turns a
UserError into one line on stderr and status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import UserError
from services.jobs.commands import (
    add_queue_worker_options,
    log_to_stderr,
    serve_until_stopped,
    service_main,
    user_errors,
    worker_overrides,
)
from services.scenes.synthetic import DEFAULT_DENSITY

PROVIDERS = ("auto", "cpu", "cuda")


def _pair(values: Sequence[int] | None, option: str) -> list[int] | None:
    if values is None:
        return None
    if len(values) > 2:
        raise UserError(f"{option} takes X [Y]: one number for both, or two; got {len(values)}")
    return [values[0], values[0]] if len(values) == 1 else list(values)


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """An image request (JSON object, not yet validated) from the options ``run`` and ``submit`` share."""
    request: dict[str, Any] = {"schema": "tessera.image-request/v1", "image": args.image, "model": args.model}
    if args.job_id:
        request["job_id"] = args.job_id
    if args.tile:
        request["tile_size"] = list(args.tile)
    if args.overlap:
        request["overlap"] = _pair(args.overlap, "--overlap")
    if args.region:
        request["region_size"] = _pair(args.region, "--region")
    if args.batch is not None:
        request["batch_size"] = args.batch
    if getattr(args, "scale", None):
        from services.tiling.scaling import ScalingRule, rule_to_json

        rule = ScalingRule.parse(args.scale)
        request["scaling"] = rule_to_json(rule) if rule is not None else None
    merge: dict[str, Any] = {}
    if args.score is not None:
        merge["score_threshold"] = args.score
    if args.merge:
        merge["algorithm"] = args.merge
    if args.iou is not None:
        merge["iou"] = args.iou
    if args.ios is not None:
        merge["ios"] = args.ios
    if merge:
        request["merge"] = merge
    if args.roi:
        try:
            text = Path(args.roi).read_text(encoding="utf-8")
        except OSError as error:
            raise UserError(f"cannot read the region of interest {args.roi}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(
                f"the region of interest {args.roi} is not UTF-8 text; give GeoJSON or WKT in a text file"
            ) from None
        request["roi"] = {"geometry": text, "crs": args.roi_crs}
    properties = {}
    for item in args.property or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--property {item!r}: write it as KEY=VALUE")
        properties[key] = value
    if properties:
        request["properties"] = properties
    out = args.out
    if "://" in out and not out.startswith("s3://"):
        raise UserError(f"--out {out}: give a local path or s3://BUCKET/PREFIX, not {out.split('://')[0]}://")
    request["outputs"] = {"s3": out} if out.startswith("s3://") else {"path": out}
    return request


def _add_request_options(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    parser.add_argument("image", help="the raster: a path or s3://bucket/key")
    parser.add_argument("--model", required=True, help="the ONNX detector: a path, file:// or s3:// URI")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument(
        "--tile", type=int, nargs=2, metavar=("W", "H"), help="tile size (default: the model's)"
    )
    parser.add_argument(
        "--overlap", type=int, nargs="+", metavar="PX", help="tile overlap, X [Y] pixels (default: tile / 8)"
    )
    parser.add_argument(
        "--region", type=int, nargs="+", metavar="PX", help="region size, W [H] pixels (default: 8192)"
    )
    parser.add_argument(
        "--batch",
        type=int,
        help="tiles per model call (default: the model's fixed batch, else 8 on a GPU and on a CPU as many "
        "tiles as fit in 8 MiB of float32 input: 2 of 512 x 512 x 3)",
    )
    parser.add_argument(
        "--scale",
        metavar="RULE",
        help="how pixels become model input where the model's metadata does not say (float, signed or "
        "1-band images): MIN,MAX (that range is the model's), 'none' (values as they are), or 'replicate' "
        "(one band fed to every channel)",
    )
    parser.add_argument("--score", type=float, help="drop detections scoring below this (default: 0.25)")
    parser.add_argument("--merge", choices=["nms+ios", "nms"], help="duplicate merge (default: nms+ios)")
    parser.add_argument("--iou", type=float, help="NMS IoU threshold (default: 0.5)")
    parser.add_argument("--ios", type=float, help="containment threshold (default: 0.8)")
    parser.add_argument("--roi", help="a file holding the region of interest as GeoJSON or WKT")
    parser.add_argument(
        "--roi-crs",
        choices=["lonlat", "map"],
        default="lonlat",
        help="coordinates of --roi (default: lonlat)",
    )
    parser.add_argument("--property", action="append", metavar="KEY=VALUE", help="an extra feature property")
    parser.add_argument("--job-id", help="the job id (default: a new one)")


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.inference.run_control import ModelStuckError
    from services.model_runner.pipeline import JobPlan, run_image
    from services.model_runner.request import parse_request
    from services.registry import is_registry_ref

    request = parse_request(request_from_args(args))
    if request.model is not None and is_registry_ref(request.model):
        from services.cloud.database import configured, connect
        from services.cloud.embedded import local_database
        from services.model_runner.handler import pin_model

        # The configured registry, else this machine's own (where `tessera train --register` put it).
        with contextlib.ExitStack() as stack:
            url = None if configured() else stack.enter_context(local_database())
            request = pin_model(stack.enter_context(connect(url)), request)
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]tiles"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task("tiles", total=None, rate="")

    shown: list[bool] = []

    def on_plan(plan: JobPlan) -> None:
        # The bar starts once the plan is known: an error found before (a bad output, model or image) is
        # the only line printed.
        console.print(
            f"{plan.tiles_total} tiles in {len(plan.regions)} regions of {plan.image_width}x"
            f"{plan.image_height} px; Ctrl-C stops"
        )
        progress.update(task, total=plan.tiles_total)
        progress.start()
        shown.append(True)

    def on_tiles(count: int) -> None:
        progress.advance(task, count)
        speed = progress.tasks[task].speed
        if speed:
            progress.update(task, rate=f"{speed:.1f} tiles/s")

    try:
        summary = run_image(
            request,
            providers=args.providers,
            on_plan=on_plan,
            on_tiles=on_tiles,
            scaling_rule=request.scaling,
        )
    except ModelStuckError as error:
        # A thread still runs the batch that would not stop, and a normal exit would wait for it.
        if shown:
            progress.stop()
        print(f"tessera run: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    finally:
        if shown:
            progress.stop()
    print(f"job        {summary.job_id}")
    print(f"regions    {summary.regions}")
    print(f"tiles      {summary.tiles} ({summary.skipped} all-nodata skipped)")
    print(f"detections {summary.detections}")
    checks = summary.checks
    if checks.dropped or checks.changed:
        # What the model returned that could not be written as it was (see services/inference/detections).
        print(
            f"model boxes dropped {checks.dropped} (non-finite {checks.non_finite}, inverted "
            f"{checks.inverted}, outside the tile {checks.outside}); clipped to the tile {checks.clipped}, "
            f"scores clamped {checks.score_clamped}"
        )
    print(f"speed      {summary.tiles_per_second:.1f} tiles/s end to end ({summary.seconds:.1f} s)")
    print(f"provider   {summary.provider}")
    for uri in summary.outputs:
        print(f"output     {uri}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from services.cloud.queue import send_message
    from services.model_runner.request import parse_request
    from services.model_runner.worker import IMAGE_QUEUE_ENV

    request = parse_request(request_from_args(args))
    queue_url = args.queue_url or os.environ.get(IMAGE_QUEUE_ENV)
    if not queue_url:
        raise UserError(f"no image queue: pass --queue-url or set {IMAGE_QUEUE_ENV}")
    message_id = send_message(queue_url, request.to_json())
    print(request.job_id)
    print(f"submitted job {request.job_id} (message {message_id})", file=sys.stderr)
    if args.print_request:
        print(json.dumps(request.to_json(), indent=2), file=sys.stderr)
    return 0


def add_worker_options(worker: argparse.ArgumentParser) -> None:
    """The options of ``tessera worker model-runner``."""
    add_queue_worker_options(worker, wait_s=1, records="the regions it runs")
    worker.add_argument("--providers", choices=PROVIDERS, default="auto", help="ONNX Runtime provider")


def run_worker(args: argparse.Namespace) -> int:
    """Serve the image and region queues (``tessera worker model-runner``)."""
    return user_errors("worker", _worker)(args)


def _worker(args: argparse.Namespace) -> int:
    from services.model_runner.worker import Worker, WorkerSettings

    log_to_stderr()
    settings = WorkerSettings.from_env(providers=args.providers, **worker_overrides(args))
    return serve_until_stopped(
        lambda: Worker(settings), on_signal="finishing the message in hand, then stopping", once=args.once
    )


def _demo(args: argparse.Namespace) -> int:
    from services.model_runner.demo import DemoSettings, run_demo

    settings = DemoSettings(
        out_dir=Path(args.out_dir),
        width=args.size[0],
        height=args.size[1],
        region=args.region,
        workers=args.workers,
        seed=args.seed,
        model=Path(args.model) if args.model else None,
        timeout_s=args.timeout,
    )
    return run_demo(settings)


def _scene_make(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from services.scenes.geotiff import write_scene_geotiff
    from services.scenes.truth import write_truth

    out = Path(args.out)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise UserError(f"{out}: give the scene a .tif name (it is a GeoTIFF)")
    width, height = args.size
    if width < 64 or height < 64:
        raise UserError(f"--size {width} {height}: a scene is at least 64 x 64 pixels")
    truth = Path(args.truth) if args.truth else out.with_suffix(".truth.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with Progress(transient=True) as progress:
        task = progress.add_task(f"writing a {width} x {height} scene", total=None)
        layout = write_scene_geotiff(
            out,
            width,
            height,
            seed=args.seed,
            density=args.density,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    write_truth(truth, layout, out.name)
    counts = np.bincount(layout.labels, minlength=len(layout.classes)).tolist()
    kinds = ", ".join(f"{n:,} {c}" for c, n in zip(layout.classes, counts, strict=True))
    print(f"{out}: {width} x {height} px, 3-band GeoTIFF, {len(layout):,} known objects ({kinds})")
    print(f"{truth}: the known objects; score a run with `tessera scene score DETECTIONS --truth {truth}`")
    return 0


def _scene_score(args: argparse.Namespace) -> int:
    from services.scenes.truth import score_file

    score = score_file(Path(args.detections), Path(args.truth), iou=args.iou, min_score=args.score)
    found = score.true_positives + score.false_positives
    known = score.true_positives + score.false_negatives
    rows = {
        "detections": f"{found:,}",
        "known objects": f"{known:,}",
        f"right (IoU >= {args.iou:g})": f"{score.true_positives:,}",
        "false": f"{score.false_positives:,}",
        "missed": f"{score.false_negatives:,}",
        "precision": f"{score.precision:.4f}" if found else "- (no detections)",
        "recall": f"{score.recall:.4f}" if known else "- (no known objects)",
    }
    if args.json:
        print(
            json.dumps(
                {
                    "true_positives": score.true_positives,
                    "false_positives": score.false_positives,
                    "false_negatives": score.false_negatives,
                    **score.rates(),
                }
            )
        )
    else:
        for name, value in rows.items():
            print(f"{name:>20}  {value}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``run``, ``submit``, ``demo`` and ``scene`` to the ``tessera`` command parser's subparsers."""
    scene = subparsers.add_parser(
        "scene", help="make a georeferenced test scene with known objects; score detections against it"
    )
    scene_verbs = scene.add_subparsers(dest="verb", required=True, metavar="VERB")
    make = scene_verbs.add_parser("make", help="write a scene GeoTIFF and its truth file (the known objects)")
    make.add_argument("out", help="the GeoTIFF to write, e.g. scene.tif")
    make.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("W", "H"),
        default=[4096, 4096],
        help="pixels (default: 4096 4096)",
    )
    make.add_argument("--seed", type=int, default=7, help="the scene's seed: the same seed, the same scene")
    make.add_argument(
        "--density",
        type=float,
        default=DEFAULT_DENSITY,
        help=f"objects per megapixel (default: {DEFAULT_DENSITY:g})",
    )
    make.add_argument("--truth", help="the truth file to write (default: OUT with .truth.json)")
    make.set_defaults(handler=user_errors("scene make", _scene_make))
    score = scene_verbs.add_parser(
        "score", help="precision and recall of a `tessera run` GeoJSON against a truth file"
    )
    score.add_argument("detections", help="the GeoJSON `tessera run` wrote")
    score.add_argument("--truth", required=True, help="the truth file `tessera scene make` wrote")
    score.add_argument("--iou", type=float, default=0.5, help="IoU a match needs (default: 0.5)")
    score.add_argument(
        "--score", type=float, default=0.0, help="ignore detections scoring below this (default: 0)"
    )
    score.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    score.set_defaults(handler=user_errors("scene score", _scene_score))

    run = subparsers.add_parser(
        "run", help="detect objects in an image in this process (no queues) and write GeoJSON"
    )
    _add_request_options(run, out_help="the GeoJSON to write: a path or s3://bucket/prefix")
    run.add_argument(
        "--providers", choices=PROVIDERS, default="auto", help="ONNX Runtime provider (default: auto)"
    )
    run.set_defaults(handler=user_errors("run", _run))

    submit = subparsers.add_parser("submit", help="put an image request on the model runner's queue")
    _add_request_options(
        submit, out_help="where the workers write the GeoJSON: s3://bucket/prefix (or a path the workers see)"
    )
    submit.add_argument(
        "--queue-url", help="the image request queue (default: $TESSERA_QUEUE_IMAGE_REQUESTS_URL)"
    )
    submit.add_argument("--print-request", action="store_true", help="also print the request sent")
    submit.set_defaults(handler=user_errors("submit", _submit))

    demo = subparsers.add_parser(
        "demo",
        help="the model runner end to end on the embedded default: moto, PostgreSQL, a scene, two workers",
    )
    demo.add_argument(
        "--out-dir", default="out/demo", help="where the GeoJSON and preview go (default: out/demo)"
    )
    demo.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("W", "H"),
        default=[8192, 8192],
        help="scene size in pixels (default: 8192 8192)",
    )
    demo.add_argument("--region", type=int, default=2048, help="region size in pixels (default: 2048)")
    demo.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    demo.add_argument("--seed", type=int, default=7, help="scene seed (default: 7)")
    demo.add_argument("--model", help="detector ONNX (default: services/models/tessera-demo-detector.onnx)")
    demo.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    demo.set_defaults(handler=user_errors("demo", _demo))


def main(argv: Sequence[str] | None = None) -> int:
    """These commands on their own (``python -m services.model_runner.commands ...``)."""
    return service_main(
        argv,
        register=register,
        service="model-runner",
        worker_help="serve the model runner's queues",
        add_worker_options=add_worker_options,
        run_worker=run_worker,
    )


if __name__ == "__main__":
    raise SystemExit(main())
