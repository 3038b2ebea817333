"""Pipeline against its physical floor: decode-only time + raw model time ÷ end-to-end time, on one image.

Run: ``.venv/bin/python bench/floor.py`` (a 16,000 x 16,000 px 3-band uint8 DEFLATE GeoTIFF in 256 px
blocks, tiles 512 px overlapping by 128 px, the near-free model); ``--model demo`` for the shipped demo
detector, ``--model PATH`` for any detector-contract ONNX file; ``--quick`` for a small smoke run.

Three things are timed on the same image, in turn, ``--repeat`` times (the fastest of each is kept, so
that other work on a shared machine disturbs all three alike):

- **decode**: GDAL alone reading every block of the image once, whole block rows on every core (one thread
  per usable core), into NumPy arrays — what no pipeline can avoid;
- **raw model**: the same :class:`OnnxDetector` (same sessions, batches side by side through
  ``detect_many``) on float32 batches of real tiles of the image decoded and scaled beforehand, as many
  calls as the pipeline makes;
- **end to end**: what ``tessera run`` does once its model is loaded — open the image, plan, every region
  through ``detect_region``, the seam merge, the GeoJSON written;
- **side by side** (a diagnostic, not part of the ratio): decode and raw model at the same time with no
  pipeline between them — how much of the gap is the two sharing the cores, and how much the pipeline.

The **floor** is decode + raw model when the model runs on this CPU (both need the same cores), and the
larger of the two when it runs elsewhere (a GPU); **efficiency** = floor ÷ end to end (1.0: the pipeline
adds nothing of its own), from the fastest of each; beside it, the median of the rounds' own ratios (a
round times the three back to back, so where the machine's speed drifts between rounds that figure is the
steadier one, and its spread shows the noise). Time to the first tile — a fresh process importing the
pipeline, creating the sessions, opening the image and drawing the first batch — is measured in a child
process and reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from pipeline import Timed, predecode, time_raw

from services.inference.detector import OnnxDetector, usable_cores
from services.inference.session import CPU
from services.model_runner import model_setup, pipeline
from services.model_runner.request import ImageRequest, MergeSettings, Outputs
from services.tiling.reader import RasterSource
from services.tiling.windows import Window

GOAL = 0.85


def time_decode(path: Path, threads: int) -> Timed:
    """Every block of the image decoded once: whole block rows, ``threads`` at a time."""
    with harness.ThreadCpu() as cpu, RasterSource.open(str(path)) as source:
        rows = source.block_shape[0]
        bands = [
            Window(0, top, source.width, min(rows, source.height - top))
            for top in range(0, source.height, rows)
        ]
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tile-read") as pool:
            for _ in pool.map(source.read, bands):
                pass
        seconds = time.perf_counter() - started
    return Timed(0, seconds, len(bands), cpu.by_group())


def time_side_by_side(
    path: Path, threads: int, detector: OnnxDetector, sample: list[np.ndarray], calls: int
) -> Timed:
    """Decode and raw model at once, with no pipeline between them (each on its own threads, as alone):
    what sharing the cores costs by itself, apart from anything the pipeline does."""
    with harness.ThreadCpu() as cpu:
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="side-by-side") as pool:
            model = pool.submit(time_raw, detector, sample, calls)
            time_decode(path, threads)
            model.result()
        seconds = time.perf_counter() - started
    return Timed(calls * detector.batch_size, seconds, calls, cpu.by_group())


def floor_of(decode: Timed, raw: Timed, on_cpu: bool) -> float:
    """The floor: decode + raw model when both need this CPU, the larger of the two when the model runs
    elsewhere (a GPU)."""
    return decode.seconds + raw.seconds if on_cpu else max(decode.seconds, raw.seconds)


def run_end_to_end(request: ImageRequest, detector: OnnxDetector) -> tuple[Timed, pipeline.RunSummary]:
    """``tessera run`` with the model already loaded: open, plan, regions, seam merge, GeoJSON."""
    with harness.ThreadCpu() as cpu:
        started = time.perf_counter()
        summary = pipeline.run_image(request, detector=detector)
        seconds = time.perf_counter() - started
    return Timed(summary.tiles, seconds, 0, cpu.by_group()), summary


def digest(path: Path) -> str:
    """A short hash of the features written (boxes rounded to 0.01 px, scores to 1e-4, classes)."""
    features = json.loads(path.read_text())["features"]
    rows = sorted(
        (
            f["properties"].get("class"),
            tuple(round(v, 2) for v in f["properties"]["pixel_bbox"]),
            round(f["properties"]["score"], 4),
        )
        for f in features
    )
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:12]


FIRST_TILE_CHILD = """
import sys, time, json
started = time.perf_counter()
sys.path.insert(0, {repo!r})
from services.model_runner import model_setup, pipeline
from services.inference.detector import OnnxDetector
from services.tiling.batches import iter_tile_batches
from services.tiling.reader import RasterSource
imported = time.perf_counter()
detector = OnnxDetector({model!r}, providers={providers!r}, batch_size={batch})
sessions = time.perf_counter()
with RasterSource.open({image!r}) as source:
    opened = time.perf_counter()
    scaling = model_setup.input_scaling(detector)
    grid = pipeline.Grid(detector.tile_width, detector.tile_height, {overlap}, {overlap}, 8192, 8192)
    plan = pipeline.plan_job(grid, source, None)
    tiles = pipeline.region_tiles(grid, plan.regions[0], source.width, source.height, None)
    batches = iter_tile_batches(source, tiles, detector.batch_size, scaling,
                                tile_shape=(detector.tile_height, detector.tile_width))
    first = next(batches)
    detector.detect(first.pixels)
    done = time.perf_counter()
    batches.close()
print(json.dumps(dict(imports=imported - started, sessions=sessions - imported, open=opened - sessions,
                      first_batch=done - opened, total=done - started)))
"""


def time_to_first_tile(model: Path, image: Path, args: argparse.Namespace) -> dict[str, float]:
    """A fresh process: imports, sessions, opening the image, the first batch through the model."""
    code = FIRST_TILE_CHILD.format(
        repo=str(harness.REPO),
        model=str(model),
        providers=args.providers,
        batch=args.batch,
        image=str(image),
        overlap=args.overlap,
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"time-to-first-tile child failed:\n{done.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process"] = wall
    return figures


def main(argv: list[str] | None = None) -> int:
    """Generate (or reuse) the image and the model, time decode, raw model and end to end, print the ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=16000, help="image width and height in px (16000)")
    p.add_argument("--block", type=int, default=256, help="the GeoTIFF's block size in px (256)")
    p.add_argument("--model", default="near-free", help="near-free (default), demo, or an ONNX file's path")
    p.add_argument("--providers", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="tiles per model call (default: what tessera run picks, detector.default_batch_size)",
    )
    p.add_argument("--overlap", type=int, default=128, help="tile overlap in px (128)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of the three timings (3)")
    p.add_argument("--sample-batches", type=int, default=12, help="distinct pre-decoded batches for raw")
    p.add_argument("--data-dir", type=Path, default=harness.DEFAULT_DATA_DIR)
    p.add_argument("--quick", action="store_true", help="smoke run: a 1536 px image, one round")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.sample_batches, args.repeat = 1536, 2, 1

    model = harness.model_by_name(args.model, args.data_dir)
    scene = harness.scene_file(args.data_dir, args.size, args.size, block_size=args.block)
    first = time_to_first_tile(model, scene.path, args)
    detector = OnnxDetector(model, providers=args.providers, batch_size=args.batch)
    shape = (detector.batch_size, detector.channels, detector.tile_height, detector.tile_width)
    detector.detect(np.zeros((shape[0] * detector.sessions, *shape[1:]), np.float32))  # warm every session
    out_dir = Path(tempfile.mkdtemp(prefix="tessera-floor-"))
    request = ImageRequest(
        job_id="floor",
        image=str(scene.path),
        model=str(model),
        outputs=Outputs(path=str(out_dir / "floor.geojson")),
        batch_size=args.batch,
        overlap=(args.overlap, args.overlap),
        merge=MergeSettings(),
    )
    grid = model_setup.settle_grid(request, detector)
    with RasterSource.open(str(scene.path)) as source:
        plan = pipeline.plan_job(grid, source, None)
        regions = [pipeline.region_tiles(grid, r, source.width, source.height, None) for r in plan.regions]
        sample = predecode(source, [t for tiles in regions for t in tiles], detector, args.sample_batches)
    calls = sum(math.ceil(len(tiles) / detector.batch_size) for tiles in regions)
    cores = usable_cores()

    decode, raw, e2e, together = [], [], [], []
    summary = None
    for _ in range(args.repeat):
        decode.append(time_decode(scene.path, cores))
        raw.append(time_raw(detector, sample, calls))
        timed, summary = run_end_to_end(request, detector)
        e2e.append(timed)
        together.append(time_side_by_side(scene.path, cores, detector, sample, calls))
    assert summary is not None
    best_decode = min(decode, key=lambda t: t.seconds)
    best_raw = min(raw, key=lambda t: t.seconds)
    best_e2e = min(e2e, key=lambda t: t.seconds)
    on_cpu = detector.provider == CPU
    floor = floor_of(best_decode, best_raw, on_cpu)
    ratio = floor / best_e2e.seconds

    with RasterSource.open(str(scene.path)) as source:
        print(
            f"image           {source.width:,} x {source.height:,} px, {source.count} x {source.dtype}, "
            f"blocks {source.block_shape[1]} px, DEFLATE ({scene.path.stat().st_size / 1e6:,.0f} MB on disk)"
        )
    print(
        f"grid            tiles {grid.tile_w} px, overlap {grid.overlap_x} px, regions {grid.region_w} px: "
        f"{len(plan.regions)} regions, {plan.tiles_total:,} tiles, {calls} model calls"
    )
    print(
        f"model           {detector.name} ({model.name}), {detector.provider}, batch {detector.batch_size}, "
        f"{detector.sessions} session(s)"
    )
    print(harness.machine_line())
    print()
    print(f"{'round':8}{'decode s':>10}{'raw model s':>13}{'end to end s':>14}{'e2e tiles/s':>13}")
    for i, (d, r, e) in enumerate(zip(decode, raw, e2e, strict=True), start=1):
        print(f"{i:<8}{d.seconds:>10.3f}{r.seconds:>13.3f}{e.seconds:>14.3f}{e.tiles_per_s:>13,.0f}")
    print()
    print(
        f"decode alone    {best_decode.seconds:.3f} s on {cores} threads "
        f"({sum(best_decode.cpu.values()):.2f} CPU s)"
    )
    print(
        f"raw model       {best_raw.seconds:.3f} s for {best_raw.tiles:,} tiles "
        f"({best_raw.tiles_per_s:,.0f} tiles/s, {sum(best_raw.cpu.values()):.2f} CPU s)"
    )
    print(
        f"end to end      {best_e2e.seconds:.3f} s for {best_e2e.tiles:,} tiles "
        f"({best_e2e.tiles_per_s:,.0f} tiles/s, {sum(best_e2e.cpu.values()):.2f} CPU s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(best_e2e.cpu.items(), key=lambda kv: -kv[1]))
        + ")"
    )
    how = "decode + raw model (one CPU)" if on_cpu else "max(decode, raw model) (model off the CPU)"
    print(f"floor           {floor:.3f} s = {how}: {best_e2e.tiles / floor:,.0f} tiles/s")
    print(f"efficiency      {ratio:.3f} (floor / end to end)")
    if len(e2e) > 1:
        # Each round times the three back to back, so they share the machine's state of the moment: the
        # ratio taken round by round is the steadier figure where the machine's speed drifts between rounds.
        per_round = sorted(
            floor_of(d, r, on_cpu) / e.seconds for d, r, e in zip(decode, raw, e2e, strict=True)
        )
        print(
            f"round by round  median {float(np.median(per_round)):.3f} of the {len(per_round)} rounds' own "
            f"ratios ({per_round[0]:.3f}-{per_round[-1]:.3f})"
        )
    side = min(together, key=lambda t: t.seconds)
    print(
        f"side by side    {side.seconds:.3f} s: decode and raw model at once, no pipeline between them "
        f"(floor / this = {floor / side.seconds:.3f}: what sharing the cores costs by itself; the pipeline's "
        f"own cost is end to end - this = {best_e2e.seconds - side.seconds:.3f} s; "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(side.cpu.items(), key=lambda kv: -kv[1]) if v >= 0.005)
        + " CPU s)"
    )
    print(
        f"first tile      {first['total']:.2f} s in a fresh process (imports {first['imports']:.2f} s, "
        f"sessions {first['sessions']:.2f} s, open {first['open']:.3f} s, first batch through the model "
        f"{first['first_batch']:.3f} s); process exit {first['process']:.2f} s"
    )
    print(
        f"detections      {summary.detections:,} (digest {digest(out_dir / 'floor.geojson')}); "
        f"skipped tiles {summary.skipped}"
    )
    print()
    print(harness.result_line("floor_efficiency", ratio, ">=", GOAL))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
