"""`tessera train submit` as a user runs it: the job is queued and the stopped training instance started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3

from services.cloud.embedded import Resources

ROOT = Path(__file__).resolve().parents[2]


def _training_instance(stack: str) -> str:
    ec2 = boto3.client("ec2")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    tags = [
        {"Key": "tessera:role", "Value": "training"},
        {"Key": "tessera:start-on-demand", "Value": "true"},
        {"Key": "tessera:auto-stop", "Value": "true"},
        {"Key": "tessera:stack", "Value": stack},
    ]
    instance = ec2.run_instances(
        ImageId=image,
        InstanceType="p3.2xlarge",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )["Instances"][0]["InstanceId"]
    ec2.stop_instances(InstanceIds=[instance])
    return str(instance)


def _submit(resources: Resources, *extra: str) -> subprocess.CompletedProcess[str]:
    queue = resources.queue_urls["training-jobs"]
    command = [sys.executable, "-m", "services.cli", "train", "submit", "detector", "--dataset", "synthetic"]
    command += ["--out", f"s3://{resources.buckets['models']}/runs", "--steps", "2", "--queue-url", queue]
    return subprocess.run(
        [*command, *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
        check=False,
        timeout=120,
    )


def test_submit_queues_the_job_and_starts_the_stopped_instance(resources: Resources) -> None:
    instance = _training_instance("cli-test")
    done = _submit(resources, "--stack", "cli-test")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert instance in done.stderr and "stopped" in done.stderr
    state = boto3.client("ec2").describe_instances(InstanceIds=[instance])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] in ("pending", "running")
    messages = boto3.client("sqs").receive_message(QueueUrl=resources.queue_urls["training-jobs"])["Messages"]
    body = json.loads(messages[0]["Body"])
    assert body["job_id"] == job_id and body["task"] == "detector"


def test_a_bad_job_is_refused_and_nothing_is_queued(resources: Resources) -> None:
    done = _submit(resources, "--checkpoint-every", "0", "--no-start")
    assert done.returncode == 2
    assert "checkpoint_every" in done.stderr
    sqs = boto3.client("sqs")
    attributes = sqs.get_queue_attributes(
        QueueUrl=resources.queue_urls["training-jobs"], AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "0"
