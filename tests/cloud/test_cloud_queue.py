"""SQS edges on moto: batches, receive counts, dead-letter redrive, and the visibility heartbeat."""

from __future__ import annotations

import socket
import time

import boto3
import pytest

from services.cloud.embedded import Resources
from services.cloud.queue import (
    Heartbeat,
    delete_message,
    queue_settings,
    receive_messages,
    send_message,
    send_messages,
    set_visibility,
)
from services.errors import UserError


def _receive_within(url: str, seconds: float) -> list:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = receive_messages(url, max_messages=1, wait_s=0)
        if got:
            return got
        time.sleep(0.1)
    return []


def test_batches_of_more_than_ten_all_arrive(resources: Resources) -> None:
    url = resources.queue_urls["region-requests"]
    assert send_messages(url, [{"i": i} for i in range(23)]) == 23
    seen = set()
    deadline = time.monotonic() + 10
    while len(seen) < 23 and time.monotonic() < deadline:
        for message in receive_messages(url, max_messages=10, wait_s=0):
            seen.add(message.body)
            delete_message(message)
    assert seen == {f'{{"i": {i}}}' for i in range(23)}


def test_queue_settings_read_visibility_and_redrive(resources: Resources) -> None:
    settings = queue_settings(resources.queue_urls["region-requests"])
    assert settings.visibility_timeout_s == 3
    assert settings.max_receive_count == 2
    assert queue_settings(resources.dlq_urls["region-requests"]).max_receive_count is None


def test_a_message_received_too_often_lands_in_the_dead_letter_queue(resources: Resources) -> None:
    url, dlq = resources.queue_urls["region-requests"], resources.dlq_urls["region-requests"]
    send_message(url, {"poison": True})
    counts = []
    for _ in range(2):
        (message,) = _receive_within(url, 5)
        counts.append(message.receive_count)
        assert message.sent_at > time.time() - 60
        set_visibility(message, 0)  # fail fast: visible again at once
    assert counts == [1, 2]
    assert receive_messages(url, wait_s=0) == []
    (dead,) = _receive_within(dlq, 5)
    assert dead.body == '{"poison": true}'


def test_heartbeat_keeps_a_message_hidden_past_its_visibility_timeout(resources: Resources) -> None:
    url = resources.queue_urls["region-requests"]  # visibility 3 s
    send_message(url, {"work": "long"})
    (message,) = _receive_within(url, 5)
    beats = []
    with Heartbeat(message, visibility_s=1, on_beat=lambda: beats.append(time.monotonic())) as beat:
        # Twice the visibility: without the heartbeat the message would be handed out again meanwhile.
        assert _receive_within(url, 2.5) == []
    assert beat.beats >= 3
    assert len(beats) == beat.beats
    # Once the beating stops, the message comes back within about one visibility timeout.
    (again,) = _receive_within(url, 4)
    assert again.message_id == message.message_id
    assert again.receive_count == 2


def test_without_a_heartbeat_the_message_comes_back(resources: Resources) -> None:
    """The control for the heartbeat test: the same wait without it sees the message again."""
    url = resources.queue_urls["region-requests"]
    send_message(url, {"work": "long"})
    (message,) = _receive_within(url, 5)
    set_visibility(message, 2)
    (again,) = _receive_within(url, 4.5)
    assert again.message_id == message.message_id


def test_heartbeat_failures_do_not_reach_the_work(resources: Resources, aws: str) -> None:
    url = resources.queue_urls["region-requests"]
    send_message(url, {"work": "gone"})
    (message,) = _receive_within(url, 5)
    delete_message(message)  # extending a deleted message's visibility fails
    client = boto3.client("sqs", endpoint_url=aws)
    with Heartbeat(message, visibility_s=3, interval_s=0.05, client=client) as beat:
        time.sleep(0.3)
    assert beat.beats == 0


def test_sending_to_a_queue_that_does_not_exist_says_what_to_check(resources: Resources) -> None:
    missing = resources.queue_urls["image-requests"].rsplit("/", 1)[0] + "/no-such-queue"
    with pytest.raises(UserError, match="does not exist: check the queue URL"):
        send_message(missing, {"hello": 1})


def test_sending_without_reaching_sqs_says_what_to_check(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(UserError, match="cannot reach SQS"):
        send_message(f"http://127.0.0.1:{port}/123456789012/q", {"hello": 1})
