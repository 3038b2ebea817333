"""The embedded default wires the platform's S3 event notifications on moto: an object created under
``fits/incoming/`` of the imagery bucket becomes one S3 event message on the fits-frames queue, as the Pulumi
program wires it on AWS (``infra/notifications.py``), after S3's one ``s3:TestEvent`` message."""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import unquote_plus

import boto3
import pytest

from infra.queues import DEFAULT_QUEUES
from infra.storage import DEFAULT_BUCKETS
from services.cloud.embedded import BUCKET_PURPOSES, QUEUE_VISIBILITY_S, Resources, create_resources
from services.cloud.events import (
    FITS_INCOMING_PREFIX,
    NOTIFICATIONS,
    OBJECT_CREATED,
    TEST_EVENT,
    NotificationRoute,
    is_test_event,
)


def _drain(queue_url: str) -> list[dict[str, Any]]:
    """Every message on the queue (moto delivers at once), deleted; their bodies, decoded, in order."""
    sqs = boto3.client("sqs")
    bodies: list[dict[str, Any]] = []
    while True:
        messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get(
            "Messages", []
        )
        if not messages:
            return bodies
        for message in messages:
            bodies.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])


def test_setting_the_configuration_sends_one_test_event(resources: Resources) -> None:
    [test_event] = _drain(resources.queue_urls["fits-frames"])
    assert set(test_event) == {"Service", "Event", "Time", "Bucket"}
    assert test_event["Service"] == "Amazon S3"
    assert test_event["Event"] == TEST_EVENT == "s3:TestEvent"
    assert test_event["Bucket"] == resources.buckets["imagery"]
    assert test_event["Time"].endswith("Z")
    assert is_test_event(test_event)


def test_a_frame_created_under_the_incoming_prefix_becomes_one_event(resources: Resources) -> None:
    s3 = boto3.client("s3")
    imagery, queue = resources.buckets["imagery"], resources.queue_urls["fits-frames"]
    _drain(queue)  # the test event
    key = f"{FITS_INCOMING_PREFIX}2026-12-05/night 1+a.fits"  # a space and a plus: S3 URL-encodes the key
    s3.put_object(Bucket=imagery, Key=key, Body=b"SIMPLE" * 480)
    # Nothing else notifies: another prefix, a near miss, another bucket.
    s3.put_object(Bucket=imagery, Key="fits/other.fits", Body=b"x")
    s3.put_object(Bucket=imagery, Key="fits/incoming-old/x.fits", Body=b"x")
    s3.put_object(Bucket=imagery, Key="scenes/fits/incoming/x.fits", Body=b"x")
    s3.put_object(Bucket=resources.buckets["results"], Key=f"{FITS_INCOMING_PREFIX}x.fits", Body=b"x")

    [event] = _drain(queue)
    assert not is_test_event(event)
    [record] = event["Records"]
    assert record["eventSource"] == "aws:s3"
    assert record["eventName"] == "ObjectCreated:Put"
    assert record["awsRegion"] == "us-east-1"
    assert record["s3"]["configurationId"] == "fits-frames-incoming"
    assert record["s3"]["bucket"] == {"name": imagery, "arn": f"arn:aws:s3:::{imagery}"}
    obj = record["s3"]["object"]
    assert obj["key"] != key and unquote_plus(obj["key"]) == key
    assert obj["size"] == 6 * 480
    assert set(obj) == {"key", "size", "eTag"}


def test_a_copy_and_a_multipart_upload_notify_too(resources: Resources) -> None:
    s3 = boto3.client("s3")
    imagery, queue = resources.buckets["imagery"], resources.queue_urls["fits-frames"]
    _drain(queue)
    s3.put_object(Bucket=imagery, Key="staging/a.fits", Body=b"a")
    s3.copy_object(
        Bucket=imagery, Key=f"{FITS_INCOMING_PREFIX}a.fits", CopySource=f"{imagery}/staging/a.fits"
    )
    upload = s3.create_multipart_upload(Bucket=imagery, Key=f"{FITS_INCOMING_PREFIX}b.fits")
    part = s3.upload_part(
        Bucket=imagery,
        Key=f"{FITS_INCOMING_PREFIX}b.fits",
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"b",
    )
    s3.complete_multipart_upload(
        Bucket=imagery,
        Key=f"{FITS_INCOMING_PREFIX}b.fits",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    names = [
        (r["eventName"], unquote_plus(r["s3"]["object"]["key"])) for e in _drain(queue) for r in e["Records"]
    ]
    assert names[0] == ("ObjectCreated:Copy", f"{FITS_INCOMING_PREFIX}a.fits")
    assert names[-1] == ("ObjectCreated:CompleteMultipartUpload", f"{FITS_INCOMING_PREFIX}b.fits")
    # moto also sends ObjectCreated:Put for a completed multipart upload (AWS does not): a worker sees such
    # a frame twice on the embedded default, as it may on AWS after a redelivery.
    assert set(names[1:-1]) <= {("ObjectCreated:Put", f"{FITS_INCOMING_PREFIX}b.fits")}


def test_the_imagery_bucket_holds_the_configuration(resources: Resources) -> None:
    configuration = boto3.client("s3").get_bucket_notification_configuration(
        Bucket=resources.buckets["imagery"]
    )
    arn = boto3.client("sqs").get_queue_attributes(
        QueueUrl=resources.queue_urls["fits-frames"], AttributeNames=["QueueArn"]
    )["Attributes"]["QueueArn"]
    assert configuration["QueueConfigurations"] == [
        {
            "Id": "fits-frames-incoming",
            "QueueArn": arn,
            "Events": [OBJECT_CREATED],
            "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": FITS_INCOMING_PREFIX}]}},
        }
    ]


def test_without_notify_a_queue_holds_only_what_is_sent(aws: str) -> None:
    resources = create_resources(aws, prefix=f"t{uuid.uuid4().hex[:10]}", notify=False)
    boto3.client("s3").put_object(
        Bucket=resources.buckets["imagery"], Key=f"{FITS_INCOMING_PREFIX}x.fits", Body=b"x"
    )
    assert _drain(resources.queue_urls["fits-frames"]) == []


def test_the_frame_classifier_reads_what_moto_delivers(resources: Resources) -> None:
    # The worker's parser (services/fits_classifier/worker.py) on the messages as delivered.
    from services.fits_classifier.worker import DEFAULT_INCOMING_PREFIX, frame_events

    assert DEFAULT_INCOMING_PREFIX == FITS_INCOMING_PREFIX
    imagery, queue = resources.buckets["imagery"], resources.queue_urls["fits-frames"]
    key = f"{FITS_INCOMING_PREFIX}2026-12-05/night 1.fits"
    boto3.client("s3").put_object(Bucket=imagery, Key=key, Body=b"x" * 10)
    test_event, event = _drain(queue)
    assert frame_events(json.dumps(test_event)) == []
    [frame] = frame_events(json.dumps(event))
    assert (frame.bucket, frame.key, frame.size) == (imagery, key, 10)


# --- the embedded default and the platform agree ------------------------------------------------------------


def test_the_embedded_default_has_the_platforms_buckets_and_queues() -> None:
    assert tuple(b.purpose for b in DEFAULT_BUCKETS) == BUCKET_PURPOSES
    assert dict(QUEUE_VISIBILITY_S) == {q.purpose: q.visibility_timeout_s for q in DEFAULT_QUEUES}
    for route in NOTIFICATIONS:
        assert route.bucket in BUCKET_PURPOSES and route.queue in QUEUE_VISIBILITY_S


@pytest.mark.parametrize(
    ("prefix", "events"),
    [
        ("/fits/incoming/", (OBJECT_CREATED,)),
        ("fits/incoming", (OBJECT_CREATED,)),
        ("fits/", ("ObjectCreated:*",)),
    ],
)
def test_a_route_that_s3_would_misread_is_refused(prefix: str, events: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="NotificationRoute"):
        NotificationRoute("r", bucket="imagery", queue="fits-frames", prefix=prefix, events=events)
