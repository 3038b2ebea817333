"""The shared worker loop and message settling, against moto's SQS server."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import boto3
import psycopg
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from services.cloud.queue import Message, QueueSettings, receive_messages, send_message
from services.jobs.queue_worker import (
    MAX_BACKOFF_S,
    MAX_VISIBILITY_S,
    Backoff,
    QueueWorker,
    QueueWorkerSettings,
    last_delivery,
    outage,
    settle,
    start_with_backoff,
)


def make_queue(endpoint: str, name: str) -> tuple[Any, str]:
    sqs = boto3.client("sqs", endpoint_url=endpoint)
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
    return sqs, url


def visible(sqs: Any, url: str) -> int:
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    return int(attributes["Attributes"]["ApproximateNumberOfMessages"])


def test_settle_deletes_hands_back_or_leaves_a_message(aws: str) -> None:
    sqs, url = make_queue(aws, f"settle-{time.time_ns()}")
    for n in range(3):
        send_message(url, {"n": n}, sqs)
    first, second, third = (receive_messages(url, client=sqs)[0] for _ in range(3))
    assert visible(sqs, url) == 0

    settle(first, sqs, delete=True)
    settle(second, sqs, delete=False, defer_s=0)  # handed back at once
    settle(third, sqs, delete=False)  # left: reappears when its visibility lapses
    (again,) = receive_messages(url, client=sqs)
    assert again.body == second.body and again.receive_count == 2
    assert receive_messages(url, client=sqs) == []


def test_settle_clamps_a_deferral_to_what_sqs_accepts() -> None:
    calls: list[dict[str, Any]] = []

    class Recorder:
        def change_message_visibility(self, **kwargs: Any) -> None:
            calls.append(kwargs)

    message = Message("q", "m", "r", "{}", 1, 0.0)
    settle(message, Recorder(), delete=False, defer_s=0.2)
    settle(message, Recorder(), delete=False, defer_s=10.5)
    settle(message, Recorder(), delete=False, defer_s=10 * MAX_VISIBILITY_S)
    assert [c["VisibilityTimeout"] for c in calls] == [1, 11, MAX_VISIBILITY_S]


def test_last_delivery_follows_the_redrive_policy() -> None:
    def message(count: int) -> Message:
        return Message("q", "m", "r", "{}", count, 0.0)

    assert not last_delivery(message(1), QueueSettings(30, 3))
    assert last_delivery(message(3), QueueSettings(30, 3))
    assert not last_delivery(message(99), QueueSettings(30, None))


class Scripted(QueueWorker):
    """Polls from a script: True handles a message, an exception is raised as is."""

    def __init__(self, script: list[Any], **settings: Any) -> None:
        super().__init__(QueueWorkerSettings(**settings))
        self.script = script
        self.polls = 0

    def poll(self, wait_s: int | None = None) -> bool:
        self.polls += 1
        step = self.script.pop(0) if self.script else False
        if isinstance(step, BaseException):
            raise step
        if step:
            self.handled += 1
        if not self.script:
            self.stop()
        return bool(step)


def test_serve_stops_after_max_messages() -> None:
    worker = Scripted([True, False, True, True, True], max_messages=2)
    assert worker.serve() == 2
    assert worker.polls == 3 and worker.worker_id  # host:pid by default


def test_serve_rides_out_unreachable_dependencies_with_backoff(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    waits: list[float] = []
    worker = Scripted(
        [
            psycopg.OperationalError("connection refused"),
            EndpointConnectionError(endpoint_url="http://sqs"),
            ReadTimeoutError(endpoint_url="http://sqs"),
            _client_error(503, "ServiceUnavailable"),
            True,
            psycopg.OperationalError("again"),
            True,
        ]
    )
    monkeypatch.setattr(worker.stop_event, "wait", lambda seconds: waits.append(seconds) or False)
    with caplog.at_level(logging.WARNING):
        assert worker.serve() == 2 and worker.polls == 7
    assert waits == [1.0, 2.0, 4.0, 8.0, 1.0]  # doubling, and back to the first delay after a success
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "the database is unreachable (connection refused); retry 1 in 1 s" in lines[0]
    assert "AWS is unreachable" in lines[1] and "AWS answers 503" in lines[3]


def test_the_backoff_stops_at_its_max() -> None:
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(8)]
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30] and MAX_BACKOFF_S == 30


def test_a_client_error_that_is_the_request_is_not_an_outage() -> None:
    assert outage(_client_error(400, "AWS.SimpleQueueService.NonExistentQueue")) is None
    assert outage(ZeroDivisionError("bug")) is None
    with pytest.raises(ClientError):
        Scripted([_client_error(403, "AccessDenied")]).serve()


def test_start_with_backoff_waits_for_the_dependencies_and_gives_up_when_stopped() -> None:
    attempts: list[int] = []

    def make() -> Scripted:
        attempts.append(1)
        if len(attempts) < 3:
            raise psycopg.OperationalError("not yet")
        return Scripted([])

    stop = threading.Event()
    assert isinstance(start_with_backoff(make, stop, Backoff(first_s=0.01)), Scripted)
    assert len(attempts) == 3
    stop.set()

    def never() -> Scripted:
        raise EndpointConnectionError(endpoint_url="http://sqs")

    assert start_with_backoff(never, stop, Backoff(first_s=0.01)) is None
    with pytest.raises(ValueError):
        start_with_backoff(lambda: (_ for _ in ()).throw(ValueError("a bug")), threading.Event())


def _client_error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Receive"
    )


def test_other_errors_are_not_swallowed_by_the_loop() -> None:
    with pytest.raises(ZeroDivisionError):
        Scripted([ZeroDivisionError("bug")]).serve()
