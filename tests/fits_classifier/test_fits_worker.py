"""``tessera worker fits-classifier`` on moto's S3 and SQS and a real PostgreSQL: S3 event notifications
of arriving frames become verdicts recorded once and annotated copies in the results bucket; forged events
are refused, unreadable frames recorded with their reason, and the worker goes on."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import boto3
import psycopg
import pytest

from services.cloud.database import apply_migrations, connect
from services.cloud.embedded import Resources, create_resources, worker_environment
from services.cloud.queue import send_message
from services.errors import UserError
from services.fits_classifier.model import FrameClassifier
from services.fits_classifier.worker import Worker, WorkerSettings, frame_events
from services.frames import generate_frame, write_fits

INCOMING = "fits/incoming/"


def s3_event(bucket: str, key: str, size: int = 0, name: str = "ObjectCreated:Put") -> dict[str, Any]:
    """An S3 event notification as S3 sends it (the key URL-encoded)."""
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "eventName": name,
                "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(key), "size": size}},
            }
        ]
    }


@pytest.fixture
def fits(aws: str, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Resources:
    # Events are sent by hand here; the wired notification is tested in tests/cloud/test_cloud_events.py.
    resources = create_resources(aws, prefix=f"t{uuid.uuid4().hex[:10]}", max_receive_count=3, notify=False)
    for key, value in worker_environment(aws, resources, database_url, service="fits-classifier").items():
        monkeypatch.setenv(key, value)
    with connect(database_url) as conn:
        apply_migrations(conn)
    return resources


def _worker(model: Path) -> Worker:
    return Worker(WorkerSettings.from_env(wait_s=0), FrameClassifier(model))


def _drain(worker: Worker) -> int:
    handled = 0
    while worker.poll(wait_s=0):
        handled += 1
    return handled


def test_arriving_frames_are_judged_once_and_copied_with_their_verdict(
    tmp_path: Path, fits: Resources, database_url: str, wobble_model: Path
) -> None:
    s3 = boto3.client("s3")
    imagery, results = fits.buckets["imagery"], fits.buckets["results"]
    queue = fits.queue_urls["fits-frames"]
    frame = write_fits(tmp_path / "night 1.fits", generate_frame("good", 4, (64, 64)))
    key = f"{INCOMING}2026-12-05/night 1.fits"  # a space: S3 sends the key URL-encoded
    s3.upload_file(str(frame), imagery, key)
    s3.put_object(Bucket=imagery, Key=f"{INCOMING}broken.fits", Body=b"NOT FITS" * 400)
    send_message(queue, {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": imagery})
    send_message(queue, s3_event(imagery, key))
    send_message(queue, s3_event(imagery, key))  # delivered twice
    send_message(queue, s3_event(imagery, f"{INCOMING}broken.fits"))
    send_message(queue, s3_event(imagery, f"{INCOMING}gone.fits"))  # deleted before it was read

    worker = _worker(wobble_model)
    try:
        assert _drain(worker) == 5
    finally:
        worker.close()
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT source, status, verdict, reason, annotated FROM fits_verdicts ORDER BY id"
        ).fetchall()
    assert [(r[0].rsplit("/", 1)[-1], r[1], r[2]) for r in rows] == [
        ("night 1.fits", "CLASSIFIED", "mirror_wobble"),
        ("broken.fits", "UNREADABLE", "unreadable"),
    ]
    assert "FITS" in rows[1][3]
    copies = s3.list_objects_v2(Bucket=results, Prefix="fits/annotated/").get("Contents", [])
    assert [c["Key"] for c in copies] == [rows[0][4].split(f"s3://{results}/", 1)[1]]
    assert s3.get_object(Bucket=imagery, Key=key)["Body"].read() == frame.read_bytes()  # original untouched
    assert boto3.client("sqs").get_queue_attributes(
        QueueUrl=queue,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"] == {"ApproximateNumberOfMessages": "0", "ApproximateNumberOfMessagesNotVisible": "0"}


def test_forged_events_are_refused_without_reading_anything(
    tmp_path: Path, fits: Resources, database_url: str, wobble_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s3 = boto3.client("s3")
    frame = write_fits(tmp_path / "f.fits", generate_frame("good", 4, (48, 48)))
    models = fits.buckets["models"]
    s3.upload_file(str(frame), models, f"{INCOMING}f.fits")
    s3.upload_file(str(frame), fits.buckets["imagery"], "scenes/f.fits")
    queue = fits.queue_urls["fits-frames"]
    for event in (
        s3_event("somebody-elses-bucket", f"{INCOMING}f.fits"),  # not a bucket of this deployment
        s3_event(fits.buckets["imagery"], "scenes/f.fits"),  # not under the incoming prefix
        s3_event(fits.buckets["imagery"], f"{INCOMING}../scenes/f.fits"),
        s3_event(fits.buckets["imagery"], f"{INCOMING}notes.txt"),
    ):
        send_message(queue, event)
    send_message(queue, {"hello": "world"})
    worker = _worker(wobble_model)
    try:
        assert _drain(worker) == 5
    finally:
        worker.close()
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM fits_verdicts").fetchone() == (0,)
    refused = [
        r.getMessage() for r in caplog.records if "refusing" in r.getMessage() or "dropping" in r.getMessage()
    ]
    assert len(refused) == 5, refused


def test_event_documents_are_checked() -> None:
    assert frame_events(json.dumps({"Event": "s3:TestEvent"})) == []
    [event] = frame_events(json.dumps(s3_event("b", "fits/incoming/a b+c.fits", 12)))  # sent as a+b%2Bc
    assert (event.bucket, event.key, event.size) == ("b", "fits/incoming/a b+c.fits", 12)
    assert frame_events(json.dumps(s3_event("b", "k.fits", name="ObjectRemoved:Delete"))) == []
    for body, message in (
        ("{", "not JSON"),
        ("[]", "not an S3 event"),
        ('{"Records": [{}]}', "Records\\[0\\]"),
    ):
        with pytest.raises(UserError, match=message):
            frame_events(body)


def test_the_worker_needs_its_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TESSERA_QUEUE_FITS_FRAMES_URL", raising=False)
    with pytest.raises(UserError, match="TESSERA_QUEUE_FITS_FRAMES_URL"):
        WorkerSettings.from_env({})
    with pytest.raises(UserError, match="annotated frames"):
        WorkerSettings.from_env({"TESSERA_QUEUE_FITS_FRAMES_URL": "https://q"})
    settings = WorkerSettings.from_env(
        {"TESSERA_QUEUE_FITS_FRAMES_URL": "https://q", "TESSERA_BUCKET_RESULTS": "r"}
    )
    assert settings.annotated == "s3://r/fits/annotated/"
