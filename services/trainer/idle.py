"""The training instance's idle agent: stop the box once nothing has needed it for the idle period.

Every minute the agent looks at three things, and the box is idle when all three say so:

- the training queue holds no job (waiting, in flight or delayed);
- the trainer is not running a job: it keeps a state file (``TESSERA_TRAINER_STATE``, by default
  ``/run/tessera/trainer-state.json``: ``{"busy": bool, "job_id": str | null, "updated": ISO-8601}``),
  rewritten at least every minute while a job runs; a busy file older than ten minutes means the trainer
  died, which counts as not busy;
- no one is logged in: no established SSH connection to port 22 and no Session Manager session.

While someone is logged in the agent also publishes the busy heartbeat (:class:`BusyHeartbeat`: CloudWatch
:data:`BUSY_NAMESPACE` / :data:`BUSY_METRIC` = 1, dimension ``InstanceId``), as the trainer does while a job
runs, so that the safety net (``services/autostop``), which cannot see logins or jobs, does not stop a box
someone is debugging on or staging data with: it counts the box idle only when its accelerators idle and no
busy heartbeat came. The box's idle alarm reads one metric the host publishes instead (``infra/boot/
tessera-activity``), which applies this module's job and login rules to the same state file and ``/proc``.

Once the box has been idle without a break for ``TESSERA_IDLE_MINUTES`` (default 5), the agent stops its own
instance through the EC2 API (instance id from IMDSv2). Should that fail it runs ``shutdown -h now`` (the
instance's shutdown behaviour is *stop*), and where there is no ``shutdown`` (in a container) it exits with
:data:`EXIT_STOP_REQUESTED` for the host-side wrapper to shut the box down (see :data:`SYSTEMD_UNIT`).

The decision (:func:`busy_reasons`, :class:`IdleTracker`) is pure and takes the time as an argument; the
probes that feed it are small functions passed in, so tests run it with a fake clock and fake probes.
A probe that fails counts as busy: stopping a box by mistake interrupts work, while a box the agent wrongly
keeps alive is still caught by the independent safety net (``services/autostop``).

Run it as ``python -m services.trainer.idle``.

This module stays one file (~560 lines): it is the one program the training box runs (``host/`` names
``python -m services.trainer.idle``), and its state file, heartbeat, decision, probes and stopping are the
steps of that one agent's loop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAINER_STATE_ENV = "TESSERA_TRAINER_STATE"
DEFAULT_TRAINER_STATE = Path("/run/tessera/trainer-state.json")
IDLE_MINUTES_ENV = "TESSERA_IDLE_MINUTES"
DEFAULT_IDLE_MINUTES = 5.0
QUEUE_URL_ENV = "TESSERA_QUEUE_TRAINING_JOBS_URL"
"""The training queue, under the name the Pulumi program gives the trainer's environment."""

STALE_AFTER_S = 600.0
"""A busy state file older than this means the trainer died (a running job rewrites it every minute)."""
CHECK_INTERVAL_S = 60.0
SSH_PORT = 22
SESSION_WORKER = "ssm-session-worker"
"""The process Session Manager runs for each open session on the instance."""

EXIT_STOP_REQUESTED = 75
"""Exit status meaning "stop this box: the API and ``shutdown`` both failed here" (for the host wrapper)."""

IMDS = "http://169.254.169.254"

BUSY_NAMESPACE = "tessera/Training"
"""The busy heartbeat's namespace (the box's role may publish here; ``infra/training_boot.py`` has a copy)."""
BUSY_METRIC = "Busy"
"""1 while a job runs (data staging included) or someone is logged in, with an ``InstanceId`` dimension."""
BUSY_INTERVAL_S = 50.0
"""The least time between two heartbeats: one a minute (callers beat every 30 to 60 s), never a flood."""
INSTANCE_ID_ENV = "TESSERA_INSTANCE_ID"
"""This box's instance id, given to the trainer container by its start script (the heartbeat's dimension)."""

QUEUE_ATTRIBUTES = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)

HOST_DIR = Path(__file__).with_name("host")
"""The files the box runs the agent with (package data): the Pulumi program (``infra/training_boot.py``)
installs these very files on every training box."""

SYSTEMD_UNIT = (HOST_DIR / "tessera-idle.service").read_text(encoding="utf-8")
"""``/etc/systemd/system/tessera-idle.service``: runs :data:`WRAPPER_SCRIPT`, and again should it die."""

WRAPPER_SCRIPT = (HOST_DIR / "tessera-idle-agent").read_text(encoding="utf-8")
"""``/usr/local/bin/tessera-idle-agent`` (mode 0755). Fill ``@REGION@`` and ``@IDLE_MINUTES@``. It needs
``/etc/tessera/trainer.image`` (the image the trainer start script resolved from SSM) and ``/etc/tessera/
trainer.env`` (which carries ``TESSERA_QUEUE_TRAINING_JOBS_URL``)."""


# --- the trainer's state file ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainerState:
    """What the trainer last said about itself."""

    busy: bool
    job_id: str | None
    updated: float
    """When it said so, in seconds since the epoch."""


def _timestamp(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("updated must be a time, not a boolean")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return stamp.timestamp()
    raise ValueError(f"updated must be an ISO-8601 time or epoch seconds, not {value!r}")


def read_trainer_state(path: Path) -> TrainerState | None:
    """The trainer's state from its file; None when there is none (no trainer has started on this boot).

    A file that cannot be parsed raises ValueError (the agent counts that as busy for this check).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("busy"), bool):
        raise ValueError(f"{path}: expected an object with a boolean 'busy'")
    job_id = data.get("job_id")
    return TrainerState(
        busy=data["busy"],
        job_id=None if job_id is None else str(job_id),
        updated=_timestamp(data.get("updated")),
    )


def write_trainer_state(path: Path, *, busy: bool, job_id: str | None, now: float | None = None) -> None:
    """Write the trainer's state atomically (the trainer: at job start, every minute, and at the end)."""
    updated = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    body = json.dumps({"busy": busy, "job_id": job_id, "updated": updated.isoformat()})
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-rename: the agent never reads half a file.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(body)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# --- the busy heartbeat ------------------------------------------------------------------------------------


class BusyHeartbeat:
    """Publishes ``Busy = 1`` for this instance to CloudWatch, at most once per ``interval_s``.

    :meth:`publish` never raises: a heartbeat that cannot be sent is logged, and the box then looks as idle
    as its accelerators say (the safe side for the bill; the on-box agent still sees the job or the login).
    Thread-safe: the trainer's visibility heartbeat and its training loop both call it.
    """

    def __init__(
        self,
        instance_id: Callable[[], str],
        cloudwatch: Callable[[], Any],
        *,
        interval_s: float = BUSY_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._instance_id = instance_id
        self._cloudwatch = cloudwatch
        self.interval_s = interval_s
        self.clock = clock
        self.last_sent: float | None = None
        self._lock = threading.Lock()
        self._resolved: tuple[str, Any] | None = None

    def publish(self) -> bool:
        """Send one heartbeat unless one went out less than ``interval_s`` ago; True when one was sent."""
        with self._lock:
            now = self.clock()
            if self.last_sent is not None and 0 <= now - self.last_sent < self.interval_s:
                return False
            self.last_sent = now  # a failing attempt also waits an interval: no retry storm
        try:
            if self._resolved is None:
                self._resolved = (self._instance_id(), self._cloudwatch())
            instance_id, cloudwatch = self._resolved
            cloudwatch.put_metric_data(
                Namespace=BUSY_NAMESPACE,
                MetricData=[
                    {
                        "MetricName": BUSY_METRIC,
                        "Dimensions": [{"Name": "InstanceId", "Value": instance_id}],
                        "Value": 1.0,
                        "Unit": "Count",
                    }
                ],
            )
        except Exception as exc:
            log.warning("could not publish the busy heartbeat (%s: %s)", type(exc).__name__, exc)
            return False
        return True


def _cloudwatch_client(environ: Mapping[str, str]) -> Any:
    """A CloudWatch client that gives up quickly: the trainer beats from its SQS visibility heartbeat, which
    a hung metrics call must not hold up for long."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "cloudwatch",
        endpoint_url=environ.get("AWS_ENDPOINT_URL") or None,
        config=Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 2, "mode": "standard"}),
    )


def busy_heartbeat_from_environment(environ: Mapping[str, str]) -> BusyHeartbeat | None:
    """The trainer's heartbeat on a training box (``TESSERA_INSTANCE_ID`` set); None anywhere else."""
    instance_id = (environ.get(INSTANCE_ID_ENV) or "").strip()
    if not instance_id:
        return None
    return BusyHeartbeat(lambda: instance_id, lambda: _cloudwatch_client(environ))


# --- the decision ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """One look at the box. A ``None`` (or an ``errors`` entry) means that probe could not answer."""

    queued: int | None
    """Training jobs waiting, in flight or delayed."""
    trainer: TrainerState | None
    sessions: int | None
    """Open SSH and Session Manager sessions."""
    errors: Mapping[str, str] = field(default_factory=dict)
    """Probe name -> what went wrong."""


def busy_reasons(observation: Observation, now: float, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Why the box is needed right now; an empty list means it is idle."""
    reasons = [f"{probe} unknown ({error})" for probe, error in observation.errors.items()]
    if observation.queued is None:
        if "queue" not in observation.errors:
            reasons.append("queue depth unknown")
    elif observation.queued > 0:
        reasons.append(f"{observation.queued} training job(s) queued")
    trainer = observation.trainer
    if trainer is not None and trainer.busy:
        age = now - trainer.updated
        if age <= stale_after_s:
            reasons.append(f"trainer busy with job {trainer.job_id or '?'}")
        else:
            log.warning("trainer state says busy but is %.0f s old: the trainer died; not busy", age)
    if observation.sessions is None:
        if "sessions" not in observation.errors:
            reasons.append("login sessions unknown")
    elif observation.sessions > 0:
        reasons.append(f"{observation.sessions} login session(s) open")
    return reasons


@dataclass(frozen=True)
class Decision:
    """The outcome of one check."""

    stop: bool
    idle_for_s: float
    """How long the box has been idle without a break (0 when busy)."""
    reasons: tuple[str, ...]
    """Why it is busy (empty when idle)."""


@dataclass
class IdleTracker:
    """Counts how long the box has been idle without a break; says stop once that reaches the idle period."""

    idle_period_s: float
    idle_since: float | None = None

    def __post_init__(self) -> None:
        if self.idle_period_s <= 0:
            raise ValueError(f"the idle period must be positive, got {self.idle_period_s} s")

    def update(self, reasons: Sequence[str], now: float) -> Decision:
        """Record one check at ``now``; any reason to stay up starts the count again."""
        if reasons:
            self.idle_since = None
            return Decision(stop=False, idle_for_s=0.0, reasons=tuple(reasons))
        if self.idle_since is None or self.idle_since > now:  # first idle check (or the clock went back)
            self.idle_since = now
        idle_for = now - self.idle_since
        return Decision(stop=idle_for >= self.idle_period_s, idle_for_s=idle_for, reasons=())


# --- probes ------------------------------------------------------------------------------------------------


def queue_depth(queue_url: str, sqs: Any) -> int:
    """Messages on the queue: waiting, being worked on (not visible) and delayed."""
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=list(QUEUE_ATTRIBUTES))
    values = attributes.get("Attributes", {})
    return sum(int(values.get(name, 0)) for name in QUEUE_ATTRIBUTES)


_TCP_ESTABLISHED = "01"


def ssh_connections(proc_net: Path = Path("/proc/net"), port: int = SSH_PORT) -> int:
    """Established TCP connections whose local port is ``port`` (IPv4 and IPv6), from ``/proc/net/tcp*``."""
    count = 0
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc_net / name).read_text(encoding="ascii").splitlines()[1:]
        except FileNotFoundError:
            continue  # no IPv6 on this kernel
        for line in lines:
            fields = line.split()
            if len(fields) < 4:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == _TCP_ESTABLISHED:
                count += 1
    return count


def session_workers(proc: Path = Path("/proc")) -> int:
    """Running Session Manager sessions (``ssm-session-worker`` processes)."""
    count = 0
    for comm in proc.glob("[0-9]*/comm"):
        try:
            if comm.read_text(encoding="utf-8", errors="replace").strip() == SESSION_WORKER:
                count += 1
        except OSError:
            continue  # the process ended while we looked
    return count


def login_sessions(proc: Path = Path("/proc")) -> int:
    """Everyone logged in: SSH connections plus Session Manager sessions."""
    return ssh_connections(proc / "net") + session_workers(proc)


@dataclass(frozen=True)
class Probes:
    """Where the agent looks; each probe may raise, which counts as busy for that check."""

    queued: Callable[[], int]
    trainer: Callable[[], TrainerState | None]
    sessions: Callable[[], int]


def observe(probes: Probes) -> Observation:
    """Ask every probe; a probe that raises is recorded in ``errors`` instead of stopping the agent."""
    errors: dict[str, str] = {}

    def ask(name: str, probe: Callable[[], Any]) -> Any:
        try:
            return probe()
        except Exception as exc:  # any failure of a probe means "cannot tell", never "idle"
            errors[name] = f"{type(exc).__name__}: {exc}"
            return None

    queued = ask("queue", probes.queued)
    trainer = ask("trainer state", probes.trainer)
    sessions = ask("sessions", probes.sessions)
    return Observation(queued=queued, trainer=trainer, sessions=sessions, errors=errors)


# --- stopping ----------------------------------------------------------------------------------------------


class StopFailedError(RuntimeError):
    """Neither the EC2 API nor ``shutdown`` could stop the box."""


def imds_instance_id(base_url: str = IMDS, timeout_s: float = 2.0) -> str:
    """This instance's id, through IMDSv2 (a session token first, then the metadata)."""
    token_request = urllib.request.Request(
        f"{base_url}/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"},
    )
    with urllib.request.urlopen(token_request, timeout=timeout_s) as response:
        token = response.read().decode()
    id_request = urllib.request.Request(
        f"{base_url}/latest/meta-data/instance-id", headers={"X-aws-ec2-metadata-token": token}
    )
    with urllib.request.urlopen(id_request, timeout=timeout_s) as response:
        return str(response.read().decode().strip())


def stop_self(
    *,
    instance_id: Callable[[], str],
    ec2: Callable[[], Any],
    shutdown_command: Sequence[str] = ("shutdown", "-h", "now"),
    run: Callable[[Sequence[str]], Any] = lambda command: subprocess.run(command, check=True),
    which: Callable[[str], str | None] = shutil.which,
) -> str:
    """Stop this instance: the EC2 API first, then ``shutdown``. Returns how; raises StopFailedError."""
    try:
        own_id = instance_id()
        ec2().stop_instances(InstanceIds=[own_id])
        return f"stop_instances({own_id})"
    except Exception as exc:
        log.warning(
            "could not stop through the EC2 API (%s: %s); shutting down instead", type(exc).__name__, exc
        )
    if which(shutdown_command[0]) is None:
        raise StopFailedError(f"the EC2 API refused and there is no {shutdown_command[0]!r} here")
    try:
        run(list(shutdown_command))
    except Exception as exc:
        raise StopFailedError(f"{' '.join(shutdown_command)} failed: {exc}") from exc
    return " ".join(shutdown_command)


# --- the agent ---------------------------------------------------------------------------------------------


class IdleAgent:
    """Checks the box every interval and stops it once it has been idle for the whole idle period."""

    def __init__(
        self,
        probes: Probes,
        stop: Callable[[], str],
        *,
        idle_period_s: float = DEFAULT_IDLE_MINUTES * 60,
        stale_after_s: float = STALE_AFTER_S,
        clock: Callable[[], float] = time.time,
        heartbeat: BusyHeartbeat | None = None,
    ) -> None:
        self.probes = probes
        self.stop = stop
        self.heartbeat = heartbeat
        self.stale_after_s = stale_after_s
        self.clock = clock
        self.tracker = IdleTracker(idle_period_s)
        self.stopped_by: str | None = None

    def check(self) -> Decision:
        """One look: observe, decide, and stop the box when the decision says so."""
        observation = observe(self.probes)
        now = self.clock()
        if observation.sessions and self.heartbeat is not None:
            # The alarm and the safety net cannot see logins: tell them (the trainer reports its own jobs).
            self.heartbeat.publish()
        decision = self.tracker.update(busy_reasons(observation, now, self.stale_after_s), now)
        if decision.stop:
            log.info("idle for %.0f s: stopping this instance", decision.idle_for_s)
            self.stopped_by = self.stop()
        elif decision.reasons:
            log.debug("busy: %s", "; ".join(decision.reasons))
        else:
            log.info("idle for %.0f s of %.0f s", decision.idle_for_s, self.tracker.idle_period_s)
        return decision

    def run(
        self,
        *,
        interval_s: float = CHECK_INTERVAL_S,
        sleep: Callable[[float], None] = time.sleep,
        max_checks: int | None = None,
    ) -> str | None:
        """Check every ``interval_s`` until the box is stopped (returns how) or ``max_checks`` ran out."""
        checks = 0
        while max_checks is None or checks < max_checks:
            checks += 1
            if self.check().stop:
                return self.stopped_by
            sleep(interval_s)
        return None


def idle_minutes_from(environ: Mapping[str, str]) -> float:
    """The idle period in minutes from ``TESSERA_IDLE_MINUTES`` (default 5); a bad value says what to set."""
    raw = environ.get(IDLE_MINUTES_ENV, "").strip()
    if not raw:
        return DEFAULT_IDLE_MINUTES
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise ValueError(f"{IDLE_MINUTES_ENV} must be a positive number of minutes, got {raw!r}")
    return minutes


def agent_from_environment(
    environ: Mapping[str, str], *, sqs: Any = None, ec2: Any = None, cloudwatch: Any = None
) -> IdleAgent:
    """The agent the instance runs, configured from its environment (the trainer's environment file)."""
    queue_url = environ.get(QUEUE_URL_ENV)
    if not queue_url:
        raise ValueError(f"{QUEUE_URL_ENV} is not set: the agent cannot see the training queue")
    state_path = Path(environ.get(TRAINER_STATE_ENV) or DEFAULT_TRAINER_STATE)
    endpoint = environ.get("AWS_ENDPOINT_URL") or None

    def client(name: str) -> Any:
        import boto3

        return boto3.client(name, endpoint_url=endpoint)

    sqs_client = sqs or client("sqs")
    probes = Probes(
        queued=lambda: queue_depth(queue_url, sqs_client),
        trainer=lambda: read_trainer_state(state_path),
        sessions=login_sessions,
    )

    def stop() -> str:
        return stop_self(instance_id=imds_instance_id, ec2=lambda: ec2 or client("ec2"))

    own_id = (environ.get(INSTANCE_ID_ENV) or "").strip()
    heartbeat = BusyHeartbeat(
        lambda: own_id or imds_instance_id(), lambda: cloudwatch or _cloudwatch_client(environ)
    )
    return IdleAgent(probes, stop, idle_period_s=idle_minutes_from(environ) * 60, heartbeat=heartbeat)


def main(argv: Iterable[str] | None = None) -> int:
    """Run the agent until it stops the box; exit :data:`EXIT_STOP_REQUESTED` when it could not."""
    del argv  # configured by the environment only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        agent = agent_from_environment(os.environ)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    log.info("idle agent: stopping this box after %.0f idle minutes", agent.tracker.idle_period_s / 60)
    try:
        how = agent.run()
    except StopFailedError as exc:
        log.error("could not stop this box (%s): asking the host to shut it down", exc)
        return EXIT_STOP_REQUESTED
    log.info("stopped by %s", how)
    return 0


if __name__ == "__main__":
    sys.exit(main())
