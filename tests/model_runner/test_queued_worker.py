"""Workers on the queues (moto SQS + S3, real PostgreSQL, real rasters and ONNX models): the job runs to
SUCCESS, duplicates and redeliveries do no work twice, bad inputs fail their job while the worker goes on,
unexpected failures end in the dead-letter queue, and the heartbeat keeps long regions with their worker."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from runner_harness import (
    Crew,
    job_done,
    job_status,
    queue_empty,
    read_geojson,
    request_for,
    submit,
    upload_scene,
    wait_until,
)
from square_world import build_wrong_shape_model, feature_boxes, square_boxes

from services.cloud.database import connect
from services.cloud.embedded import Resources
from services.cloud.queue import send_messages
from services.model_runner import handler


def _regions(database_url: str, job_id: str) -> list[tuple[Any, ...]]:
    with connect(database_url) as conn:
        return conn.execute(
            "SELECT region_index, status, attempts, worker FROM regions WHERE job_id = %s"
            " ORDER BY region_index",
            (job_id,),
        ).fetchall()


@pytest.mark.usefixtures("runner_env")
def test_two_workers_run_a_job_to_success(
    resources: Resources, database_url: str, square_model: Path, tmp_path: Path
) -> None:
    scene = upload_scene(resources, tmp_path, square_model)
    submit(resources, request_for(scene, "job-ok", properties={"campaign": "test"}))
    with Crew(count=2, names=["alpha", "beta"]) as crew:
        wait_until(job_done(database_url, "job-ok"), 60, "the job to finish")
    job = job_status(database_url, "job-ok")
    assert job is not None and job.status == "SUCCESS", job
    assert job.output_uris == [f"{scene.results_prefix}/job-ok.geojson"]
    collection = read_geojson(job.output_uris[0])
    assert feature_boxes(collection) == square_boxes(scene.squares)
    assert {f["properties"]["campaign"] for f in collection["features"]} == {"test"}
    assert (job.regions_total, job.tiles, job.detections) == (12, 54, len(scene.squares))
    regions = _regions(database_url, "job-ok")
    assert {r[1] for r in regions} == {"DONE"} and {r[2] for r in regions} == {1}
    assert {r[3] for r in regions} <= {"alpha", "beta"}

    records = crew.metric_records()
    region_records = [r for r in records if "TilesPerSecond" in r]
    assert len(region_records) == 12
    assert sum(r["Tiles"] for r in region_records) == 54
    assert sum(r["Detections"] for r in region_records) >= len(scene.squares)
    lags = [r for r in records if "QueueLag" in r]
    assert {r["Queue"] for r in lags} == {"image", "region"}
    for record in records:
        (directive,) = record["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == "tessera"
        assert directive["Dimensions"] == [["Service", "Stack"]]
        assert record["Service"] == "model-runner" and record["Stack"] == "local"
        assert all(m["Name"] in record for m in directive["Metrics"])


@pytest.mark.usefixtures("runner_env")
def test_duplicate_and_redelivered_messages_do_no_work_twice(
    resources: Resources, database_url: str, square_model: Path, tmp_path: Path
) -> None:
    scene = upload_scene(resources, tmp_path, square_model)
    request = request_for(scene, "job-dup")
    submit(resources, request)
    submit(resources, request)  # the same request twice
    region_queue = resources.queue_urls["region-requests"]
    with Crew(count=1) as crew:
        worker = crew.workers[0]
        wait_until(lambda: _regions(database_url, "job-dup") != [], 30, "regions to be planned")
        # Every region message once more, while the job runs.
        send_messages(region_queue, [handler.region_message("job-dup", i) for i in range(12)])
        wait_until(job_done(database_url, "job-dup"), 60, "the job to finish")
        job = job_status(database_url, "job-dup")
        assert job is not None and job.status == "SUCCESS", job
        output = boto3.client("s3").head_object(
            Bucket=resources.buckets["results"], Key="runs/job-dup.geojson"
        )
        # Redelivered after the job finished: deleted without work.
        send_messages(region_queue, [handler.region_message("job-dup", i) for i in range(12)])
        submit(resources, request)
        wait_until(queue_empty(region_queue), 30, "the region queue to drain")
        wait_until(queue_empty(resources.queue_urls["image-requests"]), 30, "the image queue to drain")
        assert worker.handled >= 2 + 12 * 3 + 1
    assert feature_boxes(read_geojson(job.output_uris[0])) == square_boxes(scene.squares)
    assert {r[2] for r in _regions(database_url, "job-dup")} == {1}  # each region run once
    again = boto3.client("s3").head_object(Bucket=resources.buckets["results"], Key="runs/job-dup.geojson")
    assert again["ETag"] == output["ETag"] and again["LastModified"] == output["LastModified"]
    assert len([r for r in crew.metric_records() if "TilesPerSecond" in r]) == 12


@pytest.mark.usefixtures("runner_env")
def test_bad_inputs_fail_their_job_and_the_worker_goes_on(
    resources: Resources,
    database_url: str,
    square_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # This deployment reads local models under tmp_path and may write to a bucket that does not exist, so
    # that the rows below reach the checks past the trust rules (tests/model_runner/test_queued_trust.py).
    monkeypatch.setenv("TESSERA_LOCAL_ROOT", str(tmp_path))
    monkeypatch.setenv(
        "TESSERA_ALLOWED_BUCKETS", ",".join([*resources.buckets.values(), "no-such-bucket-here"])
    )
    scene = upload_scene(resources, tmp_path, square_model)
    s3 = boto3.client("s3")
    imagery, models = resources.buckets["imagery"], resources.buckets["models"]
    s3.put_object(Bucket=imagery, Key="scenes/notes.tif", Body=b"these are field notes, not a raster\n" * 10)
    wrong = build_wrong_shape_model(tmp_path / "wrong.onnx")
    s3.upload_file(str(wrong), models, "detectors/wrong.onnx")

    submit(resources, "{this is not json")
    submit(resources, {**request_for(scene, "bad-field"), "colour": "red"})
    submit(resources, request_for(scene, "bad-value", merge={"iou": 7}))
    submit(resources, {**request_for(scene, "no-image"), "image": f"s3://{imagery}/scenes/missing.tif"})
    submit(resources, {**request_for(scene, "not-raster"), "image": f"s3://{imagery}/scenes/notes.tif"})
    submit(resources, {**request_for(scene, "wrong-model"), "model": f"s3://{models}/detectors/wrong.onnx"})
    submit(resources, {**request_for(scene, "no-model"), "model": f"s3://{models}/detectors/missing.onnx"})
    submit(resources, {**request_for(scene, "local-missing-model"), "model": str(tmp_path / "nope.onnx")})
    submit(resources, request_for(scene, "bad-output", outputs={"s3": "s3://no-such-bucket-here/runs"}))
    submit(resources, request_for(scene, "good-after"))
    with Crew(count=1):
        wait_until(job_done(database_url, "good-after"), 60, "the good job after the bad ones")
        wait_until(job_done(database_url, "bad-output"), 60, "the job with the missing output bucket")
    assert job_status(database_url, "good-after").status == "SUCCESS"  # type: ignore[union-attr]

    expected = {
        "bad-field": "$.colour: unknown field",
        "bad-value": "$.merge.iou: must be a number 0..1",
        "no-image": "scenes/missing.tif",
        "not-raster": "scenes/notes.tif",
        "wrong-model": "detector contract",
        "no-model": "detectors/missing.onnx does not exist",
        "local-missing-model": "nope.onnx does not exist",
        "bad-output": "s3://no-such-bucket-here/runs/bad-output.geojson: NoSuchBucket",
    }
    for job_id, says in expected.items():
        job = job_status(database_url, job_id)
        assert job is not None and job.status == "FAILED", (job_id, job)
        assert job.reason is not None and says in job.reason, (job_id, job.reason)
    assert "cannot read" in job_status(database_url, "not-raster").reason  # type: ignore[union-attr]
    with connect(database_url) as conn:
        (reason,) = conn.execute("SELECT reason FROM jobs WHERE request IS NULL").fetchone()  # type: ignore[misc]
    assert reason.startswith("the image request is not JSON")
    # User errors are final: nothing is redelivered or dead-lettered.
    assert queue_empty(resources.queue_urls["image-requests"])()
    assert queue_empty(resources.dlq_urls["image-requests"])()
    assert queue_empty(resources.dlq_urls["region-requests"])()


@pytest.mark.usefixtures("runner_env")
def test_a_message_that_keeps_failing_lands_in_the_dead_letter_queue(
    resources: Resources, database_url: str, square_model: Path, tmp_path: Path
) -> None:
    region_queue, dead = resources.queue_urls["region-requests"], resources.dlq_urls["region-requests"]
    boto3.client("sqs").send_message(
        QueueUrl=region_queue, MessageBody='{"schema": "tessera.region-request/v1"'
    )
    scene = upload_scene(resources, tmp_path, square_model)
    with Crew(count=1):
        wait_until(lambda: not queue_empty(dead)(), 30, "the poison message in the DLQ")
        # The worker kept serving: a good job still runs.
        submit(resources, request_for(scene, "after-poison"))
        wait_until(job_done(database_url, "after-poison"), 60, "the job after the poison message")
    assert job_status(database_url, "after-poison").status == "SUCCESS"  # type: ignore[union-attr]
    (message,) = boto3.client("sqs").receive_message(QueueUrl=dead, MessageAttributeNames=["All"])["Messages"]
    assert message["Body"].startswith('{"schema": "tessera.region-request/v1"')


@pytest.mark.usefixtures("runner_env")
def test_a_region_that_keeps_failing_ends_the_job_partial(
    resources: Resources,
    database_url: str,
    square_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Region 5 hits an unexpected error on every delivery: after the last one (maxReceiveCount = 2) it is
    failed, the job finishes PARTIAL with the reason, and its message goes to the dead-letter queue."""
    real = handler.detect_region
    tiles_of_region_5: list[int] = []

    def flaky(source: Any, detector: Any, tiles: Any, **kwargs: Any) -> Any:
        if tiles and tiles[0].col_off == 96 and tiles[0].row_off == 96:
            tiles_of_region_5.append(len(tiles))
            raise RuntimeError("disk on fire")
        return real(source, detector, tiles, **kwargs)

    monkeypatch.setattr(handler, "detect_region", flaky)
    scene = upload_scene(resources, tmp_path, square_model)
    submit(resources, request_for(scene, "job-partial"))
    with Crew(count=2):
        wait_until(job_done(database_url, "job-partial"), 60, "the job to finish")
        wait_until(lambda: not queue_empty(resources.dlq_urls["region-requests"])(), 30, "the DLQ")
    job = job_status(database_url, "job-partial")
    assert job is not None and job.status == "PARTIAL", job
    assert job.reason is not None
    assert (
        "1 region(s) failed: region 5: gave up after 2 attempts" in job.reason
        and "disk on fire" in job.reason
    )
    assert len(tiles_of_region_5) == 2
    found = set(feature_boxes(read_geojson(job.output_uris[0])))
    known = set(square_boxes(scene.squares))
    region_5 = (96, 96, 192, 192)

    def touches_region_5(box: tuple[float, ...]) -> bool:
        return box[0] < region_5[2] and box[2] > region_5[0] and box[1] < region_5[3] and box[3] > region_5[1]

    # Squares clear of the failed region are all there. Of squares on its edge, the neighbours' tiles may
    # have seen only a part: such a box lies inside a known square that reaches into the failed region.
    assert {b for b in known if not touches_region_5(b)} <= found
    for box in found - known:
        (square,) = [
            k for k in known if k[0] <= box[0] and k[1] <= box[1] and box[2] <= k[2] and box[3] <= k[3]
        ]
        assert touches_region_5(square), box
    (dead,) = boto3.client("sqs").receive_message(QueueUrl=resources.dlq_urls["region-requests"])["Messages"]
    assert json.loads(dead["Body"]) == handler.region_message("job-partial", 5)


@pytest.mark.usefixtures("runner_env")
def test_the_heartbeat_keeps_a_long_region_with_its_worker(
    resources: Resources,
    database_url: str,
    square_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one region takes longer than the region queue's visibility timeout (2 s here) while a second
    worker polls: without the heartbeat the second would get the message and run the region again."""
    real = handler.detect_region

    def slow(*args: Any, **kwargs: Any) -> Any:
        outcome = real(*args, **kwargs)
        time.sleep(3.5)  # a region that outlasts the visibility timeout, however fast this machine is
        return outcome

    monkeypatch.setattr(handler, "detect_region", slow)
    boto3.client("sqs").set_queue_attributes(
        QueueUrl=resources.queue_urls["region-requests"], Attributes={"VisibilityTimeout": "2"}
    )
    scene = upload_scene(resources, tmp_path, square_model)
    submit(resources, request_for(scene, "job-long", region_size=[1000, 1000]))
    with Crew(count=2) as crew:
        wait_until(job_done(database_url, "job-long"), 60, "the long job")
    job = job_status(database_url, "job-long")
    assert job is not None and job.status == "SUCCESS", job
    with connect(database_url) as conn:
        row = conn.execute("SELECT attempts FROM regions WHERE job_id = 'job-long'").fetchone()
    assert row == (1,)
    assert len([r for r in crew.metric_records() if "TilesPerSecond" in r]) == 1
    assert feature_boxes(read_geojson(job.output_uris[0])) == square_boxes(scene.squares)


@pytest.mark.usefixtures("runner_env")
def test_a_model_named_in_the_registry_is_pinned_to_its_version(
    resources: Resources, database_url: str, square_model: Path, tmp_path: Path
) -> None:
    from services.cloud.database import apply_migrations
    from services.registry import register

    scene = upload_scene(resources, tmp_path, square_model)
    with connect(database_url) as conn:
        apply_migrations(conn)
        first = register(conn, "squares", task="detector", uri=scene.model_url)
        register(conn, "squares", task="detector", uri=scene.model_url + ".missing")
    assert first.version == 1
    # Version 2 points at nothing: the job asks for version 1 by name and must run it.
    submit(resources, request_for(scene, "job-registry", model="squares:1"))
    submit(resources, request_for(scene, "job-registry-latest", model="squares"))
    submit(resources, request_for(scene, "job-registry-unknown", model="boats"))
    with Crew(count=1, names=["alpha"]):
        for job_id in ("job-registry", "job-registry-latest", "job-registry-unknown"):
            wait_until(job_done(database_url, job_id), 60, f"{job_id} to finish")
    pinned = job_status(database_url, "job-registry")
    assert pinned is not None and pinned.status == "SUCCESS", pinned
    collection = read_geojson(pinned.output_uris[0])
    assert feature_boxes(collection) == square_boxes(scene.squares)
    assert {f["properties"]["model"] for f in collection["features"]} <= {scene.model_url, "squares"}
    latest = job_status(database_url, "job-registry-latest")
    assert latest is not None and latest.status == "FAILED" and ".missing" in str(latest.reason)
    unknown = job_status(database_url, "job-registry-unknown")
    assert (
        unknown is not None and unknown.status == "FAILED" and "no model named 'boats'" in str(unknown.reason)
    )
