"""What QueueWorker does for a service's small subclass: its settings from the environment, its queues in
order, the work under a heartbeat, the note logged, the message settled, and a failure logged with the
message left on its queue (against moto's SQS server; no database)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from services.cloud.queue import Message, receive_messages, send_message
from services.errors import UserError
from services.jobs.queue_worker import (
    QueueWorker,
    QueueWorkerSettings,
    ServedQueue,
    Settlement,
    optional_setting,
    setting,
)
from services.jobs.trust import policy_in_force

FIRST_ENV, SECOND_ENV = "TESSERA_TEST_FIRST_URL", "TESSERA_TEST_SECOND_URL"


@dataclass(frozen=True, kw_only=True)
class EchoSettings(QueueWorkerSettings):
    first_url: str
    second_url: str | None = None


class Echo(QueueWorker[EchoSettings]):
    """Does what each message's body says: {"do": "delete" | "defer" | "leave" | "fail"}."""

    def __init__(self, settings: EchoSettings) -> None:
        super().__init__(settings)
        queues = [("first", settings.first_url)]
        if settings.second_url:
            queues.append(("second", settings.second_url))
        self.open_queues(*queues)
        self.seen: list[tuple[str, str]] = []

    def work(self, message: Message, queue: ServedQueue) -> Settlement:
        do = str(json.loads(message.body)["do"])
        self.seen.append((queue.kind, do))
        assert policy_in_force() is self.trust  # the base's poll is confined like a subclass's own
        if do == "fail":
            raise ValueError("a bug in the handler")
        return Settlement(delete=do == "delete", defer_s=0 if do == "defer" else None, note=do)


def _queue(name: str) -> str:
    url = boto3.client("sqs").create_queue(
        QueueName=f"{name}-{time.time_ns()}", Attributes={"VisibilityTimeout": "30"}
    )["QueueUrl"]
    return str(url)


def test_settings_come_from_the_environment_and_overrides_win() -> None:
    env = {FIRST_ENV: "https://sqs/first", SECOND_ENV: ""}
    overrides: dict[str, Any] = {"wait_s": 0}
    assert setting(env, overrides, "first_url", FIRST_ENV, "the echo needs its queue") == "https://sqs/first"
    assert optional_setting(env, overrides, "second_url", SECOND_ENV) is None
    overrides["first_url"] = "https://sqs/other"
    assert setting(env, overrides, "first_url", FIRST_ENV, "x") == "https://sqs/other"
    assert overrides == {"wait_s": 0}  # what was read is taken out; the rest goes to the settings
    with pytest.raises(UserError, match=f"^{FIRST_ENV} is not set: the echo needs its queue$"):
        setting({}, {}, "first_url", FIRST_ENV, "the echo needs its queue")


def test_the_first_queue_is_served_first_and_each_message_settled_as_its_outcome_says(
    aws: str, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = _queue("first"), _queue("second")
    send_message(second, {"do": "delete"})
    send_message(first, {"do": "leave"})
    worker = Echo(EchoSettings(first_url=first, second_url=second, wait_s=0))
    assert worker.describe() == f"{first} then {second}"
    with caplog.at_level(logging.INFO, logger=__name__):
        while worker.poll():
            pass
    assert worker.seen == [("first", "leave"), ("second", "delete")] and worker.handled == 2
    notes = [r.getMessage() for r in caplog.records if r.name == __name__]
    assert [n.split(": ")[-1] for n in notes] == ["leave", "delete"] and notes[0].startswith("first message ")
    sqs = worker.sqs
    assert receive_messages(second, client=sqs) == []  # deleted
    assert receive_messages(first, client=sqs) == []  # left: hidden until its visibility timeout lapses

    send_message(first, {"do": "defer"})
    assert worker.poll(wait_s=0)
    (again,) = receive_messages(first, client=sqs)  # handed back at once
    assert again.receive_count == 2
    worker.close()


def test_an_error_in_the_work_is_logged_and_the_message_left_to_come_back(
    aws: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = _queue("failing")
    send_message(url, {"do": "fail"})
    worker = Echo(EchoSettings(first_url=url, wait_s=0, max_messages=1))
    with caplog.at_level(logging.ERROR, logger=__name__):
        assert worker.serve() == 1  # the worker goes on: serve returns when max_messages are handled
    [record] = [r for r in caplog.records if r.name == __name__]
    assert (
        "first message" in record.getMessage() and "failed unexpectedly (delivery 1)" in record.getMessage()
    )
    assert record.exc_info is not None and "a bug in the handler" in str(record.exc_info[1])
    visible = boto3.client("sqs").get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    assert visible["ApproximateNumberOfMessagesNotVisible"] == "1"  # hidden, not deleted: it comes back
