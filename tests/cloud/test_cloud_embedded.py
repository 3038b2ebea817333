"""The embedded default: the platform's buckets and queues on moto, PostgreSQL, and the worker environment
under the names the Pulumi program gives the containers."""

from __future__ import annotations

import json

import boto3
import psycopg

from services.cloud.embedded import BUCKET_PURPOSES, EmbeddedPlatform, env_name
from stacks.services import env_name as stack_env_name
from stacks.services import service


def test_env_names_match_the_stack() -> None:
    for kind, purpose in [("queue", "image-requests"), ("bucket", "imagery"), ("queue", "region-requests")]:
        assert env_name(kind, purpose) == stack_env_name(kind, purpose)


def test_embedded_platform_gives_a_worker_everything_the_stack_would() -> None:
    spec = service("model-runner")
    with EmbeddedPlatform(max_receive_count=2, visibility_s={"region-requests": 7}) as platform:
        env = platform.env
        # Every variable the Pulumi program sets for the model runner's queues and buckets is here.
        for queue in (*spec.consumes, *spec.sends):
            assert env[stack_env_name("queue", queue) + "_URL"] == platform.queue_url(queue)
        for use in (*spec.reads, *spec.writes):
            assert env[stack_env_name("bucket", use.purpose)] == platform.bucket(use.purpose)
        assert env["TESSERA_SERVICE"] == "model-runner"
        assert env["AWS_ENDPOINT_URL"] == platform.endpoint_url

        credentials = {
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        }
        s3 = boto3.client("s3", endpoint_url=platform.endpoint_url, **credentials)
        names = {b["Name"] for b in s3.list_buckets()["Buckets"]}
        assert {platform.bucket(p) for p in BUCKET_PURPOSES} <= names

        sqs = boto3.client("sqs", endpoint_url=platform.endpoint_url, **credentials)
        attributes = sqs.get_queue_attributes(
            QueueUrl=platform.queue_url("region-requests"), AttributeNames=["All"]
        )["Attributes"]
        assert attributes["VisibilityTimeout"] == "7"
        redrive = json.loads(attributes["RedrivePolicy"])
        assert int(redrive["maxReceiveCount"]) == 2
        dlq_arn = sqs.get_queue_attributes(
            QueueUrl=platform.dlq_url("region-requests"), AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]
        assert redrive["deadLetterTargetArn"] == dlq_arn

        with psycopg.connect(env["TESSERA_DB_URL"]) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        directory = platform.directory
    assert directory is not None and not directory.exists()
