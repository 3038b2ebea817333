"""Memory: a 100,000 x 100,000 px sparse tiled GeoTIFF through one worker's pipeline; its peak RSS.

Run: ``.venv/bin/python bench/memory.py`` (``--quick`` for a smoke run).

The scene (written once by ``write_scene_geotiff`` with content ``areas``; the blocks outside them are
absent from the file and read back as nodata) goes through :func:`services.model_runner.pipeline.run_image`
in a child process: every region (default region size), every tile read, all-nodata tiles skipped, the
model on the rest, the merges and the GeoJSON written — what one worker does with a whole image. The
child's peak RSS comes from ``wait4``; the child also samples its RSS as the tiles go by, so the table
shows whether memory stays flat (bounded by the region) or grows with the image.

GDAL's block cache counts toward the RSS, and GDAL's default (5% of the machine's RAM: 1.2 GB here, 6 GB on a
128 GB worker) is all cost and no use for this reader, which decodes each block once. The benchmark runs the
worker with ``GDAL_CACHEMAX`` at the reader's own 32 MB (``--gdal-cachemax default`` leaves GDAL's default)
and prints which.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

from services.tiling.reader import GDAL_CACHE_MB

GOAL_BYTES = 1.5e9
SAMPLES = 20  # RSS samples over the run


def rss_bytes() -> int:
    """This process's resident set now (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def child(args: argparse.Namespace) -> None:
    """Run the whole image in this process; print the figures (incl. RSS as the tiles went by)."""
    from services.model_runner.pipeline import JobPlan, run_image
    from services.model_runner.request import parse_request

    started = time.perf_counter()
    request = parse_request(
        {
            "job_id": "bench-memory",
            "image": args.image,
            "model": str(harness.MODEL),
            "region_size": args.region,
            "batch_size": args.batch,
            "outputs": {"path": args.out},
        }
    )
    total = [0]
    done = [0]
    timeline: list[tuple[float, int]] = []

    def on_plan(plan: JobPlan) -> None:
        total[0] = plan.tiles_total

    def on_tiles(n: int) -> None:
        step = max(1, total[0] // SAMPLES)
        before = done[0]
        done[0] += n
        if done[0] // step != before // step or done[0] == total[0]:
            timeline.append((done[0] / max(total[0], 1), rss_bytes()))

    summary = run_image(request, providers="cpu", on_plan=on_plan, on_tiles=on_tiles)
    harness.report_child(
        {
            "seconds": time.perf_counter() - started,
            "regions": summary.regions,
            "tiles": summary.tiles,
            "skipped": summary.skipped,
            "detections": summary.detections,
            "model_seconds": summary.model_seconds,
            "timeline": timeline,
            "peak_rss": harness.peak_rss_bytes(),
        }
    )


def score_geojson(path: Path, scene: harness.SceneFile) -> tuple[float, float]:
    """Precision and recall (IoU 0.5) of the GeoJSON's pixel boxes against the scene's known objects."""
    from services.scenes.scoring import score_detections

    classes = list(scene.layout.classes)
    features = json.loads(path.read_text())["features"]
    boxes = np.array([f["properties"]["pixel_bbox"] for f in features], np.float32).reshape(-1, 4)
    scores = np.array([f["properties"]["score"] for f in features], np.float32)
    labels = np.array([classes.index(f["properties"]["class"]) for f in features], np.int32)
    s = score_detections(boxes, scores, labels, scene.layout.boxes, scene.layout.labels)
    return s.precision, s.recall


def main(argv: list[str] | None = None) -> int:
    """Generate (or reuse) the sparse scene, run one worker on it in a child, print its peak RSS."""
    from services.model_runner.request import DEFAULT_REGION
    from services.scenes.synthetic import content_areas

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=100_000, help="image width and height in px (100,000)")
    p.add_argument("--areas", type=int, default=24, help="content areas (24)")
    p.add_argument("--area-size", type=int, default=2048, help="content area side in px (2048)")
    p.add_argument("--region", type=int, default=DEFAULT_REGION, help=f"region size px ({DEFAULT_REGION})")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--gdal-cachemax",
        default=str(GDAL_CACHE_MB),
        help=f"GDAL block cache for the worker, MB ({GDAL_CACHE_MB}, the reader's), or 'default' for GDAL's "
        "own (5%% of RAM)",
    )
    p.add_argument("--data-dir", type=Path, default=harness.DEFAULT_DATA_DIR)
    p.add_argument("--quick", action="store_true", help="smoke run: 6144 px, 2 areas of 512 px")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.quick:
        args.size, args.areas, args.area_size, args.region = 6144, 2, 512, 2048

    areas = content_areas(args.size, args.size, count=args.areas, size=args.area_size, seed=3)
    scene = harness.scene_file(args.data_dir, args.size, args.size, areas=areas)
    out = args.data_dir / f"memory-{args.size}.geojson"
    env = dict(os.environ)
    cache = "GDAL's default block cache (5% of RAM)"
    if args.gdal_cachemax != "default":
        env["GDAL_CACHEMAX"] = str(int(args.gdal_cachemax))
        cache = f"GDAL_CACHEMAX={int(args.gdal_cachemax)} MB (set by the benchmark)"
    else:
        env["GDAL_CACHEMAX"] = "5%"  # the reader defaults to GDAL_CACHE_MB; this restores GDAL's own default
    argv_child = [sys.executable, __file__, "--child", "--image", str(scene.path), "--out", str(out)]
    argv_child += ["--region", str(args.region), "--batch", str(args.batch)]
    print(f"running one worker over {scene.path.name} ({cache}) ...", flush=True)
    run = harness.run_measured(argv_child, env=env, echo=lambda line: print("  | " + line))
    if run.returncode != 0 or not run.result:
        print(run.output)
        raise SystemExit(f"the worker run failed (exit {run.returncode})")
    r = run.result
    precision, recall = score_geojson(out, scene)
    content_px = sum(w * h for _, _, w, h in areas)

    import rasterio  # the GDAL version for the machine line  # noqa: F401

    print(
        f"image           {args.size:,} x {args.size:,} px, 3 x uint8, tiled 512 px, DEFLATE, sparse: "
        f"{args.areas} content areas of {args.area_size} px ({content_px / args.size**2:.2%} of the image); "
        f"{scene.path.stat().st_size / 1e6:,.1f} MB on disk, {args.size**2 * 3 / 1e9:,.0f} GB decoded"
    )
    print(
        f"worker          run_image: {r['regions']} regions of {args.region} px, batch {args.batch}; {cache}"
    )
    print(harness.machine_line())
    print()
    ran = r["tiles"] - r["skipped"]
    print(f"tiles           {r['tiles']:,} ({r['skipped']:,} all nodata, skipped; {ran:,} run)")
    print(
        f"time            {r['seconds']:.1f} s in the worker ({r['model_seconds']:.1f} s in the model), "
        f"{r['tiles'] / r['seconds']:,.0f} tiles/s"
    )
    print(
        f"detections      {r['detections']:,} (known objects {len(scene.layout):,}; "
        f"precision {precision:.3f}, recall {recall:.3f} at IoU 0.5)"
    )
    print(
        f"peak RSS        {harness.mb(run.max_rss_bytes)} (wait4); the worker's own VmHWM "
        f"{harness.mb(r['peak_rss'])}"
    )
    timeline = r["timeline"]
    if timeline:
        picks = [timeline[int(i * (len(timeline) - 1) / 4)] for i in range(5)]
        print("RSS over the run " + ", ".join(f"{frac:.0%}: {harness.mb(rss)}" for frac, rss in picks))
    print()
    print(harness.result_line("memory_peak_rss_gb", run.max_rss_bytes / 1e9, "<=", GOAL_BYTES / 1e9))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
