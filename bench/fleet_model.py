"""Scale on paper: how many model-runner workers finish one huge image in a given time, and what it costs.

A queueing model of the platform's own mechanics, not a fit: the image is cut into regions and tiles by
``services.tiling`` (the same functions the workers use); the fleet grows to ``ceil(regions /
backlog_per_instance)`` workers (the target-tracking policy of infra/gpu_fleet.py, capped at ``maxSize``),
which come up together after the scale-out reaction and the instance start-up; each worker takes the next
region off the queue when it is free (list scheduling) and runs its tiles at the measured tiles/s per
worker plus a fixed cost per region; the last region's worker merges the seams. Instances are billed from
launch until target tracking scales them in (15 minutes below target by default).

Two commands:

    .venv/bin/python bench/fleet_model.py                  # 200,000 x 200,000 px in an hour: workers, cost
    .venv/bin/python bench/fleet_model.py --check-demo 4   # the model against a real run of 4 workers

``--check-demo N`` runs ``tessera demo`` with N worker processes on the embedded default (moto, PostgreSQL,
an 8192² scene), feeds the model the per-worker tiles/s the run measured, and prints predicted against
measured seconds. On a 2-core machine N processes share 2 cores, so the per-worker rate is the shared one:
what is checked is the scheduling arithmetic (regions, tiles, list scheduling, per-region cost), not GPU
speed. Measure the rate of your model on your instance type with ``bench/pipeline.py --providers cuda``.
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.tiling.windows import Grid  # noqa: E402


@dataclass(frozen=True)
class Workload:
    """One image as the workers see it: tiles per region, in queue order."""

    width: int
    height: int
    tiles_per_region: tuple[int, ...]

    @property
    def regions(self) -> int:
        """Region messages on the queue."""
        return len(self.tiles_per_region)

    @property
    def tiles(self) -> int:
        """Tiles the detector runs on."""
        return sum(self.tiles_per_region)


def workload(
    width: int, height: int, region: int = 8192, tile: int = 512, overlap: int | None = None
) -> Workload:
    """The regions and tiles of a ``width`` x ``height`` image (overlap defaults to the pipeline's tile/8)."""
    overlap = tile // 8 if overlap is None else overlap
    grid = Grid(tile, tile, overlap, overlap, region, region)
    counts = tuple(len(grid.tiles_of(r, width, height)) for r in grid.regions(width, height))
    return Workload(width, height, counts)


@dataclass(frozen=True)
class Fleet:
    """The fleet's figures: measured rates and the platform's scaling settings."""

    tiles_per_s: float
    """Tiles per second one worker sustains inside a region (bench/pipeline.py measures it)."""
    region_overhead_s: float = 2.0
    """Fixed cost per region: claim it in PostgreSQL, open the raster over S3, write the region's result."""
    startup_s: float = 240.0
    """Instance launch to serving: boot, ECR pull of the GPU image, model load."""
    scale_reaction_s: float = 120.0
    """Queue metric to scale-out decision (the scale-from-zero alarm's minute, target tracking's period)."""
    scale_in_s: float = 900.0
    """Target tracking keeps instances this long after the backlog is gone (its default scale-in)."""
    merge_s: float = 5.0
    """The finaliser's seam merge and GeoJSON upload."""
    backlog_per_instance: int = 20
    max_workers: int = 8
    price_per_hour: float = 1.006


@dataclass(frozen=True)
class Outcome:
    """One job's timeline on the modelled fleet."""

    workers: int
    seconds: float
    """Submission to the job's end."""
    instance_hours: float
    cost: float


def simulate(load: Workload, fleet: Fleet, *, launch: bool = True) -> Outcome:
    """The job's end and cost: the fleet scales out once, workers take regions in queue order.

    ``launch=False`` models workers already running (no reaction, no start-up, no scale-in tail).
    """
    workers = max(1, min(fleet.max_workers, math.ceil(load.regions / fleet.backlog_per_instance)))
    start = fleet.scale_reaction_s + fleet.startup_s if launch else 0.0
    free = [start] * workers
    heapq.heapify(free)
    end = start
    for tiles in load.tiles_per_region:
        began = heapq.heappop(free)
        done = began + fleet.region_overhead_s + tiles / fleet.tiles_per_s
        end = max(end, done)
        heapq.heappush(free, done)
    seconds = end + fleet.merge_s
    billed = (seconds - fleet.scale_reaction_s + fleet.scale_in_s) if launch else seconds
    hours = workers * billed / 3600.0
    return Outcome(workers, seconds, hours, hours * fleet.price_per_hour)


def fewest_workers_within(
    load: Workload, fleet: Fleet, deadline_s: float, limit: int = 1000
) -> Outcome | None:
    """The smallest ``maxSize`` whose fleet finishes within ``deadline_s`` (backlog permitting), or None."""
    for size in range(1, limit + 1):
        outcome = simulate(load, _with(fleet, max_workers=size, backlog_per_instance=1))
        if outcome.seconds <= deadline_s:
            return outcome
    return None


def _with(fleet: Fleet, **changes: float | int) -> Fleet:
    from dataclasses import replace

    return replace(fleet, **changes)  # type: ignore[arg-type]


def _price(instance_type: str) -> float:
    prices = tomllib.loads((REPO / "stacks" / "prices.toml").read_text(encoding="utf-8"))
    return float(prices["ec2"][instance_type])


def plan(args: argparse.Namespace) -> int:
    """Print workers, time and cost: the configured fleet, and the fewest workers for the deadline."""
    load = workload(args.size, args.size, args.region, args.tile)
    fleet = Fleet(
        tiles_per_s=args.tiles_per_s,
        startup_s=args.startup_s,
        backlog_per_instance=args.backlog,
        max_workers=args.max_workers,
        price_per_hour=_price(args.instance_type),
    )
    print(
        f"image {args.size:,} x {args.size:,} px: {load.regions:,} regions, "
        f"{load.tiles:,} tiles of {args.tile}"
    )
    print(
        f"per worker {fleet.tiles_per_s:g} tiles/s, start-up {fleet.startup_s:.0f} s, "
        f"{args.instance_type} ${fleet.price_per_hour}/h"
    )
    configured = simulate(load, fleet)
    print(
        f"configured fleet (maxSize {fleet.max_workers}, backlog {fleet.backlog_per_instance}/instance): "
        f"{configured.workers} workers, {configured.seconds / 60:.1f} min, "
        f"{configured.instance_hours:.1f} instance-h, ${configured.cost:.2f}"
    )
    best = fewest_workers_within(load, fleet, args.deadline_min * 60)
    if best is None:
        print(f"RESULT workers_for_deadline=none: no fleet of up to 1000 finishes in {args.deadline_min} min")
        return 1
    print(
        f"RESULT workers_for_deadline={best.workers} ({best.seconds / 60:.1f} min, "
        f"{best.instance_hours:.1f} instance-h, ${best.cost:.2f} per image; set maxSize >= {best.workers} "
        f"and backlogPerInstance <= {max(1, load.regions // best.workers)})"
    )
    return 0


def check_demo(workers: int, size: int) -> int:
    """Run the demo with ``workers`` processes and compare its end-to-end seconds with the model's."""
    from services.model_runner.demo import DemoSettings, demo

    region = 2048
    result = demo(
        DemoSettings(
            width=size, height=size, region=region, workers=workers, out_dir=REPO / "out" / "fleet-check"
        )
    )
    if result.status != "SUCCESS":
        print(f"the demo ended {result.status}: {result.reason}")
        return 1
    rates = [r for r in result.worker_tiles_per_second.values() if r > 0]
    rate = sum(rates) / len(rates)
    load = workload(size, size, region, 512)
    # Workers already run (the demo waits for them before submitting): no reaction, start-up or tail.
    fleet = Fleet(
        tiles_per_s=rate, region_overhead_s=0.25, merge_s=1.0, backlog_per_instance=1, max_workers=workers
    )
    predicted = simulate(load, fleet, launch=False)
    ratio = predicted.seconds / result.seconds
    print(
        f"demo: {result.regions} regions, {result.tiles} tiles, {workers} workers at {rate:.1f} tiles/s each "
        f"(measured), regions per worker {result.regions_by_worker}"
    )
    print(f"model: {load.regions} regions, {load.tiles} tiles -> {predicted.seconds:.1f} s")
    print(
        f"RESULT predicted_over_measured={ratio:.2f} "
        f"(predicted {predicted.seconds:.1f} s, measured {result.seconds:.1f} s)"
    )
    return 0 if load.regions == result.regions and load.tiles == result.tiles else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the plan or the check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=200_000, help="image side in pixels (default: 200000)")
    parser.add_argument("--region", type=int, default=8192, help="region side (default: 8192)")
    parser.add_argument("--tile", type=int, default=512, help="tile side (default: 512)")
    parser.add_argument(
        "--tiles-per-s",
        type=float,
        default=150.0,
        help="tiles/s per worker (default 150: the shipped demo detector on 2 CPU cores, bench/pipeline.py; "
        "measure yours with --providers cuda on the instance type)",
    )
    parser.add_argument("--startup-s", type=float, default=240.0, help="launch to serving (default: 240)")
    parser.add_argument("--backlog", type=int, default=20, help="backlogPerInstance (default: 20)")
    parser.add_argument("--max-workers", type=int, default=8, help="the fleet's maxSize (default: 8)")
    parser.add_argument("--instance-type", default="g5.xlarge", help="priced from stacks/prices.toml")
    parser.add_argument("--deadline-min", type=float, default=60.0, help="finish within (default: 60)")
    parser.add_argument("--check-demo", type=int, metavar="N", help="run the demo with N workers and compare")
    parser.add_argument("--demo-size", type=int, default=8192, help="the checked demo's scene side")
    args = parser.parse_args(argv)
    if args.check_demo:
        return check_demo(args.check_demo, args.demo_size)
    return plan(args)


if __name__ == "__main__":
    raise SystemExit(main())
