"""``tessera train submit``: a job is validated, queued, and the stopped training instance is started."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from services.errors import UserError
from services.trainer.launch import submit_job

AMI = "ami-0123456789abcdef0"
TRAINING_TAGS = {"tessera:role": "training", "tessera:start-on-demand": "true", "tessera:auto-stop": "true"}
JOB = {
    "job_id": "ships-1",
    "task": "detector",
    "dataset": "s3://datasets/ships/",
    "output": "s3://models/ships/run-1/",
    "steps": 100,
}


@pytest.fixture
def aws(mocked_aws: boto3.Session) -> tuple[Any, Any, str]:
    """Moto's SQS and EC2, and an empty training queue."""
    sqs = mocked_aws.client("sqs")
    ec2 = mocked_aws.client("ec2")
    url = sqs.create_queue(QueueName="training-jobs")["QueueUrl"]
    return sqs, ec2, url


def _launch(ec2: Any, tags: dict[str, str], *, stopped: bool = False) -> str:
    response = ec2.run_instances(
        ImageId=AMI,
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ],
    )
    instance_id = str(response["Instances"][0]["InstanceId"])
    if stopped:
        ec2.stop_instances(InstanceIds=[instance_id])
    return instance_id


def _state(ec2: Any, instance_id: str) -> str:
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservations[0]["Instances"][0]["State"]["Name"])


def _queued(sqs: Any, url: str) -> list[dict[str, Any]]:
    messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
    return [json.loads(m["Body"]) for m in messages]


def _no_sleep(seconds: float) -> None:
    pass


def test_a_submitted_job_starts_the_stopped_training_instance(aws: tuple[Any, Any, str]) -> None:
    sqs, ec2, url = aws
    box = _launch(ec2, TRAINING_TAGS, stopped=True)
    other = _launch(ec2, {"tessera:role": "worker"}, stopped=True)
    result = submit_job(JOB, queue_url=url, sqs=sqs, ec2=ec2, sleep=_no_sleep)
    assert (result.instance_id, result.previous_state, result.started) == (box, "stopped", True)
    assert result.state in ("pending", "running")
    assert _state(ec2, box) in ("pending", "running")
    assert _state(ec2, other) == "stopped"
    (queued,) = _queued(sqs, url)
    assert queued["job_id"] == "ships-1"
    assert queued["schema"] == "tessera.training-job/v1"  # validated, defaults written out
    assert result.message_id
    text = result.describe()
    assert "ships-1" in text and box in text and result.message_id in text and "started" in text


def test_a_running_training_instance_is_left_alone(aws: tuple[Any, Any, str]) -> None:
    sqs, ec2, url = aws
    box = _launch(ec2, TRAINING_TAGS)
    calls: list[str] = []

    class Watching:
        """The EC2 client, recording any start."""

        def __getattr__(self, name: str) -> Any:
            if name == "start_instances":
                calls.append(name)
            return getattr(ec2, name)

    result = submit_job(JOB, queue_url=url, sqs=sqs, ec2=Watching(), sleep=_no_sleep)
    assert (result.instance_id, result.previous_state, result.started) == (box, "running", False)
    assert calls == []
    assert "already running" in result.note
    assert len(_queued(sqs, url)) == 1


def test_no_training_instance_gives_a_clear_message_and_the_job_stays_queued(
    aws: tuple[Any, Any, str],
) -> None:
    sqs, ec2, url = aws
    _launch(ec2, {"tessera:role": "training"}, stopped=True)  # not marked start-on-demand
    result = submit_job(JOB, queue_url=url, sqs=sqs, ec2=ec2, sleep=_no_sleep)
    assert result.instance_id is None and result.started is False
    assert "tessera:start-on-demand=true" in result.note
    assert "waits on the queue" in result.note
    assert [m["job_id"] for m in _queued(sqs, url)] == ["ships-1"]


def test_the_stack_tag_picks_this_stacks_instance(aws: tuple[Any, Any, str]) -> None:
    sqs, ec2, url = aws
    prod = _launch(ec2, {**TRAINING_TAGS, "tessera:stack": "prod-compute"}, stopped=True)
    dev = _launch(ec2, {**TRAINING_TAGS, "tessera:stack": "dev"}, stopped=True)
    result = submit_job(JOB, queue_url=url, sqs=sqs, ec2=ec2, stack="dev", sleep=_no_sleep)
    assert result.instance_id == dev and result.started
    assert _state(ec2, prod) == "stopped"
    missing = submit_job(JOB, queue_url=url, sqs=sqs, ec2=ec2, stack="staging", sleep=_no_sleep)
    assert missing.instance_id is None and "in stack staging" in missing.note


def test_no_start_queues_without_starting(aws: tuple[Any, Any, str]) -> None:
    sqs, ec2, url = aws
    box = _launch(ec2, TRAINING_TAGS, stopped=True)
    result = submit_job(JOB, queue_url=url, sqs=sqs, ec2=ec2, start_instance=False, sleep=_no_sleep)
    assert (result.instance_id, result.started, result.state) == (box, False, "stopped")
    assert _state(ec2, box) == "stopped"
    assert len(_queued(sqs, url)) == 1


def test_a_bad_job_is_refused_before_anything_is_queued_or_started(aws: tuple[Any, Any, str]) -> None:
    sqs, ec2, url = aws
    box = _launch(ec2, TRAINING_TAGS, stopped=True)
    with pytest.raises(UserError, match=r"\$\.steps"):
        submit_job({**JOB, "steps": 0}, queue_url=url, sqs=sqs, ec2=ec2, sleep=_no_sleep)
    assert _queued(sqs, url) == []
    assert _state(ec2, box) == "stopped"


class StoppingBox:
    """An EC2 stand-in: one training instance that is stopping, and may refuse to start."""

    def __init__(self, *, stopped_after: int, refuse: str | None = None) -> None:
        self.polls = 0
        self.stopped_after = stopped_after
        self.refuse = refuse
        self.started = False

    def _state(self) -> str:
        if self.started:
            return "pending"
        return "stopped" if self.polls >= self.stopped_after else "stopping"

    def _instance(self) -> dict[str, Any]:
        return {"InstanceId": "i-0box", "State": {"Name": self._state()}}

    def get_paginator(self, name: str) -> Any:
        box = self

        class Pages:
            def paginate(self, **kwargs: Any) -> list[dict[str, Any]]:
                return [{"Reservations": [{"Instances": [box._instance()]}]}]

        return Pages()

    def describe_instances(self, **kwargs: Any) -> dict[str, Any]:
        self.polls += 1
        return {"Reservations": [{"Instances": [self._instance()]}]}

    def start_instances(self, **kwargs: Any) -> dict[str, Any]:
        if self._state() != "stopped":
            raise ClientError({"Error": {"Code": "IncorrectInstanceState"}}, "StartInstances")
        if self.refuse:
            raise ClientError({"Error": {"Code": self.refuse, "Message": "no"}}, "StartInstances")
        self.started = True
        return {"StartingInstances": [{"CurrentState": {"Name": "pending"}}]}


def test_an_instance_that_is_stopping_is_started_once_it_has_stopped(aws: tuple[Any, Any, str]) -> None:
    sqs, _, url = aws
    box = StoppingBox(stopped_after=3)
    result = submit_job(JOB, queue_url=url, sqs=sqs, ec2=box, sleep=_no_sleep)
    assert (result.previous_state, result.started, result.state) == ("stopping", True, "pending")


def test_an_instance_that_stays_stopping_is_reported_not_started(aws: tuple[Any, Any, str]) -> None:
    sqs, _, url = aws
    box = StoppingBox(stopped_after=1000)
    result = submit_job(JOB, queue_url=url, sqs=sqs, ec2=box, attempts=4, sleep=_no_sleep)
    assert (result.started, result.state) == (False, "stopping")
    assert "run the submit again" in result.note
    assert box.polls == 5  # the first look and four more


def test_a_refused_start_says_why_and_keeps_the_job(aws: tuple[Any, Any, str]) -> None:
    sqs, _, url = aws
    box = StoppingBox(stopped_after=0, refuse="InsufficientInstanceCapacity")
    result = submit_job(JOB, queue_url=url, sqs=sqs, ec2=box, sleep=_no_sleep)
    assert result.started is False
    assert "no capacity" in result.note and "waits on the queue" in result.note
    assert len(_queued(sqs, url)) == 1
    assert result.to_json()["instance_id"] == "i-0box"
