"""Sight catalog API: recognitions per second on one core with the demo model, and latency under load.

Run: ``.venv/bin/python bench/sight_api.py`` (``--seconds 2 --concurrency 1,2`` for a smoke run).

**Set-up.** One embedded platform (:class:`services.cloud.embedded.EmbeddedPlatform`: moto's S3, an embedded
PostgreSQL, every migration applied) holds a city, *Bench City*, whose sights are the demo model's classes
(``vehicle``, ``building``, ``tank``) and whose one READY model points at the shipped demo detector
(``services/models/tessera-demo-detector.onnx``, put into the models bucket and opened from ``s3://``, as a
trained city model is): no sight-catalog model is shipped, so this is "the demo model". The photos are
synthetic scenes of those classes (:func:`services.scenes.synthetic.generate_scene`), ``--photos`` of
``--photo-size`` pixels, JPEG quality 90; the server letterboxes each into the model's 512 x 512 tile.

**Pinning.** The API runs as it is served (``tessera sights serve``: uvicorn, the token set, ``--providers
cpu``, rate limits raised so that nothing is refused for rate) in a child process pinned to CPU 0
(``taskset -c 0``, else ``sched_setaffinity``). The recogniser sets no ONNX Runtime thread count (no setting
or variable reaches it: ``DetectorLabeller.open`` -> ``OnnxDetector(sessions=1)`` -> ``create_session`` with
``intra_op_threads=None``, ONNX Runtime's default of one thread per core *this process may use*), so the
pinning is what makes it one intra-op thread; ``OMP_NUM_THREADS=1`` and friends are set as well. This
process (the load, moto and PostgreSQL, which it starts) is pinned to the other core(s): the database plays
the role RDS plays on the platform, and its CPU per request is printed apart.

**Load.** Closed loop, for each ``--concurrency`` level N: N client threads, each on its own keep-alive
HTTP connection, send one photo after another (``POST /api/cities/bench-city/recognitions``, the photo's
bytes as the body, ``Authorization: Bearer``) for ``--seconds`` after a short warm-up. Figures per level:
recognitions/s (answers 200 within the window / window), p50/p90/p99 latency as the client sees it (send to
last byte), errors by status, and the server's CPU (``/proc``: CPU seconds per recognition and cores busy).

**Reference.** The model alone, in a child pinned to the same core: one ONNX Runtime session of one
intra-op thread (:class:`~services.inference.detector.OnnxDetector`), on the same photos decoded and
letterboxed beforehand (the float32 tiles the labeller would feed it), one after another for ``--seconds``.
Beside it, the recogniser in-process (:meth:`~services.sight_catalog.recognition.Recogniser.recognise_with`
on the JPEG bytes: decode, letterbox, model, boxes; no HTTP, no database) splits the API's overhead into
the photo's handling and the HTTP/database/JSON part. ``RESULT api_over_model`` is the best API throughput
over the model-alone throughput: what share of the core's model rate the API keeps.

This benchmark stays one file (~720 lines): it is one script, run as above, whose set-up, server, load and
reference are the parts of one measurement and are used nowhere else.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import harness  # noqa: E402

CITY = "Bench City"
SLUG = "bench-city"
CLASSES = ("vehicle", "building", "tank")
TOKEN = "bench-sight-api-token-0123456789"
MODEL_KEY = "sights/bench-city/v1/tessera-demo-detector.onnx"
#: Threads pinned to one core: every library that might start a pool of its own.
ONE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}
SERVER_CPU = 0
WARMUP_S = 1.0
START_TIMEOUT_S = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- photos ------------------------------------------------------------------------------------------------


def write_photos(folder: Path, count: int, size: tuple[int, int], seed: int = 1_700_000_000) -> list[Path]:
    """``count`` synthetic scenes of the demo detector's classes as JPEG files (quality 90) in ``folder``."""
    import io

    from PIL import Image

    from services.scenes.synthetic import generate_scene

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels, _, _ = generate_scene(size[0], size[1], seed=seed + index, classes=CLASSES)
        out = io.BytesIO()
        Image.fromarray(pixels.transpose(1, 2, 0)).save(out, format="JPEG", quality=90)
        path = folder / f"photo-{index:03d}.jpg"
        path.write_bytes(out.getvalue())
        paths.append(path)
    return paths


# --- the reference: the model alone, and the recogniser in-process ------------------------------------------


def _timed_loop(seconds: float, work: Any, items: Sequence[Any]) -> dict[str, float]:
    """Call ``work(item)`` over ``items`` round and round for ``seconds`` (after two calls of warm-up):
    calls, calls per second, median and mean ms per call, CPU ms per call (this process's)."""
    for item in items[:2]:
        work(item)  # warm-up: the first runs open the model and allocate
    times: list[float] = []
    cpu = time.process_time()
    started = time.perf_counter()
    deadline = started + seconds
    index = 0
    while True:
        t0 = time.perf_counter()
        work(items[index % len(items)])
        t1 = time.perf_counter()
        times.append(t1 - t0)
        index += 1
        if t1 >= deadline and index >= len(items):
            wall = t1 - started
            return {
                "calls": index,
                "per_s": index / wall,
                "median_ms": statistics.median(times) * 1e3,
                "mean_ms": wall / index * 1e3,
                "cpu_ms": (time.process_time() - cpu) / index * 1e3,
            }


def reference(photo_dir: Path, seconds: float) -> dict[str, Any]:
    """The model alone on pre-decoded tiles, then the recogniser in-process on the JPEG bytes (this process
    should be pinned to one core); figures as a dict."""
    import numpy as np
    import psycopg
    from PIL import Image

    from services.cloud.database import database_url
    from services.inference.detector import OnnxDetector
    from services.sight_catalog import warehouse
    from services.sight_catalog.labelling import open_image
    from services.sight_catalog.recognition import Recogniser
    from services.tiling.scaling import InputScaling

    photos = [path.read_bytes() for path in sorted(photo_dir.glob("*.jpg"))]
    detector = OnnxDetector(
        harness.MODEL, providers="cpu", batch_size=1, score_threshold=0.0, sessions=1, intra_op_threads=1
    )
    scaling = InputScaling.from_metadata(detector.metadata, channels=detector.channels)
    tiles = []
    for data in photos:  # the labeller's letterbox (DetectorLabeller.label), done once per photo here
        picture = open_image(data).convert("RGB")
        scale = min(detector.tile_width / picture.width, detector.tile_height / picture.height)
        fit = (round(picture.width * scale), round(picture.height * scale))
        if fit != picture.size:
            picture = picture.resize(fit, Image.Resampling.BILINEAR)
        raw = np.zeros((3, detector.tile_height, detector.tile_width), dtype=np.uint8)
        raw[:, : fit[1], : fit[0]] = np.asarray(picture, dtype=np.uint8).transpose(2, 0, 1)
        tiles.append(scaling.apply(raw)[None])
    model = _timed_loop(seconds, detector.detect, tiles)

    with psycopg.connect(database_url(), autocommit=True) as conn:
        city = warehouse.get_city(conn, SLUG)
        ready = warehouse.ready_model(conn, city.id)
    assert ready is not None, "the bench city has no READY model"
    recogniser = Recogniser(providers="cpu")
    found: list[int] = []

    def recognise(data: bytes) -> None:
        found.append(len(recogniser.recognise_with(ready, city, data).found))

    in_process = {**_timed_loop(seconds, recognise, photos), "sights_per_photo": statistics.mean(found)}
    return {
        "model_alone": model,
        "recogniser": in_process,
        "threads": len(os.listdir("/proc/self/task")),
        "cpus": sorted(os.sched_getaffinity(0)),
    }


# --- the load -----------------------------------------------------------------------------------------------


@dataclass
class Level:
    """What one concurrency level measured."""

    concurrency: int
    seconds: float = 0.0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    server_cpu_s: float = 0.0
    database_cpu_s: float = 0.0
    client_cpu_s: float = 0.0

    @property
    def per_s(self) -> float:
        """Recognitions answered 200 per second of the window."""
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile of the latencies, ms (nearest rank)."""
        if not self.latencies_ms:
            return math.nan
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]

    def summary(self) -> dict[str, Any]:
        """The figures, for ``--json``."""
        out = asdict(self)
        del out["latencies_ms"]
        out.update(
            per_s=self.per_s,
            p50_ms=self.percentile(50),
            p90_ms=self.percentile(90),
            p99_ms=self.percentile(99),
            max_ms=max(self.latencies_ms, default=math.nan),
        )
        return out


def connect(port: int) -> http.client.HTTPConnection:
    """A keep-alive connection to the server with ``TCP_NODELAY``, as browsers and curl open theirs:
    http.client sends a large body apart from its headers, and Nagle's algorithm would then hold the body's
    last segment for the server's delayed ACK (~40 ms on Linux loopback) on every request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.connect()
    assert connection.sock is not None
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def _client(
    *,
    port: int,
    photos: Sequence[bytes],
    offset: int,
    start: threading.Barrier,
    window: tuple[float, float],
    level: Level,
    lock: threading.Lock,
) -> None:
    """One closed-loop client: photo after photo on one keep-alive connection until the window closes;
    answers that end within the window count."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/jpeg"}
    path = f"/api/cities/{SLUG}/recognitions"
    connection = connect(port)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    index = offset
    start.wait()
    begin, end = window
    try:
        while True:
            sent = time.perf_counter()
            if sent >= end:
                break
            try:
                connection.request("POST", path, body=photos[index % len(photos)], headers=headers)
                response = connection.getresponse()
                response.read()
                status = str(response.status)
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                connection = connect(port)
                status = type(exc).__name__
            done = time.perf_counter()
            index += 1
            if sent < begin or done > end:
                continue  # warm-up, or past the window
            if status == "200":
                latencies.append((done - sent) * 1e3)
            else:
                errors[status] += 1
    finally:
        connection.close()
    with lock:
        level.ok += len(latencies)
        level.latencies_ms.extend(latencies)
        for status, count in errors.items():
            level.errors[status] = level.errors.get(status, 0) + count


def _ticks(pid: int) -> float:
    """utime + stime of process ``pid`` in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _children(parent: int) -> list[int]:
    """The processes whose parent is ``parent``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent:
                found.append(int(entry.name))
    return found


def _tree_cpu(root: int | None) -> float:
    """CPU seconds of ``root`` and its children so far (PostgreSQL: the postmaster and its backends)."""
    if root is None:
        return 0.0
    return _ticks(root) + sum(_ticks(pid) for pid in _children(root))


def run_level(
    port: int,
    photos: Sequence[bytes],
    *,
    concurrency: int,
    seconds: float,
    server: int,
    postmaster: int | None,
) -> Level:
    """``concurrency`` closed-loop clients for ``seconds`` (after :data:`WARMUP_S`); the level's figures."""
    level = Level(concurrency)
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    begin = time.perf_counter() + 0.05 + WARMUP_S
    window = (begin, begin + seconds)
    threads = [
        threading.Thread(
            target=_client,
            kwargs={
                "port": port,
                "photos": photos,
                "offset": i * 7,
                "start": start,
                "window": window,
                "level": level,
                "lock": lock,
            },
            name=f"client-{i}",
            daemon=True,
        )
        for i in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    start.wait()
    time.sleep(max(0.0, begin - time.perf_counter()))
    server_before, database_before, client_before = _ticks(server), _tree_cpu(postmaster), time.process_time()
    time.sleep(max(0.0, window[1] - time.perf_counter()))
    server_after, database_after, client_after = _ticks(server), _tree_cpu(postmaster), time.process_time()
    for thread in threads:
        thread.join()
    level.seconds = seconds
    level.server_cpu_s = server_after - server_before
    level.database_cpu_s = database_after - database_before
    level.client_cpu_s = client_after - client_before
    return level


# --- the server ---------------------------------------------------------------------------------------------


#: ``tessera sights serve`` through the ``sights`` commands' own parser (as ``python -m services.cli``
#: builds it), so that the server does not depend on every other command's options parsing.
SERVE = (
    "import argparse, sys\n"
    "from services.sight_catalog import commands\n"
    "parser = argparse.ArgumentParser(prog='tessera')\n"
    "commands.register(parser.add_subparsers(dest='command', required=True))\n"
    "args = parser.parse_args()\n"
    "raise SystemExit(args.handler(args))\n"
)
#: Without taskset: a Python that pins itself and then executes the rest of its command line.
_PIN = "import os, sys; os.sched_setaffinity(0, {{{cpu}}}); os.execv(sys.argv[1], sys.argv[1:])"


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    """``argv`` run on CPU ``cpu`` only (as it is when ``cpu`` is None): through ``taskset`` when it is
    here, else through a Python that sets its own affinity and then executes ``argv``."""
    if cpu is None:
        return argv
    if shutil.which("taskset"):
        return ["taskset", "-c", str(cpu), *argv]
    return [sys.executable, "-c", _PIN.format(cpu=cpu), *argv]


def start_server(env: dict[str, str], log_path: Path, cpu: int | None) -> tuple[subprocess.Popen[bytes], int]:
    """``tessera sights serve`` on a free loopback port (pinned to ``cpu`` unless None); (process, port)
    once ``/health`` answers."""
    from services.cloud.embedded import free_port

    port = free_port()
    argv = [
        sys.executable, "-c", SERVE, "sights", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--providers", "cpu",
        "--recognition-burst", "1000000", "--recognition-rate", "1000000",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(pinned(argv, cpu), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            probe = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            probe.request("GET", "/health")
            if probe.getresponse().status == 200:
                probe.close()
                return process, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not answer /health:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def first_recognition(port: int, photo: bytes) -> dict[str, Any]:
    """One recognition (opens the model); its answer, which must be a 200."""
    connection = connect(port)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/jpeg"}
    connection.request("POST", f"/api/cities/{SLUG}/recognitions", body=photo, headers=headers)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"the first recognition answered {response.status}: {body[:500]!r}")
    answer: dict[str, Any] = json.loads(body)
    return answer


def process_status(pid: int) -> dict[str, str]:
    """``Cpus_allowed_list`` and ``Threads`` of process ``pid`` (``/proc/<pid>/status``)."""
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Cpus_allowed_list", "Threads"):
            status[key] = value.strip()
    return status


def set_up_city(platform: Any) -> None:
    """Bench City: the demo model's classes as sights, and one READY model in the models bucket."""
    import psycopg

    from services.cloud.database import apply_migrations
    from services.sight_catalog import warehouse

    bucket = platform.bucket("models")
    platform.client("s3").put_object(Bucket=bucket, Key=MODEL_KEY, Body=harness.MODEL.read_bytes())
    with psycopg.connect(platform.database_url, autocommit=True) as conn:
        apply_migrations(conn)
        city, _ = warehouse.request_city(conn, CITY)
        for name in CLASSES:
            warehouse.add_sight(conn, city.id, name)
        model = warehouse.start_model(
            conn,
            city.id,
            training_job_id="bench-sight-api-1",
            dataset=f"s3://{platform.bucket('datasets')}/catalog/{SLUG}/v1",
            classes=list(CLASSES),
            images=0,
            registry_name=f"sights-{SLUG}",
        )
        warehouse.mark_model_ready(conn, model.id, registry_version=1, model_uri=f"s3://{bucket}/{MODEL_KEY}")


def postmaster_pid(directory: Path) -> int | None:
    """The embedded PostgreSQL's postmaster (first line of ``postmaster.pid`` under ``directory``)."""
    for path in directory.rglob("postmaster.pid"):
        try:
            return int(path.read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None
    return None


# --- the command ------------------------------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is WIDTHxHEIGHT, e.g. 1024x768; not {text!r}") from None
    if min(size) < 64:
        raise argparse.ArgumentTypeError(f"a photo of at least 64 x 64 px, not {text}")
    return size


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"concurrency levels are whole numbers, e.g. 1,2,4,8; not {text!r}"
        ) from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"at least one level, each at least 1; not {text!r}")
    return levels


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table and the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per level (default %(default)s)")
    parser.add_argument(
        "--concurrency", type=_levels, default=[1, 2, 4, 8], help="client counts, e.g. 1,2,4,8 (the default)"
    )
    parser.add_argument(
        "--photo-size", type=_size, default=(1024, 768), help="WIDTHxHEIGHT of the photos (default 1024x768)"
    )
    parser.add_argument(
        "--photos", type=int, default=16, help="distinct photos sent in turn (default %(default)s)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--reference-of", type=Path, help=argparse.SUPPRESS)  # the child's mode: photos
    parser.add_argument("--reference-cpu", type=int, help=argparse.SUPPRESS)  # and the core it runs on
    args = parser.parse_args(argv)
    if args.reference_of is not None:
        if args.reference_cpu is not None:  # before any session is created: ONNX Runtime sizes its pool by it
            os.sched_setaffinity(0, {args.reference_cpu})
        harness.report_child(reference(args.reference_of, args.seconds))
        return 0

    from services.cloud.embedded import EmbeddedPlatform

    usable = sorted(os.sched_getaffinity(0))
    server_cpu = SERVER_CPU if len(usable) > 1 and SERVER_CPU in usable else None
    machine = harness.machine_line()
    print(machine)
    if server_cpu is not None:
        # This process, and moto and PostgreSQL which it starts, stay off the server's core.
        os.sched_setaffinity(0, set(usable) - {server_cpu})
    scratch = Path(tempfile.mkdtemp(prefix="tessera-bench-sight-api-"))
    try:
        started = time.perf_counter()
        paths = write_photos(scratch / "photos", args.photos, args.photo_size)
        photos = [path.read_bytes() for path in paths]
        width, height = args.photo_size
        print(
            f"photos          {len(photos)} synthetic scenes of {width} x {height} px, JPEG q90, "
            f"{statistics.mean(map(len, photos)) / 1e3:.0f} kB on average "
            f"({time.perf_counter() - started:.1f} s)"
        )
        print(
            f"model           {harness.MODEL.name} (the shipped demo detector; classes {', '.join(CLASSES)})"
        )
        with EmbeddedPlatform(directory=scratch / "platform") as platform:
            set_up_city(platform)
            postmaster = postmaster_pid(scratch / "platform")
            env = {**os.environ, **platform.env, **ONE_THREAD_ENV, "TESSERA_CATALOG_TOKEN": TOKEN}
            env["PYTHONPATH"] = str(REPO)
            return _measure(
                args,
                photos,
                env=env,
                scratch=scratch,
                server_cpu=server_cpu,
                postmaster=postmaster,
                machine=machine,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _measure(
    args: argparse.Namespace,
    photos: list[bytes],
    *,
    env: dict[str, str],
    scratch: Path,
    server_cpu: int | None,
    postmaster: int | None,
    machine: str,
) -> int:
    """The reference child, then the server under each level; prints the table; the exit status."""
    child = [sys.executable, str(Path(__file__).resolve()), "--seconds", str(args.seconds)]
    child += ["--reference-of", str(scratch / "photos")]
    if server_cpu is not None:
        child += ["--reference-cpu", str(server_cpu)]
    done = harness.run_measured(child, env=env, echo=print)
    if done.returncode != 0 or not done.result:
        print(f"the reference run failed ({done.returncode}):\n{done.output[-3000:]}")
        return 1
    ref = done.result
    model, inproc = ref["model_alone"], ref["recogniser"]

    process, port = start_server(env, scratch / "server.log", server_cpu)
    levels: list[Level] = []
    try:
        answer = first_recognition(port, photos[0])
        status = process_status(process.pid)
        pinning = (
            f"CPU {status['Cpus_allowed_list']}" if server_cpu is not None else "not pinned (one core here)"
        )
        print(
            f"server          tessera sights serve (uvicorn) --port {port}, {pinning}, {status['Threads']} "
            "threads after "
            "the first recognition; ONNX Runtime intra-op threads: its default (one per usable core)"
        )
        print(
            f"first answer    {len(answer['sights'])} sights on photo 0 "
            f"(model version {answer['model']['version']})"
        )
        for concurrency in args.concurrency:
            levels.append(
                run_level(
                    port,
                    photos,
                    concurrency=concurrency,
                    seconds=args.seconds,
                    server=process.pid,
                    postmaster=postmaster,
                )
            )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    access_lines = sum(
        1 for line in (scratch / "server.log").read_text().splitlines() if "POST /api/" in line
    )

    print()
    print(
        f"reference       model alone (pre-decoded 512 x 512 tiles, 1 thread, CPU "
        f"{','.join(map(str, ref['cpus']))}): {model['per_s']:.1f} /s, median {model['median_ms']:.1f} ms, "
        f"{model['cpu_ms']:.1f} CPU ms"
    )
    print(
        "                recogniser in-process (JPEG bytes -> boxes, no HTTP/database): "
        f"{inproc['per_s']:.1f} /s, median {inproc['median_ms']:.1f} ms, {inproc['cpu_ms']:.1f} CPU ms; "
        f"{inproc['sights_per_photo']:.1f} sights/photo at score 0.3"
    )
    print()
    header = (
        f"{'clients':>7} {'recog/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'errors':>8} {'srv CPU ms':>10} {'srv cores':>9} {'/CPU-s':>7} {'db CPU ms':>9} {'vs model':>8}"
    )
    print(header)
    print("-" * len(header))
    for level in levels:
        errors = sum(level.errors.values())
        per = max(level.ok, 1)
        print(
            f"{level.concurrency:>7} {level.per_s:>8.1f} {level.percentile(50):>8.1f} "
            f"{level.percentile(90):>8.1f} {level.percentile(99):>8.1f} {level.summary()['max_ms']:>8.1f} "
            f"{errors:>8} "
            f"{level.server_cpu_s / per * 1e3:>10.1f} {level.server_cpu_s / level.seconds:>9.2f} "
            f"{level.ok / max(level.server_cpu_s, 1e-9):>7.1f} "
            f"{level.database_cpu_s / per * 1e3:>9.2f} {level.per_s / model['per_s']:>8.2f}"
        )
        if level.errors:
            print(f"{'':>7} errors: {dict(sorted(level.errors.items()))}")
    print(
        f"(window {args.seconds:g} s per level after {WARMUP_S:g} s of warm-up; srv = the API process, "
        "CPU per recognition; /CPU-s = recognitions per CPU second of it; db = PostgreSQL; "
        f"{access_lines} access-log lines written by the server)"
    )
    best = max(levels, key=lambda level: level.per_s)
    one = levels[0]
    ratio = best.per_s / model["per_s"]
    api_cpu_ms = best.server_cpu_s / max(best.ok, 1) * 1e3
    print(
        f"overhead        throughput: best {best.per_s:.1f} recognitions/s at {best.concurrency} clients = "
        f"{ratio:.2f} of the model alone (the recogniser in-process: {inproc['per_s'] / model['per_s']:.2f})"
    )
    print(
        f"                CPU ms per recognition: model {model['cpu_ms']:.1f}, recogniser in-process "
        f"{inproc['cpu_ms']:.1f} (photo handling {inproc['cpu_ms'] - model['cpu_ms']:+.1f}), API at "
        f"{best.concurrency} clients {api_cpu_ms:.1f} "
        f"(HTTP, database, JSON {api_cpu_ms - inproc['cpu_ms']:+.1f})"
    )
    figures = {
        "machine": machine,
        "photo_size": list(args.photo_size),
        "photos": len(photos),
        "photo_bytes_mean": statistics.mean(map(len, photos)),
        "seconds": args.seconds,
        "server_cpu": server_cpu,
        "reference": ref,
        "levels": [level.summary() for level in levels],
        "best": {"concurrency": best.concurrency, "per_s": best.per_s, "api_over_model": ratio},
    }
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(
        f"RESULT recognitions_per_s={best.per_s:.1f} clients={best.concurrency} "
        f"p50_ms={best.percentile(50):.1f} p99_ms={best.percentile(99):.1f} "
        f"p50_ms_1_client={one.percentile(50):.1f} "
        f"server_cpu_ms={best.server_cpu_s / max(best.ok, 1) * 1e3:.1f} "
        f"model_alone_per_s={model['per_s']:.1f} api_over_model={ratio:.2f}"
    )
    failed = sum(sum(level.errors.values()) for level in levels)
    return 1 if failed or any(level.ok == 0 for level in levels) else 0


if __name__ == "__main__":
    for name, value in ONE_THREAD_ENV.items():
        os.environ.setdefault(name, value)
    raise SystemExit(main())
