"""``tessera train submit``: queue a training job and make sure a training instance is on its way to run it.

The job is validated first (a bad job never reaches the queue), then queued, and only then is the stopped
training instance started: the queued job is what keeps the instance's idle agent from stopping it again
while it boots. The instance is found by its functional tags (``tessera:role=training``,
``tessera:start-on-demand=true``, and the stack's ``tessera:stack`` when given), never by a stored id, so a
replaced instance is found just the same.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ROLE_TAG = "tessera:role"
ROLE_TRAINING = "training"
START_ON_DEMAND_TAG = "tessera:start-on-demand"
STACK_TAG = "tessera:stack"

#: States an instance can be found in that can still run the job (terminated boxes are gone).
LIVE_STATES = ("pending", "running", "stopping", "stopped")
UP_STATES = ("pending", "running")


@dataclass(frozen=True)
class SubmitResult:
    """What ``submit_job`` did, for the command line to print."""

    job_id: str
    task: str
    message_id: str
    queue_url: str
    instance_id: str | None
    """The training instance found (None: none found)."""
    previous_state: str | None
    """Its state before anything was done to it."""
    state: str | None
    """Its state when ``submit_job`` returned."""
    started: bool
    """True when this call started it."""
    note: str
    """What happened to the instance, in a sentence (why it was not started, when it was not)."""

    def describe(self) -> str:
        """Lines for a person: the job, the queue message and the instance."""
        lines = [
            f"queued training job {self.job_id} (task {self.task}) as message {self.message_id}",
            f"  queue: {self.queue_url}",
        ]
        if self.instance_id is None:
            lines.append(f"  instance: {self.note}")
        else:
            lines.append(f"  instance {self.instance_id}: {self.note}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The result as JSON (``--json`` output)."""
        return {
            "job_id": self.job_id,
            "task": self.task,
            "message_id": self.message_id,
            "queue_url": self.queue_url,
            "instance_id": self.instance_id,
            "previous_state": self.previous_state,
            "state": self.state,
            "started": self.started,
            "note": self.note,
        }


def training_instances(ec2: Any, *, stack: str | None = None) -> list[dict[str, Any]]:
    """Training instances that may be started on demand (not terminated), running ones first, then by id."""
    filters = [
        {"Name": f"tag:{ROLE_TAG}", "Values": [ROLE_TRAINING]},
        {"Name": f"tag:{START_ON_DEMAND_TAG}", "Values": ["true"]},
        {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
    ]
    if stack:
        filters.append({"Name": f"tag:{STACK_TAG}", "Values": [stack]})
    found: list[dict[str, Any]] = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page.get("Reservations", []):
            found.extend(reservation.get("Instances", []))
    order = {state: rank for rank, state in enumerate(LIVE_STATES)}
    return sorted(found, key=lambda i: (order.get(i["State"]["Name"], len(order)), i["InstanceId"]))


def instance_state(ec2: Any, instance_id: str) -> str:
    """The current state name of one instance."""
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservations[0]["Instances"][0]["State"]["Name"])


def _wait_for(
    ec2: Any,
    instance_id: str,
    states: tuple[str, ...],
    *,
    attempts: int,
    interval_s: float,
    sleep: Callable[[float], None],
) -> str:
    """Poll until the instance is in one of ``states`` or the attempts run out; returns the last state."""
    state = instance_state(ec2, instance_id)
    for _ in range(attempts):
        if state in states:
            break
        sleep(interval_s)
        state = instance_state(ec2, instance_id)
    return state


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def start_training_instance(
    ec2: Any,
    instance: Mapping[str, Any],
    *,
    attempts: int = 15,
    interval_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str, bool, str]:
    """Start ``instance`` if it is stopped (waiting out a stop in progress first).

    Returns ``(state, started, note)``. Never raises for AWS refusals: the job is queued already, and the
    note says what the user can do.
    """
    instance_id = str(instance["InstanceId"])
    state = str(instance["State"]["Name"])
    if state in UP_STATES:
        return state, False, f"already {state}; it will pick the job up"
    if state == "stopping":
        # The idle agent or the safety net is stopping it; a stopping instance cannot be started yet.
        state = _wait_for(
            ec2, instance_id, ("stopped",), attempts=attempts, interval_s=interval_s, sleep=sleep
        )
        if state != "stopped":
            return state, False, f"still {state}; run the submit again in a minute to start it"
    try:
        response = ec2.start_instances(InstanceIds=[instance_id])
    except Exception as exc:
        code = _error_code(exc)
        if code == "InsufficientInstanceCapacity":
            why = "AWS has no capacity for its instance type in its zone right now; try again later"
        elif code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
            why = "you may not start it (ec2:StartInstances denied); ask for the permission or start it"
        else:
            why = f"{code or type(exc).__name__}: {exc}"
        return state, False, f"could not be started ({why}); the job waits on the queue"
    starting = response.get("StartingInstances", [{}])[0].get("CurrentState", {}).get("Name", "pending")
    state = str(starting)
    if state not in UP_STATES:
        state = _wait_for(ec2, instance_id, UP_STATES, attempts=attempts, interval_s=interval_s, sleep=sleep)
    if state in UP_STATES:
        return state, True, f"started (was stopped, now {state}); it runs the job once it has booted"
    return state, True, f"start requested but it is {state}; check it in the EC2 console"


def submit_job(
    job: Mapping[str, Any],
    *,
    queue_url: str,
    sqs: Any,
    ec2: Any,
    start_instance: bool = True,
    stack: str | None = None,
    attempts: int = 15,
    interval_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> SubmitResult:
    """Validate ``job``, queue it, and start the stopped training instance (unless ``start_instance`` is off).

    A bad job raises :class:`~services.errors.UserError` before anything is queued. Once queued, nothing
    raises for the instance: the result's ``note`` says what happened to it (none found, already running,
    started, could not start).
    """
    from services.trainer.job import parse_job

    parsed = parse_job(job)
    body = parsed.to_json()  # defaults written out, and the job id a job without one was given
    response = sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(body))
    message_id = str(response["MessageId"])

    def result(
        instance_id: str | None, previous: str | None, state: str | None, started: bool, note: str
    ) -> SubmitResult:
        return SubmitResult(
            job_id=parsed.job_id,
            task=parsed.task,
            message_id=message_id,
            queue_url=queue_url,
            instance_id=instance_id,
            previous_state=previous,
            state=state,
            started=started,
            note=note,
        )

    found = training_instances(ec2, stack=stack)
    if not found:
        where = f" in stack {stack}" if stack else ""
        return result(
            None,
            None,
            None,
            False,
            f"no training instance{where} is tagged {ROLE_TAG}={ROLE_TRAINING} and "
            f"{START_ON_DEMAND_TAG}=true; the job waits on the queue until one runs "
            "(deploy the compute layer with training enabled, or check the stack name)",
        )
    instance = found[0]
    instance_id = str(instance["InstanceId"])
    previous = str(instance["State"]["Name"])
    if not start_instance:
        note = f"{previous}; not started (start it yourself, or submit without --no-start)"
        if previous in UP_STATES:
            note = f"already {previous}; it will pick the job up"
        return result(instance_id, previous, previous, False, note)
    state, started, note = start_training_instance(
        ec2, instance, attempts=attempts, interval_s=interval_s, sleep=sleep
    )
    return result(instance_id, previous, state, started, note)
