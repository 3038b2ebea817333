"""Pipeline efficiency: end-to-end tiles/s over a tiled GeoTIFF / raw model tiles/s on pre-decoded tiles.

Run: ``.venv/bin/python bench/pipeline.py`` (16,384 x 16,384 px, DEFLATE, 512 px blocks; ``--quick`` for a
small smoke run; ``--sweep`` to compare reader threads / prefetch / ONNX Runtime settings).

End to end is what a worker does with every region of the image: :func:`detect_region` (block-aligned
strip reads decoded on the reader's thread pool, cutting, scaling, batching, the model, shifting, the
in-region merge), then the seam merge. Raw is the same :class:`OnnxDetector` (same sessions, same batch
size, batches side by side through ``detect_many`` as in ``detect_region``) called on float32 batches
already in memory (real tiles of the same image, decoded beforehand), as
many calls as the pipeline makes.

Other work on a shared machine disturbs wall-clock figures, so the two alternate region by region: for
each region, the raw model runs that region's number of batches, then the region runs end to end (the
image opened afresh, so no decoded block survives in GDAL's cache). The whole image is done ``--repeat``
times; the figures are the fastest run of each region, summed (the least disturbed estimate, for both
sides alike). CPU seconds per thread (``/proc``) show where the time goes, and the reader is also timed
alone (no model).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

from services.inference.detections import Detections
from services.inference.detector import OnnxDetector
from services.model_runner import model_setup, pipeline
from services.model_runner.request import DEFAULT_REGION, MergeSettings
from services.tiling import batches as reader
from services.tiling.reader import RasterSource
from services.tiling.windows import Window

GOAL = 0.90


@dataclass(frozen=True)
class Timed:
    """Tiles run, wall seconds, model calls and CPU seconds per thread group."""

    tiles: int
    seconds: float
    calls: int
    cpu: dict[str, float]

    @property
    def tiles_per_s(self) -> float:
        """Tiles per wall-clock second."""
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms_per_tile(self) -> float:
        """CPU milliseconds (all threads) per tile."""
        return 1000 * sum(self.cpu.values()) / self.tiles if self.tiles else 0.0

    @property
    def cores_busy(self) -> float:
        """CPU seconds per wall second."""
        return sum(self.cpu.values()) / self.seconds if self.seconds > 0 else 0.0


def total(runs: list[Timed], extra_seconds: float = 0.0) -> Timed:
    """Runs added up (plus ``extra_seconds`` of wall time)."""
    cpu: dict[str, float] = {}
    for run in runs:
        for name, sec in run.cpu.items():
            cpu[name] = cpu.get(name, 0.0) + sec
    return Timed(
        sum(r.tiles for r in runs),
        sum(r.seconds for r in runs) + extra_seconds,
        sum(r.calls for r in runs),
        cpu,
    )


def predecode(
    source: RasterSource, tiles: list[Window], detector: OnnxDetector, batches: int
) -> list[np.ndarray]:
    """``batches`` full float32 batches of real tiles spread over the image, decoded and scaled now."""
    bs = detector.batch_size
    want = min(batches * bs, len(tiles))
    picked = [tiles[i] for i in np.linspace(0, len(tiles) - 1, want).round().astype(int)]
    scaling = model_setup.input_scaling(detector)
    shape = (detector.tile_height, detector.tile_width)
    out = []
    for batch in reader.iter_tile_batches(source, picked, bs, scaling, tile_shape=shape):
        if len(batch.tiles) == bs:
            out.append(batch.pixels.copy())
    if not out:
        raise SystemExit("no full batch of tiles to time the model on; use a larger image")
    return out


def time_raw(detector: OnnxDetector, batches: list[np.ndarray], calls: int) -> Timed:
    """The detector alone: ``calls`` full batches, cycling through the pre-decoded ones."""
    with harness.ThreadCpu() as cpu:
        started = time.perf_counter()
        # detect_many: on the CPU, batches run side by side on the sessions, as in detect_region.
        for _ in detector.detect_many(batches[i % len(batches)] for i in range(calls)):
            pass
        seconds = time.perf_counter() - started
    return Timed(calls * detector.batch_size, seconds, calls, cpu.by_group())


def time_region(
    path: Path, detector: OnnxDetector, tiles: list[Window], *, threads: int, prefetch: int
) -> tuple[Timed, Detections]:
    """One region through :func:`detect_region`, the image opened afresh (GDAL's block cache empty)."""
    with harness.ThreadCpu() as cpu, RasterSource.open(str(path)) as source:
        started = time.perf_counter()
        outcome = pipeline.detect_region(
            source,
            detector,
            tiles,
            batch_size=detector.batch_size,
            merge=MergeSettings(),
            threads=threads,
            prefetch=prefetch,
        )
        seconds = time.perf_counter() - started
    return Timed(outcome.tiles, seconds, outcome.batches, cpu.by_group()), outcome.detections


def time_reader(
    path: Path, detector: OnnxDetector, regions: list[list[Window]], *, threads: int, prefetch: int
) -> Timed:
    """The reader alone (no model): every region's tiles read, cut, scaled and batched, then dropped."""
    scaling = model_setup.input_scaling(detector)
    shape = (detector.tile_height, detector.tile_width)
    calls, tiles = 0, 0
    with harness.ThreadCpu() as cpu, RasterSource.open(str(path)) as source:
        started = time.perf_counter()
        for tiles_of_region in regions:
            for batch in reader.iter_tile_batches(
                source,
                tiles_of_region,
                detector.batch_size,
                scaling,
                tile_shape=shape,
                threads=threads,
                prefetch=prefetch,
            ):
                calls += 1
                tiles += len(batch.tiles) + batch.skipped
        seconds = time.perf_counter() - started
    return Timed(tiles, seconds, calls, cpu.by_group())


def cpu_text(t: Timed) -> str:
    """CPU seconds per thread group, as cores busy over the wall time."""
    parts = sorted(t.cpu.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {sec / t.seconds:.2f}" for name, sec in parts if sec >= 0.005 * t.seconds)


@dataclass(frozen=True)
class Measured:
    """Raw and end-to-end runs, ``[pass][region]``, and the seam merge after the last pass."""

    raw: list[list[Timed]]
    piped: list[list[Timed]]
    seam_seconds: float
    detections: int

    @staticmethod
    def _best(runs: list[list[Timed]], extra_seconds: float = 0.0) -> Timed:
        regions = len(runs[0])
        fastest = [min((p[i] for p in runs), key=lambda t: t.seconds) for i in range(regions)]
        return total(fastest, extra_seconds)

    @property
    def best_raw(self) -> Timed:
        """The fastest raw run of each region, summed."""
        return self._best(self.raw)

    @property
    def best_piped(self) -> Timed:
        """The fastest end-to-end run of each region, summed, plus the seam merge."""
        return self._best(self.piped, self.seam_seconds)

    @property
    def ratio(self) -> float:
        """End-to-end tiles/s / raw tiles/s, from the fastest runs."""
        return self.best_piped.tiles_per_s / self.best_raw.tiles_per_s

    @property
    def cpu_ratio(self) -> float:
        """Raw CPU per tile / end-to-end CPU per tile: what the ratio would be with every core busy."""
        return self.best_raw.cpu_ms_per_tile / self.best_piped.cpu_ms_per_tile


def measure(
    path: Path,
    detector: OnnxDetector,
    plan: pipeline.JobPlan,
    regions: list[list[Window]],
    sample: list[np.ndarray],
    *,
    threads: int,
    prefetch: int,
    repeat: int,
) -> Measured:
    """``repeat`` passes over the image; in each, per region: raw (as many calls), then end to end."""
    raw: list[list[Timed]] = []
    piped: list[list[Timed]] = []
    parts: list[Detections] = []
    for _ in range(max(1, repeat)):
        raw.append([])
        piped.append([])
        parts = []
        for tiles in regions:
            raw[-1].append(time_raw(detector, sample, math.ceil(len(tiles) / detector.batch_size)))
            run, found = time_region(path, detector, tiles, threads=threads, prefetch=prefetch)
            piped[-1].append(run)
            parts.append(found)
    started = time.perf_counter()
    merged = pipeline.merge_seams(parts, plan.regions, plan.grid, MergeSettings())
    return Measured(raw, piped, time.perf_counter() - started, len(merged))


def no_spin_detector(model: Path, batch_size: int) -> OnnxDetector:
    """The detector with ONNX Runtime's intra-op threads told not to spin while they wait for work."""
    import onnxruntime as ort

    detector = OnnxDetector(model, providers="cpu", batch_size=batch_size)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # OnnxDetector has no knob for this; swap its session for the measurement (same model, same options).
    detector._session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    detector._sessions = [detector._session]  # one session with the default threads, as the row says
    return detector


SWEEP: list[tuple[str, int, int, str]] = [
    # (label, reader threads, prefetch, ORT setting)
    ("reader 1 thread", 1, 2, "default"),
    ("reader 4 threads", 4, 2, "default"),
    ("prefetch 4", 2, 4, "default"),
    ("ORT no spinning", 2, 2, "no-spin"),
    ("ORT 1 thread", 2, 2, "1"),
]


def main(argv: list[str] | None = None) -> int:
    """Generate (or reuse) the scene, time raw model and pipeline, print the table and the RESULT line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=16384, help="image width and height in px (16384)")
    p.add_argument("--compress", choices=("deflate", "jpeg"), default="deflate")
    p.add_argument(
        "--model",
        type=Path,
        default=harness.MODEL,
        help="any detector-contract ONNX model (default: the shipped demo detector)",
    )
    p.add_argument(
        "--detector-width",
        type=int,
        metavar="N",
        help="instead of --model: the project's detector with N channels (shipped: 32), trained and cached "
        "on first use; 64 costs ~3.5x the CPU per tile",
    )
    p.add_argument("--batch", type=int, default=8, help="tiles per model call (8)")
    p.add_argument("--overlap", type=int, default=None, help="px (default: an eighth of the tile)")
    p.add_argument("--region", type=int, default=DEFAULT_REGION, help=f"region size px ({DEFAULT_REGION})")
    p.add_argument("--threads", type=int, help="reader threads (default: 2 beside a CPU model)")
    p.add_argument(
        "--providers",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="ONNX Runtime provider (default cpu; the goal is stated for the CPU)",
    )
    p.add_argument("--prefetch", type=int, default=2, help="batches prepared ahead (the reader's default, 2)")
    p.add_argument("--intra-op-threads", type=int, default=None, help="ONNX Runtime threads (default: cores)")
    p.add_argument("--repeat", type=int, default=3, help="passes over the image (3)")
    p.add_argument("--sample-batches", type=int, default=12, help="distinct pre-decoded batches for raw")
    p.add_argument("--data-dir", type=Path, default=harness.DEFAULT_DATA_DIR)
    p.add_argument("--sweep", action="store_true", help="also time other reader/ORT settings")
    p.add_argument("--quick", action="store_true", help="smoke run: a 1536 px image, one pass")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.region, args.sample_batches, args.repeat = 1536, 1024, 2, 1

    if args.detector_width:
        args.model = harness.wider_detector(args.data_dir, args.detector_width)
    scene = harness.scene_file(args.data_dir, args.size, args.size, compress=args.compress)
    detector = OnnxDetector(
        args.model, providers=args.providers, batch_size=args.batch, intra_op_threads=args.intra_op_threads
    )
    if args.threads is None:
        args.threads = model_setup.reader_threads(detector)
    overlap = args.overlap if args.overlap is not None else detector.tile_width // 8
    grid = pipeline.Grid(
        detector.tile_width, detector.tile_height, overlap, overlap, args.region, args.region
    )
    shape = (detector.batch_size, detector.channels, detector.tile_height, detector.tile_width)
    with RasterSource.open(str(scene.path)) as source:
        plan = pipeline.plan_job(grid, source, None)
        regions = [pipeline.region_tiles(grid, r, source.width, source.height, None) for r in plan.regions]
        sample = predecode(source, [t for tiles in regions for t in tiles], detector, args.sample_batches)
        width, height, block = source.width, source.height, source.block_shape[1]
    # Warm every session up (first-run allocations): one batch each.
    detector.detect(np.zeros((shape[0] * detector.sessions, *shape[1:]), np.float32))
    options = {"threads": args.threads, "prefetch": args.prefetch}
    m = measure(scene.path, detector, plan, regions, sample, **options, repeat=args.repeat)
    reading = time_reader(scene.path, detector, regions, **options)

    print(
        f"image           {width:,} x {height:,} px, 3 x uint8, tiled {block} px, "
        f"{args.compress.upper()} ({scene.path.stat().st_size / 1e6:,.0f} MB)"
    )
    print(
        f"grid            tiles {grid.tile_w} px, overlap {overlap} px, regions {args.region} px: "
        f"{len(plan.regions)} regions, {plan.tiles_total:,} tiles"
    )
    print(
        f"model           {detector.name}, {detector.provider}, batch {detector.batch_size}, "
        f"ORT intra-op threads {args.intra_op_threads or (1 if detector.sessions > 1 else 'default')} "
        f"x {detector.sessions} session(s); "
        f"reader threads {args.threads}, "
        f"prefetch {args.prefetch}"
    )
    print(harness.machine_line())
    print()

    def row(label: str, t: Timed) -> None:
        cells = f"{t.tiles:>8,}{t.seconds:>10.2f}{t.tiles_per_s:>10.2f}{t.cpu_ms_per_tile:>10.2f}"
        print(f"{label:26}{cells}  {cpu_text(t)}")

    print(f"{'run':26}{'tiles':>8}{'seconds':>10}{'tiles/s':>10}{'CPU ms/t':>10}  cores busy, by thread")
    for i, (raw, piped) in enumerate(zip(m.raw, m.piped, strict=True), start=1):
        row(f"pass {i}: raw model", total(raw))
        row(f"pass {i}: end to end", total(piped))
    best_raw, best_piped = m.best_raw, m.best_piped
    row("fastest/region: raw", best_raw)
    row("fastest/region: end to end", best_piped)
    row("reader only (no model)", reading)
    print()
    slots = best_piped.calls * detector.batch_size
    print(f"raw model       {best_raw.tiles_per_s:.2f} tiles/s")
    print(
        f"end to end      {best_piped.tiles_per_s:.2f} tiles/s; {best_piped.calls} model calls, "
        f"{slots - best_piped.tiles} of {slots} batch slots padding (short last batch of each region); "
        f"seam merge {m.seam_seconds:.3f} s"
    )
    passes = [total(p).tiles_per_s / total(r).tiles_per_s for r, p in zip(m.raw, m.piped, strict=True)]
    print(f"ratio           {m.ratio:.3f} (fastest runs); per pass: " + ", ".join(f"{r:.3f}" for r in passes))
    model_ms, read_ms = best_raw.cpu_ms_per_tile, reading.cpu_ms_per_tile
    print(
        f"CPU per tile    model {model_ms:.2f} ms (raw), end to end {best_piped.cpu_ms_per_tile:.2f} ms, "
        f"reader alone {read_ms:.2f} ms; CPU ratio raw / end to end {m.cpu_ratio:.3f}"
    )
    print(
        f"bound           with every core busy, end to end reaches at most model / (model + reader) = "
        f"{model_ms / (model_ms + read_ms):.3f} of raw (the reader's CPU comes out of the model's)"
    )
    print(f"detections      {m.detections:,} kept (known objects: {len(scene.layout):,})")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if best_raw.cores_busy < 0.85 * cores:
        print(
            f"WARNING         the raw runs kept only {best_raw.cores_busy:.2f} of {cores} cores busy: other "
            "work on the machine took the rest, so the reader ran on CPU the model could not use and the "
            "wall-clock ratio flatters the pipeline; the CPU ratio is the better estimate"
        )

    if args.sweep:
        print()
        print("sweep (same scheme per row)")
        head = f"{'reader thr.':>12}{'prefetch':>10}{'raw t/s':>10}{'e2e t/s':>10}{'ratio':>8}{'CPU r.':>8}"
        print(f"{'setting':24}{head}")
        for label, threads, prefetch, ort_setting in SWEEP:
            if ort_setting == "no-spin":
                d = no_spin_detector(args.model, args.batch)
            elif ort_setting == "default":
                d = detector
            else:
                d = OnnxDetector(
                    args.model, providers="cpu", batch_size=args.batch, intra_op_threads=int(ort_setting)
                )
            d.detect(np.zeros((shape[0] * d.sessions, *shape[1:]), np.float32))
            s = measure(
                scene.path, d, plan, regions, sample, threads=threads, prefetch=prefetch, repeat=args.repeat
            )
            print(
                f"{label:24}{threads:>12}{prefetch:>10}{s.best_raw.tiles_per_s:>10.2f}"
                f"{s.best_piped.tiles_per_s:>10.2f}{s.ratio:>8.3f}{s.cpu_ratio:>8.3f}"
            )

    print()
    print(harness.result_line("pipeline_efficiency", m.ratio, ">=", GOAL))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
