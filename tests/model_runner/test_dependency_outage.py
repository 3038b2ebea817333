"""A worker whose database and AWS endpoints go down neither dies nor loses work: it starts when they come
up, retries each failed poll with a doubling delay and a log line saying what is down, and finishes the
jobs queued meanwhile once they are back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from outage_proxy import OutageProxy
from runner_harness import job_done, job_status, read_geojson, request_for, submit, upload_scene, wait_until
from square_world import feature_boxes, square_boxes

from services.cloud.embedded import Resources, aws_environment

ROOT = Path(__file__).resolve().parents[2]


def test_a_worker_rides_out_its_database_and_aws_going_down(
    runner_env: dict[str, str],
    resources: Resources,
    database_url: str,
    square_model: Path,
    tmp_path: Path,
) -> None:
    moto, db = urlparse(runner_env["AWS_ENDPOINT_URL"]), urlparse(database_url)
    aws_proxy = OutageProxy(moto.hostname or "127.0.0.1", moto.port or 80)
    db_proxy = OutageProxy(db.hostname or "127.0.0.1", db.port or 5432)
    env = {
        **os.environ,
        **runner_env,
        **aws_environment(f"http://127.0.0.1:{aws_proxy.port}"),
        "TESSERA_DB_URL": database_url.replace(f":{db.port}/", f":{db_proxy.port}/"),
        "AWS_MAX_ATTEMPTS": "1",  # each poll fails at once, so the worker's own backoff shows
    }
    aws_proxy.down()
    db_proxy.down()
    log = (tmp_path / "worker.log").open("w+")
    worker = subprocess.Popen(
        [sys.executable, "-m", "services.model_runner.worker"], cwd=ROOT, env=env, stdout=log, stderr=log
    )

    def logged() -> str:
        log.flush()
        return (tmp_path / "worker.log").read_text()

    try:
        # Down when it starts: it waits, and says why.
        wait_until(lambda: "cannot start the worker" in logged(), 60, "the worker to report the outage")
        aws_proxy.up()
        db_proxy.up()
        wait_until(lambda: "serving" in logged(), 60, "the worker to start once its dependencies are up")

        # Down while it serves: work queued meanwhile waits on the queue and is done once they are back.
        scene = upload_scene(resources, tmp_path, square_model)
        aws_proxy.down()
        db_proxy.down()
        submit(resources, request_for(scene, "job-outage"))
        wait_until(lambda: logged().count("retry") >= 3, 60, "three retries")
        assert worker.poll() is None, logged()[-3000:]
        time.sleep(1)
        aws_proxy.up()
        db_proxy.up()
        wait_until(job_done(database_url, "job-outage"), 120, "the job queued during the outage")
        assert worker.poll() is None, logged()[-3000:]
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        aws_proxy.down()
        db_proxy.down()
    text = logged()
    log.close()
    job = job_status(database_url, "job-outage")
    assert job is not None and job.status == "SUCCESS", text[-3000:]
    assert feature_boxes(read_geojson(job.output_uris[0])) == square_boxes(scene.squares)
    assert "Traceback" not in text, text[-3000:]
    assert "unreachable" in text and "retry 2 in 2 s" in text
    assert "reachable again" in text
