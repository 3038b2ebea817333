"""A worker killed mid-region (SIGKILL, no goodbye) is recovered: its region's message comes back after
the visibility timeout, its lease has lapsed, and another worker takes the region over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from runner_harness import (
    Crew,
    job_done,
    job_status,
    read_geojson,
    request_for,
    submit,
    upload_scene,
    wait_until,
)
from square_world import feature_boxes, square_boxes

from services.cloud.database import connect
from services.cloud.embedded import Resources

ROOT = Path(__file__).resolve().parents[2]


def _running_region_of(database_url: str, worker: str) -> int | None:
    with connect(database_url) as conn:
        row = conn.execute(
            "SELECT region_index FROM regions WHERE worker = %s AND status = 'RUNNING'", (worker,)
        ).fetchone()
    return None if row is None else int(row[0])


def test_a_worker_killed_mid_region_is_recovered_by_another(
    runner_env: dict[str, str],
    resources: Resources,
    database_url: str,
    slow_square_model: Path,
    tmp_path: Path,
) -> None:
    scene = upload_scene(resources, tmp_path, slow_square_model)
    submit(resources, request_for(scene, "job-kill", region_size=[192, 192], batch_size=1))
    log = (tmp_path / "victim.log").open("wb")
    victim = subprocess.Popen(
        [sys.executable, "-m", "services.model_runner.worker"],
        cwd=ROOT,
        env={**os.environ, **runner_env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    name = f"{socket.gethostname()}:{victim.pid}"
    try:
        wait_until(
            lambda: _running_region_of(database_url, name) is not None, 90, "the victim to start a region"
        )
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
        log.close()
    abandoned = _running_region_of(database_url, name)
    assert abandoned is not None, "the victim finished its region before it was killed"

    with Crew(count=1, names=["rescuer"]):
        wait_until(job_done(database_url, "job-kill"), 120, "the rescuer to finish the job")
    job = job_status(database_url, "job-kill")
    assert job is not None and job.status == "SUCCESS", (job, (tmp_path / "victim.log").read_text()[-3000:])
    with connect(database_url) as conn:
        row = conn.execute(
            "SELECT status, attempts, worker FROM regions WHERE job_id = 'job-kill' AND region_index = %s",
            (abandoned,),
        ).fetchone()
        others = conn.execute(
            "SELECT count(*) FROM regions WHERE job_id = 'job-kill' AND status = 'DONE'"
        ).fetchone()
    assert row == ("DONE", 2, "rescuer")
    assert others == (4,)
    assert feature_boxes(read_geojson(job.output_uris[0])) == square_boxes(scene.squares)
