"""Sky rendering: what a Stellarium process (Mesa software OpenGL) costs per frame, and per dollar.

Run: ``.venv/bin/python bench/sky_render.py`` (``--quick`` for a smoke run).

The renderer is the sky generator's own (``services.sky_generator.stellarium.render``: Stellarium under
``xvfb-run``, ``LIBGL_ALWAYS_SOFTWARE=1``), fed the frames of a real job (``parse_job`` of a mid-latitude
January night, perspective, 60 degrees field of view, ``samples(job, 0)``). Every frame rendered is checked
(``geometry.check_frame``: the bright stars astropy predicts for its label are where the image has them).

1. **Start-up and rate, per size** (``--sizes``): seconds from the call to the first frame of a 1-frame
   render (``--repeats`` times, the median), then an N-frame render (``--frames``) timed frame by frame
   through ``on_frame``: the steady rate per process is ``(N - 1) / (t_last - t_first)``; the tail is the
   last frame to the process's exit (Stellarium's quit, at most ``QUIT_TIMEOUT_S``, then the kill). A shard
   of the default 50 frames takes ``start-up + 49 / rate + tail``; the start-up's share of it is reported.
2. **CPU**: Stellarium, Xvfb and xvfb-run run in a session of their own (``start_new_session``) and are
   killed at the end, so ``getrusage(RUSAGE_CHILDREN)`` misses them. A thread reads ``/proc/*/stat`` every
   0.2 s and keeps, per process (pid and start time) of the sessions our children lead, the largest
   ``utime + stime`` seen (and, every second, the sessions' RSS and PSS: PSS divides the pages the processes
   share, so it is what one more process costs); ``on_frame`` takes a reading too, so the CPU
   at the first and the last frame is exact. CPU s per frame = the sessions' CPU between the first and the
   last frame / the frames between; cores busy = that CPU / that wall time; frames/s per core = 1 / CPU s
   per frame. System-wide busy cores over the same window (``/proc/stat``, this process included) are
   printed as a cross-check.
3. **Settle**: Stellarium waits ``SETTLE_S`` after setting each view before its screenshot. The sweep
   (``--settles``, at the fleet's size, 640x480) patches that module constant and renders N frames: a settle
   too short to redraw would screenshot the previous frame's sky, whose stars are not where the label says,
   and the geometry check would fail it. The smallest settle that kept every frame passing is reported.
4. **Packing**: Stellarium redraws as fast as it can while it waits (``maximum_fps = 10000``), so one
   process keeps a core or more busy whatever a frame needs, and "cores busy" overstates what a frame
   costs. ``--packing`` runs P processes at once on this machine (same frames, metered together) and reports
   the frames/s they make together over the window in which all of them are rendering, and whether every
   frame still passes. When the sweep found a shorter settle that passed, the best packing is run again at
   it.
5. **Per dollar**, on paper, from ``stacks/prices.toml`` (this machine's cores taken for vCPUs):

   a. *as the platform runs it*: one worker per instance, one shard at a time, so one Stellarium at the
      rate measured here, then the geometry check of the shard's frames (CPU, in the same worker, serial):
      a shard takes ``start-up + 49 / rate + tail + 50 * check``;
   b. *packed*: the best packing measured here (most frames/s with every frame passing), its processes
      per core scaled to the type's vCPUs and capped by :data:`MEMORY_SHARE` of its memory at the PSS per
      process, each at the packing's per-process rate, start-up and tail (without packing runs: the
      formula, ``floor(vCPUs / cores busy)`` processes at the lone process's rate); the geometry check is
      priced apart, per vCPU-second of the type;
   c. packed as in b at the shorter settle, when it was measured and every frame passed.

   **No GPU is measured here.** A GPU type is given its best case: ``1 / SETTLE_S`` frames/s per process
   (a frame cannot take less than its settle wait; drawing and the screenshot counted free), one process
   per worker in a and one per vCPU in b and c, start-up and tail as measured here. Each table ends with
   what the GPU type would have to make to match the cheapest CPU type.

The figures go to bench/README.md. Exit 1 when a frame at the shipped settle failed its geometry.

This benchmark stays one file (~890 lines): it is one script, run as above, whose steps feed each other
(the sizes' rates, the settle and the packing measured go into the per-dollar tables).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import harness  # noqa: E402

from services.sky_generator import stellarium  # noqa: E402
from services.sky_generator.geometry import check_frame  # noqa: E402
from services.sky_generator.job import DEFAULT_FRAMES_PER_SHARD, Sample, parse_job, samples  # noqa: E402
from services.sky_generator.shards import verdict  # noqa: E402

PRICES = REPO / "stacks" / "prices.toml"
#: Instance types a rendering fleet could use: vCPUs, memory (GiB) and the GPU (None: CPU only).
INSTANCES = (
    ("c6i.large", 2, 4, None),
    ("c6i.xlarge", 4, 8, None),
    ("c6i.2xlarge", 8, 16, None),
    ("g5.xlarge", 4, 16, "A10G"),
    ("g4dn.xlarge", 4, 16, "T4"),
)
#: Share of an instance's memory the renders may use (the worker, the OS and the page cache keep the rest).
MEMORY_SHARE = 0.75
#: The size the fleet renders (the sample job's), where the settle sweep, the packing and the per-dollar
#: figures are measured.
FLEET_SIZE = (640, 480)
SHARD = DEFAULT_FRAMES_PER_SHARD
POLL_S = 0.2
#: The meter reads the renders' PSS every this many polls (every second).
PSS_EVERY = 5
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
CORES = len(os.sched_getaffinity(0))
#: Costs within this share of the cheapest tie with it (the smaller type is named).
TIE = 0.005


def job_frames(width: int, height: int, count: int) -> list[Sample]:
    """``count`` frames of a real job: January nights over the Gulf of Maine, looking south 60 deg up."""
    job = parse_job(
        {
            "schema": "tessera.sky-job/v1",
            "job_id": f"bench-sky-{width}x{height}",
            "count": count,
            "seed": 7,
            "latitude": [41.0, 45.0],
            "longitude": [-71.0, -66.0],
            "time": ["2024-01-15T01:00:00Z", "2024-01-15T09:00:00Z"],
            "camera": {
                "altitude": 60,
                "azimuth": 180,
                "fov": 60,
                "projection": "perspective",
                "size": [width, height],
            },
            "atmosphere": False,
            "frames_per_shard": count,
            "output": "s3://tessera-bench/sky",  # never written: the frames go to --data-dir
        }
    )
    return samples(job, 0)


# --- CPU and memory of the renders' process sessions, from /proc -------------------------------------


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    session: int
    started: int  # ticks after boot: with the pid, names the process
    ticks: int  # utime + stime
    rss: int  # bytes


def _proc_stats() -> Iterator[ProcStat]:
    """Every process readable in /proc."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                text = handle.read()
        except OSError:
            continue  # gone between the listing and the read
        rest = text[text.rfind(b")") + 2 :].split()  # the command name may hold spaces and parentheses
        # rest[0] is field 3 (state): ppid 4, session 6, utime 14, stime 15, starttime 22, rss 24.
        yield ProcStat(
            int(entry.name),
            int(rest[1]),
            int(rest[3]),
            int(rest[19]),
            int(rest[11]) + int(rest[12]),
            int(rest[21]) * PAGE,
        )


def pss_bytes(pid: int) -> int:
    """A process's proportional set size (its resident pages, each shared page divided among the processes
    that map it): what one more process of the same program costs in memory. 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def system_busy_s() -> float:
    """Seconds of busy CPU on the machine since boot, all cores (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]) / CLK_TCK


class SessionMeter:
    """CPU seconds and memory of the process sessions our children lead (each render's xvfb-run, Xvfb and
    Stellarium).

    ``sample()`` reads /proc and keeps the largest ``utime + stime`` per process (pid and start time): the
    total is their sum, so processes already killed still count with their last reading (only the last
    :data:`POLL_S` of a killed process's life can be missed, in its tail, never between frames). A thread
    samples every :data:`POLL_S` between ``start()`` and ``stop()``, and every :data:`PSS_EVERY` th time
    also the sessions' proportional set size (``smaps_rollup`` walks the page tables: too dear to read at
    every frame). The peaks of the sessions' summed RSS and PSS are kept."""

    def __init__(self) -> None:
        self.parent = os.getpid()
        self.sessions: set[int] = set()
        self.ticks: dict[tuple[int, int], int] = {}
        self.peak_rss = 0
        self.peak_pss = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="session-meter", daemon=True)

    def sample(self, *, pss: bool = False) -> float:
        """Read /proc now (with ``pss``, the sessions' PSS too); the sessions' CPU seconds so far."""
        rows = list(_proc_stats())
        with self._lock:
            # A child of ours that leads its own session: a render's xvfb-run (start_new_session).
            self.sessions.update(r.session for r in rows if r.ppid == self.parent and r.session == r.pid)
            mine = [r for r in rows if r.session in self.sessions]
            for r in mine:
                key = (r.pid, r.started)
                self.ticks[key] = max(self.ticks.get(key, 0), r.ticks)
            self.peak_rss = max(self.peak_rss, sum(r.rss for r in mine))
            if pss:
                self.peak_pss = max(self.peak_pss, sum(pss_bytes(r.pid) for r in mine))
            return sum(self.ticks.values()) / CLK_TCK

    @property
    def processes(self) -> int:
        """Processes of the sessions seen so far."""
        return len(self.ticks)

    def _poll(self) -> None:
        polls = 0
        while not self._stop.wait(POLL_S):
            polls += 1
            self.sample(pss=polls % PSS_EVERY == 0)

    def start(self) -> SessionMeter:
        self._thread.start()
        return self

    def stop(self) -> float:
        """Stop sampling; the sessions' CPU seconds."""
        self._stop.set()
        self._thread.join()
        return self.sample()


# --- renders, measured -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """A frame appeared: when (s from the start), which process, and the meters then."""

    at: float
    process: int
    cpu: float  # the sessions' CPU s
    system: float  # the machine's busy CPU s


@dataclass
class Batch:
    """P Stellarium processes started together, each rendering the same ``frames`` frames at ``settle``."""

    width: int
    height: int
    frames: int
    settle: float
    processes: int
    events: list[Event] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)  # per process: s from the start to its exit
    cpu_s: float = 0.0
    peak_rss: int = 0  # the sessions' summed RSS (shared pages counted in every process)
    peak_pss: int = 0  # the sessions' summed PSS (shared pages divided among the processes)
    verdicts: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    check_cpu_s: float = 0.0  # this process's CPU for the geometry checks

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def _of(self, process: int) -> list[float]:
        return [e.at for e in self.events if e.process == process]

    @property
    def startup_s(self) -> float:
        """Median over the processes of the first frame's time."""
        return statistics.median(self._of(p)[0] for p in range(self.processes))

    @property
    def tail_s(self) -> float:
        """Median over the processes of last frame to exit."""
        return statistics.median(self.ends[p] - self._of(p)[-1] for p in range(self.processes))

    def _span(self) -> tuple[float, float]:
        """From the moment every process has made its first frame to when the first one made its last."""
        return (
            max(self._of(p)[0] for p in range(self.processes)),
            min(self._of(p)[-1] for p in range(self.processes)),
        )

    @property
    def window(self) -> list[Event]:
        """The frames in :meth:`_span` when it holds two of every process; else all the frames."""
        start, end = self._span()
        inside = [e for e in self.events if start <= e.at <= end]
        return inside if self.overlapped else self.events

    @property
    def overlapped(self) -> bool:
        """Whether the processes rendered together long enough (two frames each) to measure them together."""
        start, end = self._span()
        return all(sum(start <= t <= end for t in self._of(p)) >= 2 for p in range(self.processes))

    @property
    def fps(self) -> float:
        """Frames/s of all processes together: the sum of each one's (k - 1) / (t_last - t_first) over its
        frames in the window ((N - 1) / (t_last - t_first) for one process)."""
        start, end = self._span()
        total = 0.0
        for p in range(self.processes):
            times = self._of(p)
            if self.overlapped:
                times = [t for t in times if start <= t <= end]
            total += (len(times) - 1) / (times[-1] - times[0])
        return total

    @property
    def fps_per_process(self) -> float:
        return self.fps / self.processes

    @property
    def cores_busy(self) -> float:
        """The sessions' CPU over the window / its wall time."""
        w = self.window
        return (w[-1].cpu - w[0].cpu) / (w[-1].at - w[0].at)

    @property
    def cpu_per_frame(self) -> float:
        return self.cores_busy / self.fps

    @property
    def system_cores(self) -> float:
        w = self.window
        return (w[-1].system - w[0].system) / (w[-1].at - w[0].at)

    @property
    def rss_per_process(self) -> float:
        return self.peak_rss / self.processes

    @property
    def memory_per_process(self) -> float:
        """What one more process costs: the peak PSS per process (RSS if PSS was never read)."""
        return (self.peak_pss or self.peak_rss) / self.processes

    @property
    def check_s(self) -> float:
        return self.check_cpu_s / (self.frames * self.processes)

    @property
    def passed(self) -> bool:
        return not self.verdicts.get("fail")

    def shard_s(self, fps_per_process: float | None = None) -> float:
        """Wall seconds of a 50-frame shard: start-up, the frames after the first, the tail."""
        return self.startup_s + (SHARD - 1) / (fps_per_process or self.fps_per_process) + self.tail_s


def render_batch(frames: list[Sample], out: Path, settle: float, processes: int = 1) -> Batch:
    """Render ``frames`` with ``processes`` Stellarium processes at once at ``SETTLE_S = settle``, timing and
    metering them, then check every frame's geometry."""
    camera = frames[0].camera
    batch = Batch(camera.width, camera.height, len(frames), settle, processes, ends=[0.0] * processes)
    meter = SessionMeter()
    lock = threading.Lock()
    cancel = threading.Event()
    errors: list[BaseException] = []
    paths: list[list[Path]] = [[] for _ in range(processes)]
    # Each render thread says when it is over: Thread.join interrupted by Ctrl-C can leave is_alive() False
    # (CPython 3.11), and the process would exit before the renders had stopped their Stellarium.
    over = [threading.Event() for _ in range(processes)]
    started = time.monotonic()

    def render(process: int) -> None:
        def on_frame(_: Path) -> None:
            event = Event(time.monotonic() - started, process, meter.sample(), system_busy_s())
            with lock:
                batch.events.append(event)

        try:
            paths[process] = stellarium.render(frames, out / f"p{process}", on_frame=on_frame, cancel=cancel)
            batch.ends[process] = time.monotonic() - started
        except BaseException as error:
            errors.append(error)
            cancel.set()
        finally:
            over[process].set()

    shipped = stellarium.SETTLE_S
    stellarium.SETTLE_S = settle  # script() reads the module constant when it writes the SSC
    threads = [threading.Thread(target=render, args=(p,), name=f"render-{p}") for p in range(processes)]
    try:
        meter.start()
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for done in over:
            done.wait()
    finally:
        cancel.set()  # Ctrl-C: each render stops its Stellarium (RenderError, its process group killed)
        for thread, done in zip(threads, over, strict=True):
            if thread.ident is not None:  # started
                done.wait(timeout=60)
        stellarium.SETTLE_S = shipped
        batch.cpu_s = meter.stop()
        batch.peak_rss = meter.peak_rss
        batch.peak_pss = meter.peak_pss
    if errors:
        raise errors[0]
    batch.events.sort(key=lambda e: e.at)
    cpu0 = time.process_time()
    for process_paths in paths:
        for frame, path in zip(frames, process_paths, strict=True):
            geometry = check_frame(path, frame)
            said = verdict(geometry)
            batch.verdicts[said] = batch.verdicts.get(said, 0) + 1
            if said == "fail":
                batch.failures.append(f"{path.parent.name}/{path.name}: {geometry.summary()}")
    batch.check_cpu_s = time.process_time() - cpu0
    return batch


def verdicts_text(batches: Sequence[Batch]) -> str:
    total: dict[str, int] = {}
    for batch in batches:
        for key, n in batch.verdicts.items():
            total[key] = total.get(key, 0) + n
    return ", ".join(f"{total[k]} {k}" for k in ("pass", "unverifiable", "fail") if total.get(k))


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


# --- 1. and 2.: per size ------------------------------------------------------------------------------------


@dataclass
class SizeResult:
    """A size's 1-frame start-up renders and its N-frame render."""

    starts: list[Batch]
    run: Batch

    @property
    def startup_s(self) -> float:
        return statistics.median(b.startup_s for b in self.starts)

    def shard_s(self, fps_per_process: float | None = None) -> float:
        """A 50-frame shard: the 1-frame renders' median start-up, the N-frame render's rate and tail."""
        run = self.run
        return self.startup_s + (SHARD - 1) / (fps_per_process or run.fps_per_process) + run.tail_s


def measure_size(width: int, height: int, args: argparse.Namespace, out: Path) -> SizeResult:
    frames = job_frames(width, height, args.frames)
    settle = stellarium.SETTLE_S
    starts = []
    for repeat in range(args.repeats):
        start = render_batch(frames[:1], out / f"{width}x{height}-start{repeat}", settle)
        starts.append(start)
        print(
            f"  {width}x{height}: 1-frame render {repeat + 1}/{args.repeats}: first frame at "
            f"{start.startup_s:.2f} s, exit at {start.ends[0]:.2f} s",
            flush=True,
        )
    run = render_batch(frames, out / f"{width}x{height}-n{args.frames}", settle)
    print(
        f"  {width}x{height}: {args.frames}-frame render: first frame at {run.events[0].at:.2f} s, last at "
        f"{run.events[-1].at:.2f} s, exit at {run.ends[0]:.2f} s; {run.cpu_s:.1f} CPU s, peak "
        f"{gib(run.peak_rss)} resident",
        flush=True,
    )
    return SizeResult(starts, run)


def sizes_table(results: list[SizeResult], settle: float) -> None:
    n = results[0].run.frames
    print()
    print(
        f"1-2. Per size (one process; SETTLE_S = {settle:g} s as shipped; start-up: median of "
        f"{len(results[0].starts)} 1-frame renders; steady: a {n}-frame render)"
    )
    print(
        f"{'size':>9} {'start-up':>9} {f'{n} frames':>10} {'tail':>5} {'frames/s':>9} {'CPU s':>6} "
        f"{'cores':>6} {'frames/s':>9} {'system':>7} {f'{SHARD}-frame':>9} {'start-up':>9} {'resident':>9} "
        f"{'check':>6}  geometry"
    )
    print(
        f"{'':>9} {'s':>9} {'total s':>10} {'s':>5} {'/process':>9} {'/frame':>6} {'busy':>6} "
        f"{'/core':>9} {'cores':>7} {'shard s':>9} {'share':>9} {'GiB':>9} {'CPU s':>6}"
    )
    for result in results:
        run = result.run
        shard = result.shard_s()
        print(
            f"{run.size:>9} {result.startup_s:>9.2f} {run.ends[0]:>10.2f} {run.tail_s:>5.2f} "
            f"{run.fps:>9.2f} {run.cpu_per_frame:>6.3f} {run.cores_busy:>6.2f} {1 / run.cpu_per_frame:>9.2f} "
            f"{run.system_cores:>7.2f} {shard:>9.1f} {result.startup_s / shard:>9.0%} "
            f"{run.peak_rss / 2**30:>9.2f} {run.check_s:>6.3f}  {verdicts_text([run, *result.starts])}"
        )
    print(
        "  start-up: call to first frame; tail: last frame to exit; cores busy: Stellarium's session CPU / "
        "wall between the first and last frame;\n  system cores: all the machine's busy CPU over that "
        "window (this process included), a cross-check; resident: peak of the session (Stellarium, Xvfb);\n"
        "  check: the worker's geometry check, CPU s per frame (not in the other columns)"
    )


# --- 3. settle ------------------------------------------------------------------------------------------


def sweep(frames: list[Sample], settles: list[float], out: Path, reuse: dict[float, Batch]) -> list[Batch]:
    runs = []
    for settle in settles:
        if settle not in reuse:
            reuse[settle] = render_batch(frames, out / f"settle-{settle:g}", settle)
            run = reuse[settle]
            print(f"  settle {settle:g} s: {run.fps:.2f} frames/s, {verdicts_text([run])}", flush=True)
        runs.append(reuse[settle])
    return runs


def sweep_table(runs: list[Batch]) -> float | None:
    print()
    print(
        f"3. Settle sweep at {runs[0].size} (one process, {runs[0].frames} frames each; a frame passes when "
        "its bright stars sit where its label says)"
    )
    print(f"{'SETTLE_S':>9} {'frames/s':>9} {'frame':>6} {'CPU s':>6} {'cores':>6}  geometry")
    print(f"{'s':>9} {'/process':>9} {'s':>6} {'/frame':>6} {'busy':>6}")
    for run in sorted(runs, key=lambda r: r.settle):
        print(
            f"{run.settle:>9g} {run.fps:>9.2f} {1 / run.fps:>6.3f} {run.cpu_per_frame:>6.3f} "
            f"{run.cores_busy:>6.2f}  {verdicts_text([run])}"
        )
        for failure in run.failures[:3]:
            print(f"{'':>11}fail: {failure}")
    passing = [r.settle for r in runs if r.passed]
    best = min(passing) if passing else None
    shown = "none" if best is None else f"{best:g} s"
    print(f"  smallest settle with every frame passing: {shown} (shipped: {stellarium.SETTLE_S:g} s)")
    return best


# --- 4. packing -----------------------------------------------------------------------------------------


def pack(frames: list[Sample], counts: list[int], settle: float, out: Path, single: Batch) -> list[Batch]:
    batches = [single]
    for count in counts:
        if count <= 1:
            continue
        batch = render_batch(frames, out / f"pack-{count}-settle-{settle:g}", settle, count)
        print(
            f"  {count} processes at settle {settle:g} s: {batch.fps:.2f} frames/s together, "
            f"{verdicts_text([batch])}",
            flush=True,
        )
        batches.append(batch)
    return batches


def pack_table(batches: list[Batch]) -> None:
    first = batches[0]
    print()
    print(
        f"4. Packing at {first.size}: P processes at once on this machine's {CORES} cores ({first.frames} "
        "frames each; rates over the window in which all P render)"
    )
    print(
        f"{'P':>3} {'P/core':>6} {'settle':>6} {'frames/s':>9} {'frames/s':>9} {'frames/s':>9} {'CPU s':>6} "
        f"{'cores':>6} {'start-up':>9} {'RSS':>9} {'PSS':>9}  geometry"
    )
    print(
        f"{'':>3} {'':>6} {'s':>6} {'together':>9} {'/process':>9} {'/core':>9} {'/frame':>6} {'busy':>6} "
        f"{'s':>9} {'GiB/proc':>9} {'GiB/proc':>9}"
    )
    for b in batches:
        print(
            f"{b.processes:>3} {b.processes / CORES:>6.1f} {b.settle:>6g} {b.fps:>9.2f} "
            f"{b.fps_per_process:>9.2f} {b.fps / CORES:>9.2f} {b.cpu_per_frame:>6.3f} {b.cores_busy:>6.2f} "
            f"{b.startup_s:>9.2f} "
            f"{b.rss_per_process / 2**30:>9.2f} {b.memory_per_process / 2**30:>9.2f}  {verdicts_text([b])}"
            + ("" if b.overlapped else "  (no common window: each process's own rate, summed)")
        )
        for failure in b.failures[:3]:
            print(f"{'':>5}fail: {failure}")
    print(
        "  frames/s per core: together / this machine's cores; CPU s per frame falls as processes share the "
        "cores: a lone process spends its settle wait redrawing;\n  RSS counts the pages the processes share "
        "(libraries, Mesa) in each of them, PSS divides them: PSS is what one more process costs"
    )


# --- 5. per dollar, on paper ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    vcpus: int
    gpu: str | None
    price: float
    processes: int
    fps: float  # per process, steady
    frames_per_h: float
    check_usd: float | None  # the geometry check's CPU, per 1000 frames; None: in frames_per_h already

    @property
    def usd_per_1000(self) -> float:
        return self.price / self.frames_per_h * 1000


def fleet_rows(
    size: SizeResult, settle: float, *, cores: float | None = None, packed: Batch | None = None
) -> list[Row]:
    """The instance types' figures. CPU types: ``floor(vCPUs / cores)`` processes at the single process's
    rate (the formula), or ``packed``'s processes per core scaled to the vCPUs and capped by memory, at its
    per-process rate and start-up. GPU types (not measured): the best case, one process per vCPU at
    ``1 / settle``. Every type: ``size``'s start-up and tail per 50-frame shard, unless packed."""
    prices = tomllib.loads(PRICES.read_text())["ec2"]
    check_s = size.run.check_s
    rows = []
    for name, vcpus, memory_gib, gpu in INSTANCES:
        price = float(prices[name])
        if gpu is not None:
            processes, rate, shard_s = vcpus, 1 / settle, size.shard_s(1 / settle)
        elif packed is not None:
            fits = math.floor(MEMORY_SHARE * memory_gib * 2**30 / packed.memory_per_process)
            processes = max(1, min(math.floor(packed.processes / CORES * vcpus), fits))
            rate, shard_s = packed.fps_per_process, packed.shard_s()
        else:
            assert cores is not None
            processes, rate, shard_s = max(1, math.floor(vcpus / cores)), size.run.fps, size.shard_s()
        frames_per_h = processes * 3600 * SHARD / shard_s
        check_usd = check_s * 1000 / 3600 * price / vcpus
        rows.append(Row(name, vcpus, gpu, price, processes, rate, frames_per_h, check_usd))
    return rows


def deployed_rows(size: SizeResult, settle: float) -> list[Row]:
    """The instance types as the platform runs them: one worker per instance, which takes one shard at a
    time: one Stellarium renders its 50 frames (start-up, frames, tail), then the worker checks their
    geometry (serially, :attr:`Batch.check_s` CPU s a frame). CPU types: the one process's rate measured
    here; GPU types (not measured): ``1 / settle``, the rest as measured here."""
    prices = tomllib.loads(PRICES.read_text())["ec2"]
    check_s = size.run.check_s
    rows = []
    for name, vcpus, _memory_gib, gpu in INSTANCES:
        rate = size.run.fps if gpu is None else 1 / settle
        shard_s = size.shard_s(rate) + SHARD * check_s
        rows.append(Row(name, vcpus, gpu, float(prices[name]), 1, rate, 3600 * SHARD / shard_s, None))
    return rows


def cheapest(rows: Sequence[Row]) -> Row:
    """The cheapest per frame; of types within :data:`TIE` of it, the one listed first (the smallest)."""
    low = min(r.usd_per_1000 for r in rows)
    return next(r for r in rows if r.usd_per_1000 <= low * (1 + TIE))


def fleet_table(rows: list[Row], title: str, note: str) -> Row:
    best = cheapest(rows)
    low = best.usd_per_1000
    print()
    print(title)
    print(
        f"{'type':>12} {'vCPU':>5} {'GPU':>5} {'$/h':>6} {'processes':>9} {'frames/s':>9} {'frames/h':>9} "
        f"{'$/1000':>8} {'+check':>7}"
    )
    print(f"{'':>12} {'':>5} {'':>5} {'':>6} {'':>9} {'/process':>9} {'':>9} {'frames':>8} {'$/1000':>7}")
    for row in rows:
        mark = ""
        if row is best:
            mark = "  <- cheapest"
        elif row.usd_per_1000 <= low * (1 + TIE):
            mark = "  (ties)"
        check = "incl." if row.check_usd is None else f"{row.check_usd:.4f}"
        print(
            f"{row.name:>12} {row.vcpus:>5} {row.gpu or '-':>5} {row.price:>6.3f} {row.processes:>9} "
            f"{row.fps:>9.2f} {row.frames_per_h:>9,.0f} {row.usd_per_1000:>8.4f} {check:>7}{mark}"
        )
    print(note)
    return best


def conclusion(rows: list[Row]) -> str:
    cpu = cheapest([r for r in rows if r.gpu is None])
    gpu = cheapest([r for r in rows if r.gpu is not None])
    winner = "a CPU fleet" if cpu.usd_per_1000 < gpu.usd_per_1000 else "a GPU fleet"
    need = gpu.price / cpu.usd_per_1000 * 1000  # frames/h the GPU type needs to match the CPU type
    times = need / gpu.frames_per_h
    return (
        f"  conclusion: {winner} is cheaper per frame: {cpu.name} ${cpu.usd_per_1000:.4f} per 1000 frames "
        f"against {gpu.name}'s best case ${gpu.usd_per_1000:.4f}; to match {cpu.name}, {gpu.name} would have "
        f"to make {need:,.0f} frames/h ({need / 3600:.1f} frames/s, {times:.1f}x its best case: "
        f"{times * gpu.processes:.1f} processes each at {gpu.fps:.2f} frames/s)"
    )


# --- the command -----------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.strip().lower().partition("x")
    return int(width), int(height)


def machine_lines() -> list[str]:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "libgl1-mesa-dri"],
        capture_output=True,
        text=True,
        check=False,
    )
    mesa = done.stdout.split("-")[0] if done.returncode == 0 and done.stdout else "unknown"
    threads = os.environ.get("LP_NUM_THREADS", "llvmpipe's default: one per core")
    software = os.environ.get("LIBGL_ALWAYS_SOFTWARE", "1")
    return [
        harness.machine_line(),
        f"renderer        Stellarium {stellarium.stellarium_version()} under xvfb-run, Mesa {mesa} software "
        f"GL (LIBGL_ALWAYS_SOFTWARE={software}; render threads: {threads})",
    ]


def main(argv: list[str] | None = None) -> int:
    """Measure, print the tables and the RESULT lines; 1 when a frame at the shipped settle failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=40, help="frames of each steady-state render (40)")
    p.add_argument(
        "--sizes", default="320x240,640x480,1280x960", help="image sizes, WxH,... (320x240,640x480,1280x960)"
    )
    p.add_argument("--repeats", type=int, default=3, help="1-frame renders per size for the start-up (3)")
    p.add_argument("--settles", default="0.05,0.1,0.25", help="SETTLE_S values to sweep (0.05,0.1,0.25)")
    p.add_argument("--packing", default="2,4,8", help="processes at once for the packing runs (2,4,8)")
    p.add_argument("--data-dir", type=Path, help="keep the frames here (default: a temporary directory)")
    p.add_argument("--quick", action="store_true", help="smoke run: 320x240, 6 frames, 1 repeat, no sweep")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.sizes, args.repeats, args.packing = 6, "320x240", 1, "2"
        args.settles = str(stellarium.SETTLE_S)
    if args.frames < 2 or args.repeats < 1:
        raise SystemExit("--frames must be at least 2 and --repeats at least 1")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    settles = sorted({float(s) for s in args.settles.split(",") if s.strip()})
    counts = sorted({int(s) for s in args.packing.split(",") if s.strip()})
    # SIGTERM and SIGHUP (a closed terminal), like Ctrl-C, stop every Stellarium (cancel, then render's
    # finally kills its process group) and remove the temporary frames; the exit status is 128 + the signal.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    stellarium.find_programs()
    try:
        with contextlib.ExitStack() as stack:
            if args.data_dir is None:
                out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-sky-bench-")))
            else:
                out = args.data_dir.resolve()
                out.mkdir(parents=True, exist_ok=True)
            return measure(args, sizes, settles, counts, out)
    except KeyboardInterrupt:
        print("\ninterrupted: Stellarium stopped", file=sys.stderr)
        return 130


def measure(
    args: argparse.Namespace, sizes: list[tuple[int, int]], settles: list[float], counts: list[int], out: Path
) -> int:
    shipped = stellarium.SETTLE_S
    for line in machine_lines():
        print(line)
    print(
        "job             a real sky job: latitude 41-45, longitude -71 to -66, 2024-01-15 01-09 UTC "
        f"(night), perspective, fov 60, altitude 60, azimuth 180; frames under {out}"
    )
    print(
        f"CPU             the render sessions' processes (xvfb-run, Xvfb, Stellarium): utime + stime from "
        f"/proc every {POLL_S:g} s and at each frame, the largest per process"
    )
    print(flush=True)
    results = [measure_size(w, h, args, out) for w, h in sizes]
    sizes_table(results, shipped)
    fleet = next((r for r in results if (r.run.width, r.run.height) == FLEET_SIZE), results[-1])
    run = fleet.run
    frames = job_frames(run.width, run.height, args.frames)

    print(flush=True)
    single = {shipped: run}
    best_settle = sweep_table(sweep(frames, settles, out / run.size, single))

    print(flush=True)
    packs = pack(frames, counts, shipped, out / run.size, run)
    # The fastest packing whose frames all passed (the lone process when none did: the exit status says so).
    packed = max([b for b in packs if b.passed] or packs[:1], key=lambda b: b.fps)
    fast_pack = None
    if best_settle is not None and best_settle < shipped and packed.processes > 1:
        fast_pack = render_batch(frames, out / run.size / "pack-fast", best_settle, packed.processes)
        print(
            f"  {packed.processes} processes at settle {best_settle:g} s: {fast_pack.fps:.2f} frames/s "
            f"together, {verdicts_text([fast_pack])}",
            flush=True,
        )
    pack_table(packs + ([fast_pack] if fast_pack else []))

    def gpu_best(settle: float, processes: str) -> str:
        return (
            f"  GPU types (NOT measured: no GPU here): their best case, 1 / SETTLE_S = {1 / settle:.2f} "
            "frames/s per process (a frame takes no longer than its settle wait: drawing, reading back and "
            f"writing the screenshot free), {processes}; start-up {fleet.startup_s:.1f} s and tail "
            f"{run.tail_s:.1f} s per {SHARD}-frame shard as measured here."
        )

    check_note = (
        f"\n  +check: the worker's geometry check ({run.check_s:.3f} CPU s per frame here) priced per "
        "vCPU-second of the type; not in $/1000 frames."
    )
    deployed = deployed_rows(fleet, shipped)
    fleet_table(
        deployed,
        f"5a. Per dollar as the platform runs it, at {run.size}, SETTLE_S = {shipped:g} s: one worker per "
        f"instance, one shard at a time (one Stellarium at {run.fps:.2f} frames/s as measured here, then the "
        f"geometry check of its {SHARD} frames, {SHARD * run.check_s:.1f} s, in the same worker)",
        gpu_best(shipped, "one worker, as on the CPU types")
        + "\n  +check: included (the shard's check is part of its time).",
    )
    print(conclusion(deployed))
    one_per_vcpu = "one process per vCPU (its CPU work assumed to fit one vCPU)"
    if packed.processes > 1:
        rows = fleet_rows(fleet, shipped, packed=packed)
        title = (
            f"5b. Per dollar at {run.size}, SETTLE_S = {shipped:g} s, packed as measured: CPU types run "
            f"{packed.processes / CORES:g} process(es) per vCPU ({packed.processes} on {CORES} cores here; "
            f"at most {MEMORY_SHARE:.0%} of memory at {gib(packed.memory_per_process)} PSS each) at "
            f"{packed.fps_per_process:.2f} frames/s each, start-up {packed.startup_s:.1f} s"
        )
    else:  # no packing measured: one process per core busy, at the lone process's rate
        rows = fleet_rows(fleet, shipped, cores=run.cores_busy)
        title = (
            f"5b. Per dollar at {run.size}, SETTLE_S = {shipped:g} s, by the formula: CPU types run "
            f"floor(vCPUs / {run.cores_busy:.2f} cores busy) processes at {run.fps:.2f} frames/s each"
        )
    fleet_table(rows, title, gpu_best(shipped, one_per_vcpu) + check_note)
    print(conclusion(rows))
    if fast_pack is not None and fast_pack.passed:
        fast_settle = fast_pack.settle
        fast = fleet_rows(fleet, fast_settle, packed=fast_pack)
        fleet_table(
            fast,
            f"5c. Per dollar at {run.size} if SETTLE_S were {fast_settle:g} s (every frame passed), packed "
            f"as measured: {fast_pack.processes / CORES:g} process(es) per vCPU at "
            f"{fast_pack.fps_per_process:.2f} frames/s each",
            gpu_best(fast_settle, one_per_vcpu) + check_note,
        )
        print(conclusion(fast))

    best, as_run = cheapest(rows), cheapest(deployed)
    print()
    print(f"RESULT cheapest={best.name} usd_per_1000_frames={best.usd_per_1000:.4f}")
    print(f"RESULT deployed_cheapest={as_run.name} usd_per_1000_frames={as_run.usd_per_1000:.4f}")
    print(
        f"RESULT frames_per_s_per_process={run.fps:.2f} cpu_s_per_frame={run.cpu_per_frame:.3f} "
        f"startup_s={fleet.startup_s:.2f}"
    )
    bad = [b for res in results for b in (res.run, *res.starts) if not b.passed]
    bad += [b for b in packs if not b.passed]
    for b in bad:
        print(
            f"geometry FAILED at the shipped settle ({b.size}, {b.processes} processes): "
            f"{'; '.join(b.failures[:3])}",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
