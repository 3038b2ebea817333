"""Recovery: SIGKILL a model-runner worker mid-region, and time how soon another worker takes the region over.

Run: ``.venv/bin/python bench/recovery.py`` (``--quick`` for a smoke run).

One embedded platform (``services.cloud.embedded.EmbeddedPlatform``: moto's S3 and SQS, an embedded
PostgreSQL) serves every trial, its region and image queues at ``--visibility`` seconds (default: the
platform's own, 60 s). A synthetic scene (``services.scenes``, cached under ``--data-dir``) and the shipped
demo detector are uploaded once. A fault-free baseline job first measures the job's span and what the
detector finds on its own (its few false boxes are the detector's, not recovery's). Then, per trial:

1. W worker processes serve the queues (``python -m services.cli worker model-runner``; the first trial
   starts them, later trials start what the last kill left missing);
2. a fresh job is submitted; after a random delay (uniform within the baseline span) a worker that holds a
   RUNNING region (regions table) gets SIGKILL, and a replacement worker is started at once;
3. recovery time is from the kill to the ``started_at`` of the abandoned region's next claim (its
   ``attempts`` goes up, under another worker): the message comes back after the visibility timeout, the
   region lease (half of it) has lapsed, and whoever receives it claims it;
4. when the job ends its GeoJSON is scored against the scene's known objects
   (``services.scenes.scoring``): duplicates are false boxes beyond the baseline's, misses are known
   objects missed beyond the baseline's; a clean recovery has neither.

The goal is a dead worker's region handed back within the visibility timeout plus 5 s for a worker to poll
it again: 60 s on the platform (55 s visibility).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

from services.cloud.embedded import QUEUE_VISIBILITY_S
from services.model_runner.jobs import FINAL

WORKER_COMMAND = ("-m", "services.cli", "worker", "model-runner", "--providers", "cpu")
#: The goal is the visibility timeout and these seconds for a worker to poll the message again (the
#: platform: 55 s + 5 s = infra/queues.py RECOVERY_GOAL_S).
POLL_SLACK_S = 5
SCORE_THRESHOLD = 0.3  # as the demo: the demo detector's suggested cut
IOU_MATCH = 0.5
POLL_S = 0.1
#: Fresh jobs a trial may take when its job ends before the kill.
RETRIES = 3


@dataclass
class Trial:
    """One kill and what followed."""

    number: int
    job_id: str
    delay_s: float = 0.0
    victim: str = ""
    region: int | None = None
    recovery_s: float | None = None
    taken_by: str = ""
    status: str = ""
    job_s: float = 0.0
    duplicates: int = 0
    misses: int = 0
    note: str = ""

    def summary(self) -> str:
        """The trial in one line, as it ends."""
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.1f} s"
        region = "-" if self.region is None else str(self.region)
        line = f"killed {self.victim or '-'} at {self.delay_s:.1f} s (region {region}), "
        line += f"recovered in {recovery} by {self.taken_by or '-'}; job {self.status} in {self.job_s:.1f} s"
        return line + (f"; {self.note}" if self.note else "")


class Crew:
    """The worker processes serving the platform's queues, each with its log file."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self._started = 0

    def start(self, count: int, timeout_s: float = 120.0) -> list[str]:
        """Start ``count`` workers and wait until each says it is serving; their names."""
        names = []
        for _ in range(count):
            self._started += 1
            name = f"worker-{self._started}"
            log = (self.log_dir / f"{name}.log").open("wb")
            self._logs.append(log)
            self.procs[name] = subprocess.Popen(
                [sys.executable, *WORKER_COMMAND, "--worker-id", name],
                cwd=harness.REPO,
                env=self.env,
                stdout=subprocess.DEVNULL,  # metrics lines; not needed here
                stderr=log,
                start_new_session=True,  # Ctrl-C reaches the benchmark, which stops them in order
            )
            names.append(name)
        deadline = time.monotonic() + timeout_s
        for name in names:
            while "serving" not in self.log(name):
                if self.procs[name].poll() is not None:
                    raise SystemExit(
                        f"{name} exited with {self.procs[name].returncode}:\n{self.log(name)[-2000:]}"
                    )
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name} did not start within {timeout_s:.0f} s")
                time.sleep(POLL_S)
        return names

    def log(self, name: str) -> str:
        """What a worker has logged so far."""
        return (self.log_dir / f"{name}.log").read_text(encoding="utf-8", errors="replace")

    def alive(self) -> list[str]:
        """Names of the workers still running."""
        return [name for name, proc in self.procs.items() if proc.poll() is None]

    def kill(self, name: str) -> float:
        """SIGKILL a worker (no goodbye: no message settled, no lease released); the wall time of the kill."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        killed = time.time()
        proc.wait(timeout=30)
        return killed

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every worker (it finishes its message), SIGKILL what is left after ``grace_s``."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()


def submit(platform: Any, sqs: Any, job_id: str, *, image: str, model: str, region: int) -> float:
    """Send an image request for a fresh job; the wall time it was sent."""
    from services.model_runner.request import parse_request

    request = {
        "schema": "tessera.image-request/v1",
        "job_id": job_id,
        "image": image,
        "model": model,
        "region_size": [region, region],
        "merge": {"score_threshold": SCORE_THRESHOLD},
        "outputs": {"s3": f"s3://{platform.bucket('results')}/recovery"},
        "batch_size": 4,
    }
    body = json.dumps(parse_request(request).to_json())
    sqs.send_message(QueueUrl=platform.queue_url("image-requests"), MessageBody=body)
    return time.time()


def job_status(conn: Any, job_id: str) -> str:
    """The job's status now ("" before its request is handled)."""
    from services.model_runner import jobs

    job = jobs.get_job(conn, job_id)
    return "" if job is None else job.status


def wait_for_job(conn: Any, job_id: str, timeout_s: float) -> str:
    """Poll until the job is SUCCESS, PARTIAL or FAILED; its status ("TIMEOUT" if it never got there)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = job_status(conn, job_id)
        if status in FINAL:
            return status
        time.sleep(POLL_S)
    return "TIMEOUT"


def job_seconds(conn: Any, job_id: str) -> float:
    """The job's span as PostgreSQL recorded it: created to finished."""
    row = conn.execute(
        "SELECT EXTRACT(EPOCH FROM finished_at - created_at) FROM jobs WHERE id = %s", (job_id,)
    ).fetchone()
    return float(row[0]) if row and row[0] is not None else 0.0


def running_regions(conn: Any, job_id: str, workers: list[str]) -> list[tuple[int, str, int]]:
    """(region, worker, attempts) of the job's regions RUNNING under one of ``workers``."""
    rows = conn.execute(
        "SELECT region_index, worker, attempts FROM regions"
        " WHERE job_id = %s AND status = 'RUNNING' AND worker = ANY(%s) ORDER BY region_index",
        (job_id, workers),
    ).fetchall()
    return [(int(r[0]), str(r[1]), int(r[2])) for r in rows]


def retaken(conn: Any, job_id: str, region: int, attempts: int) -> tuple[float, str] | None:
    """When (epoch seconds) and by whom the region was claimed after ``attempts``; None while it was not."""
    row = conn.execute(
        "SELECT EXTRACT(EPOCH FROM started_at), worker FROM regions"
        " WHERE job_id = %s AND region_index = %s AND attempts > %s",
        (job_id, region, attempts),
    ).fetchone()
    return None if row is None else (float(row[0]), str(row[1]))


def score_job(conn: Any, s3: Any, job_id: str, scene: harness.SceneFile) -> tuple[int, int, int]:
    """(true, false, missed) of the job's GeoJSON against the scene's known objects (IoU 0.5, by class)."""
    from services.model_runner import jobs
    from services.scenes.scoring import score_detections

    job = jobs.get_job(conn, job_id)
    if job is None or not job.output_uris:
        return 0, 0, len(scene.layout)
    bucket, key = job.output_uris[0][len("s3://") :].split("/", 1)
    features = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())["features"]
    boxes = np.array([f["properties"]["pixel_bbox"] for f in features], np.float64).reshape(-1, 4)
    scores = np.array([f["properties"]["score"] for f in features], np.float64)
    index = {name: i for i, name in enumerate(scene.layout.classes)}
    labels = np.array([index.get(f["properties"]["class"], -1) for f in features], np.int64)
    score = score_detections(
        boxes, scores, labels, scene.layout.boxes, scene.layout.labels, iou_threshold=IOU_MATCH
    )
    return score.true_positives, score.false_positives, score.false_negatives


def run_trial(
    trial: Trial,
    *,
    conn: Any,
    crew: Crew,
    submit_job: Callable[[str], float],
    span_s: float,
    workers: int,
    timeout_s: float,
    rng: random.Random,
) -> None:
    """Fill the crew to ``workers``, submit, kill a worker mid-region, replace it, follow the job."""
    missing = workers - len(crew.alive())
    if missing > 0:
        crew.start(missing)
    serving = crew.alive()
    sent = submit_job(trial.job_id)
    trial.delay_s = rng.uniform(0.0, span_s)
    time.sleep(max(0.0, sent + trial.delay_s - time.time()))
    attempts = 0
    deadline = time.monotonic() + timeout_s
    while trial.region is None:
        held = running_regions(conn, trial.job_id, serving)
        if held:
            trial.region, trial.victim, attempts = rng.choice(held)
            killed = crew.kill(trial.victim)
            trial.delay_s = killed - sent
            # What the victim held when it died (it may have closed that region and claimed the next).
            abandoned = running_regions(conn, trial.job_id, [trial.victim])
            if abandoned:
                trial.region, _, attempts = abandoned[0]
            else:
                trial.note = f"region {trial.region} was closed just before the kill"
                trial.region = None  # nothing abandoned; no recovery to time
            crew.start(1)
            break
        if job_status(conn, trial.job_id) in FINAL or time.monotonic() > deadline:
            trial.note = "the job ended before a region could be killed"
            break
        time.sleep(POLL_S)
    if trial.region is not None:
        while time.monotonic() < deadline:
            taken = retaken(conn, trial.job_id, trial.region, attempts)
            if taken is not None:
                trial.recovery_s = taken[0] - killed
                trial.taken_by = taken[1]
                break
            time.sleep(POLL_S)
        else:
            trial.note = f"region {trial.region} was not taken over within {timeout_s:.0f} s"
    trial.status = wait_for_job(conn, trial.job_id, max(1.0, deadline - time.monotonic()))
    trial.job_s = job_seconds(conn, trial.job_id)


def main(argv: list[str] | None = None) -> int:
    """Run the trials; print the table and the RESULT lines. Exit 1 when a job did not complete."""
    default_visibility = QUEUE_VISIBILITY_S["region-requests"]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10, help="kills (10)")
    p.add_argument("--workers", type=int, default=2, help="worker processes serving the queues (2)")
    p.add_argument(
        "--visibility",
        type=int,
        default=default_visibility,
        help=f"visibility timeout of the region and image queues, s (the platform's {default_visibility})",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the kill delays and choices (1)")
    p.add_argument("--size", type=int, default=6144, help="scene width and height px (6144)")
    p.add_argument("--region", type=int, default=1024, help="region size px (1024)")
    p.add_argument("--data-dir", type=Path, default=harness.DEFAULT_DATA_DIR)
    p.add_argument("--quick", action="store_true", help="smoke run: 6 s visibility, 2 trials, 1536 px scene")
    args = p.parse_args(argv)
    # SIGTERM too stops the workers and servers on the way out (a background run ignores SIGINT).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.visibility, args.trials, args.size, args.region = 6, 2, 1536, 512
    if args.workers < 1 or args.trials < 1:
        raise SystemExit("--workers and --trials must be at least 1")

    import boto3

    from services.cloud.database import apply_migrations, connect
    from services.cloud.embedded import EmbeddedPlatform

    scene = harness.scene_file(args.data_dir, args.size, args.size, seed=args.seed)
    rng = random.Random(args.seed)
    visibility = {"image-requests": args.visibility, "region-requests": args.visibility}
    trials: list[Trial] = []
    with EmbeddedPlatform(visibility_s=visibility) as platform:
        assert platform.directory is not None
        clients = {
            "endpoint_url": platform.endpoint_url,
            "aws_access_key_id": platform.env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": platform.env["AWS_SECRET_ACCESS_KEY"],
            "region_name": platform.env["AWS_REGION"],
        }
        s3, sqs = boto3.client("s3", **clients), boto3.client("sqs", **clients)
        s3.upload_file(str(scene.path), platform.bucket("imagery"), f"scenes/{scene.path.name}")
        s3.upload_file(str(harness.MODEL), platform.bucket("models"), f"detectors/{harness.MODEL.name}")
        image = f"s3://{platform.bucket('imagery')}/scenes/{scene.path.name}"
        model = f"s3://{platform.bucket('models')}/detectors/{harness.MODEL.name}"
        env = {**os.environ, **platform.env, "PYTHONUNBUFFERED": "1"}
        crew = Crew(env, platform.directory)
        try:
            with connect(platform.database_url) as conn:
                apply_migrations(conn)
                crew.start(args.workers)

                def submit_job(job_id: str) -> float:
                    return submit(platform, sqs, job_id, image=image, model=model, region=args.region)

                # The baseline: the job's span without a fault, and what the detector finds on its own.
                submit_job("baseline")
                status = wait_for_job(conn, "baseline", 600)
                if status != "SUCCESS":
                    raise SystemExit(
                        f"the fault-free baseline job ended {status}; see the logs in {platform.directory}"
                    )
                span_s = job_seconds(conn, "baseline")
                regions = conn.execute(
                    "SELECT regions_total, tiles_total FROM jobs WHERE id = 'baseline'"
                ).fetchone()
                assert regions is not None
                base_true, base_false, base_missed = score_job(conn, s3, "baseline", scene)
                print(
                    f"scene           {args.size:,} x {args.size:,} px, {len(scene.layout):,} known objects; "
                    f"{regions[0]} regions (--region {args.region}), {regions[1]} tiles"
                )
                vis = args.visibility
                print(
                    f"platform        embedded (moto + PostgreSQL), visibility {vis} s, region lease "
                    f"{vis / 2:g} s, heartbeat every {vis / 3:.1f} s; {args.workers} workers"
                )
                print(
                    f"baseline        {span_s:.1f} s without a fault; {base_true:,} objects found, "
                    f"{base_false} false boxes, {base_missed} missed (the detector's own)"
                )
                print(harness.machine_line())
                print()
                timeout_s = 4 * args.visibility + 4 * span_s + 120
                for number in range(1, args.trials + 1):
                    # A job that ends before its kill (faster than the baseline) is no trial: run a fresh one.
                    for again in range(RETRIES + 1):
                        trial = Trial(number, f"trial-{number}" + (f"-{again}" if again else ""))
                        run_trial(
                            trial,
                            conn=conn,
                            crew=crew,
                            submit_job=submit_job,
                            span_s=span_s,
                            workers=args.workers,
                            timeout_s=timeout_s,
                            rng=rng,
                        )
                        if trial.victim or again == RETRIES:
                            break
                        print(f"trial {number:>2}/{args.trials}: {trial.summary()}; again with a fresh job")
                    if trial.status in ("SUCCESS", "PARTIAL"):
                        _, false, missed = score_job(conn, s3, trial.job_id, scene)
                        trial.duplicates, trial.misses = false - base_false, missed - base_missed
                    trials.append(trial)
                    print(f"trial {number:>2}/{args.trials}: {trial.summary()}", flush=True)
        finally:
            crew.stop()
    return report(trials, args.visibility + POLL_SLACK_S)


def report(trials: list[Trial], goal_s: int) -> int:
    """The table and the RESULT lines; 0 when every job completed cleanly."""
    print()
    header = f"{'trial':>5} {'kill at':>8} {'victim':>9} {'region':>6} {'recovery':>9} {'taken by':>9} "
    header += f"{'job':>8} {'status':>8} {'dup':>4} {'missed':>6}"
    print(header)
    for t in trials:
        recovery = "-" if t.recovery_s is None else f"{t.recovery_s:.1f} s"
        region = "-" if t.region is None else str(t.region)
        print(
            f"{t.number:>5} {t.delay_s:>6.1f} s {t.victim or '-':>9} {region:>6} {recovery:>9} "
            f"{t.taken_by or '-':>9} {t.job_s:>6.1f} s {t.status:>8} {t.duplicates:>4} {t.misses:>6}"
        )
    recoveries = [t.recovery_s for t in trials if t.recovery_s is not None]
    completed = sum(t.status == "SUCCESS" for t in trials)
    clean = sum(t.status == "SUCCESS" and t.duplicates == 0 and t.misses == 0 for t in trials)
    print()
    if recoveries:
        print(
            f"recovery        {len(recoveries)} abandoned regions taken over: min {min(recoveries):.1f} s, "
            f"median {float(np.median(recoveries)):.1f} s, max {max(recoveries):.1f} s "
            f"(goal: within {goal_s} s: the visibility timeout and the worker's poll)"
        )
    print(
        f"outcomes        {completed}/{len(trials)} jobs SUCCESS, {clean} of them with every known object "
        f"as in the baseline (no duplicates, no misses); "
        f"{sum(t.duplicates for t in trials)} duplicates, {sum(t.misses for t in trials)} misses in all"
    )
    print()
    worst = max(recoveries) if recoveries else float("inf")
    print(harness.result_line("recovery_max_s", worst, "<=", goal_s, digits=1))
    print(f"RESULT completed={completed}/{len(trials)}")
    return 0 if completed == len(trials) else 1


if __name__ == "__main__":
    raise SystemExit(main())
