"""The training box's idle agent: idle is no queued job, no running job and no login, for the whole period."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from fake_clock import MINUTE, T0, FakeClock

from services.trainer import idle
from services.trainer.idle import (
    IdleAgent,
    IdleTracker,
    Observation,
    Probes,
    StopFailedError,
    TrainerState,
    busy_reasons,
    read_trainer_state,
    write_trainer_state,
)

REGION = "us-east-1"


def _idle() -> Observation:
    return Observation(queued=0, trainer=None, sessions=0)


# --- the decision -------------------------------------------------------------------------------------------


def test_nothing_queued_running_or_logged_in_is_idle() -> None:
    assert busy_reasons(_idle(), T0) == []
    done = TrainerState(busy=False, job_id="j1", updated=T0 - 5)
    assert busy_reasons(Observation(queued=0, trainer=done, sessions=0), T0) == []


@pytest.mark.parametrize(
    ("observation", "expected"),
    [
        (Observation(queued=2, trainer=None, sessions=0), "2 training job(s) queued"),
        (
            Observation(queued=0, trainer=TrainerState(True, "ships-1", T0 - 30), sessions=0),
            "trainer busy with job ships-1",
        ),
        (Observation(queued=0, trainer=None, sessions=1), "1 login session(s) open"),
        (Observation(queued=None, trainer=None, sessions=0, errors={"queue": "denied"}), "queue unknown"),
        (Observation(queued=0, trainer=None, sessions=None), "login sessions unknown"),
    ],
)
def test_each_sign_of_use_keeps_the_box_up(observation: Observation, expected: str) -> None:
    reasons = busy_reasons(observation, T0)
    assert len(reasons) == 1
    assert reasons[0].startswith(expected)


def test_a_busy_state_file_gone_stale_means_the_trainer_died() -> None:
    fresh = TrainerState(busy=True, job_id="j", updated=T0 - 9 * MINUTE)
    stale = TrainerState(busy=True, job_id="j", updated=T0 - 11 * MINUTE)
    assert busy_reasons(Observation(queued=0, trainer=fresh, sessions=0), T0)
    assert busy_reasons(Observation(queued=0, trainer=stale, sessions=0), T0) == []


def test_tracker_stops_only_after_a_full_unbroken_idle_period() -> None:
    tracker = IdleTracker(idle_period_s=5 * MINUTE)
    decisions = [tracker.update([], T0 + m * MINUTE) for m in range(5)]
    assert not any(d.stop for d in decisions)
    assert decisions[-1].idle_for_s == 4 * MINUTE
    assert tracker.update(["1 login session(s) open"], T0 + 5 * MINUTE).stop is False
    # The break starts the count again: five more idle minutes are needed.
    later = [tracker.update([], T0 + m * MINUTE) for m in range(6, 12)]
    assert [d.stop for d in later] == [False] * 5 + [True]
    assert later[-1].idle_for_s == 5 * MINUTE


def test_tracker_refuses_a_period_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        IdleTracker(idle_period_s=0)


# --- the agent loop with a fake clock -----------------------------------------------------------------------


def test_agent_stops_the_box_once_idle_for_the_period_and_a_login_resets_the_count() -> None:
    clock = FakeClock()
    sessions = {T0 + 2 * MINUTE: 1}  # someone logs in during minute 2 only
    stops: list[float] = []

    def stop() -> str:
        stops.append(clock.now)
        return "fake stop"

    probes = Probes(queued=lambda: 0, trainer=lambda: None, sessions=lambda: sessions.get(clock.now, 0))
    agent = IdleAgent(probes, stop, idle_period_s=5 * MINUTE, clock=clock)
    how = agent.run(interval_s=MINUTE, sleep=clock.sleep, max_checks=20)
    assert how == "fake stop"
    assert stops == [T0 + 8 * MINUTE]  # idle from minute 3, five minutes later


def test_agent_never_stops_a_box_whose_trainer_keeps_reporting_busy() -> None:
    clock = FakeClock()
    stopped: list[str] = []
    probes = Probes(
        queued=lambda: 0,
        trainer=lambda: TrainerState(busy=True, job_id="long-job", updated=clock.now - 20),
        sessions=lambda: 0,
    )

    def stop() -> str:
        stopped.append("x")
        return "x"

    agent = IdleAgent(probes, stop, idle_period_s=5 * MINUTE, clock=clock)
    assert agent.run(interval_s=MINUTE, sleep=clock.sleep, max_checks=30) is None
    assert stopped == []


def test_a_probe_that_fails_counts_as_busy_not_idle() -> None:
    clock = FakeClock()

    def broken() -> int:
        raise ConnectionError("sqs unreachable")

    agent = IdleAgent(
        Probes(queued=broken, trainer=lambda: None, sessions=lambda: 0),
        lambda: pytest.fail("must not stop"),
        idle_period_s=MINUTE,
        clock=clock,
    )
    for _ in range(5):
        decision = agent.check()
        clock.sleep(MINUTE)
    assert decision.stop is False
    assert "sqs unreachable" in decision.reasons[0]


# --- the trainer's state file -------------------------------------------------------------------------------


def test_state_file_round_trip_and_absence(tmp_path: Path) -> None:
    path = tmp_path / "run" / "trainer-state.json"
    assert read_trainer_state(path) is None
    write_trainer_state(path, busy=True, job_id="ships-1", now=T0)
    assert read_trainer_state(path) == TrainerState(busy=True, job_id="ships-1", updated=T0)
    assert json.loads(path.read_text())["updated"].startswith("2027-01-15T08:00:00")
    assert [p.name for p in path.parent.iterdir()] == ["trainer-state.json"]  # no temporary left behind


def test_state_file_accepts_epoch_seconds_and_naive_iso_times(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"busy": False, "job_id": None, "updated": T0}))
    assert read_trainer_state(path) == TrainerState(False, None, T0)
    path.write_text(json.dumps({"busy": True, "job_id": 7, "updated": "2027-01-15T08:00:00"}))
    assert read_trainer_state(path) == TrainerState(True, "7", T0)


def test_an_unreadable_state_file_is_reported_and_keeps_the_box_up(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"busy": "yes"}')
    with pytest.raises(ValueError, match="boolean 'busy'"):
        read_trainer_state(path)
    observation = idle.observe(Probes(lambda: 0, lambda: read_trainer_state(path), lambda: 0))
    assert "trainer state" in observation.errors
    assert busy_reasons(observation, T0)


# --- login probes over a fake /proc -------------------------------------------------------------------------

_TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
)


def _tcp_line(local: str, remote: str, state: str) -> str:
    return f"   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000     0        0 1 1\n"


def test_ssh_connections_counts_established_connections_to_port_22_only(tmp_path: Path) -> None:
    net = tmp_path / "net"
    net.mkdir()
    (net / "tcp").write_text(
        _TCP_HEADER
        + _tcp_line("00000000:0016", "00000000:0000", "0A")  # sshd listening
        + _tcp_line("0A000105:0016", "0A000009:D431", "01")  # a session from the jump host
        + _tcp_line("0A000105:9C40", "0A000009:0016", "01")  # this box ssh-ing out: not a login
        + _tcp_line("0A000105:0016", "0A000009:D432", "06")  # a closed session in TIME_WAIT
    )
    (net / "tcp6").write_text(
        _TCP_HEADER + _tcp_line("00000000000000000000000001000000:0016", "0000000000000000:E000", "01")
    )
    assert idle.ssh_connections(net) == 2
    (net / "tcp6").unlink()
    assert idle.ssh_connections(net) == 1


def test_session_manager_sessions_are_logins_too(tmp_path: Path) -> None:
    for pid, comm in [("1", "systemd"), ("412", "ssm-session-worker"), ("413", "bash"), ("90", "sshd")]:
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "comm").write_text(comm + "\n")
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(_TCP_HEADER + _tcp_line("0A000105:0016", "0A000009:D431", "01"))
    assert idle.session_workers(tmp_path) == 1
    assert idle.login_sessions(tmp_path) == 2


# --- AWS: the queue, the instance id, the stop --------------------------------------------------------------


@pytest.mark.usefixtures("mocked_aws")
def test_queue_depth_counts_waiting_and_in_flight_jobs() -> None:
    sqs = boto3.client("sqs", region_name=REGION)
    url = sqs.create_queue(QueueName="training-jobs")["QueueUrl"]
    assert idle.queue_depth(url, sqs) == 0
    sqs.send_message(QueueUrl=url, MessageBody="{}")
    sqs.send_message(QueueUrl=url, MessageBody="{}")
    assert idle.queue_depth(url, sqs) == 2
    (taken,) = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=300)["Messages"]
    assert idle.queue_depth(url, sqs) == 2  # one waiting, one being trained on
    sqs.delete_message(QueueUrl=url, ReceiptHandle=taken["ReceiptHandle"])
    assert idle.queue_depth(url, sqs) == 1


def _running_instance(ec2: Any) -> str:
    launched = ec2.run_instances(ImageId="ami-0123456789abcdef0", MinCount=1, MaxCount=1)
    return str(launched["Instances"][0]["InstanceId"])


def _state(ec2: Any, instance_id: str) -> str:
    return str(
        ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]
    )


@pytest.mark.usefixtures("mocked_aws")
def test_stop_self_stops_its_own_instance_through_the_api() -> None:
    ec2 = boto3.client("ec2", region_name=REGION)
    own, other = _running_instance(ec2), _running_instance(ec2)
    how = idle.stop_self(
        instance_id=lambda: own, ec2=lambda: ec2, run=lambda c: pytest.fail("no shutdown expected")
    )
    assert how == f"stop_instances({own})"
    assert _state(ec2, own) in ("stopping", "stopped")
    assert _state(ec2, other) == "running"


def test_stop_self_falls_back_to_shutdown_and_then_asks_the_host() -> None:
    def no_imds() -> str:
        raise OSError("IMDS unreachable")

    ran: list[list[str]] = []
    how = idle.stop_self(
        instance_id=no_imds, ec2=lambda: None, run=lambda c: ran.append(list(c)), which=lambda n: f"/sbin/{n}"
    )
    assert how == "shutdown -h now"
    assert ran == [["shutdown", "-h", "now"]]
    with pytest.raises(StopFailedError, match="no 'shutdown'"):
        idle.stop_self(instance_id=no_imds, ec2=lambda: None, run=lambda c: None, which=lambda n: None)


def test_main_asks_the_host_to_shut_down_when_it_cannot_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_stop() -> str:
        raise StopFailedError("refused")

    agent = IdleAgent(
        Probes(lambda: 0, lambda: None, lambda: 0), failing_stop, idle_period_s=MINUTE, clock=lambda: T0
    )
    agent.tracker.idle_since = T0 - 2 * MINUTE  # idle long enough already: the first check stops
    monkeypatch.setattr(idle, "agent_from_environment", lambda environ: agent)
    assert idle.main([]) == idle.EXIT_STOP_REQUESTED


def test_instance_id_comes_from_imdsv2_with_a_session_token() -> None:
    seen: list[tuple[str, str, str | None]] = []

    class FakeImds(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            seen.append(("PUT", self.path, self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")))
            self._reply(b"session-token")

        def do_GET(self) -> None:
            seen.append(("GET", self.path, self.headers.get("X-aws-ec2-metadata-token")))
            if self.headers.get("X-aws-ec2-metadata-token") == "session-token":
                self._reply(b"i-0abc123\n")
            else:
                self._reply(b"", 401)

        def _reply(self, body: bytes, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeImds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert idle.imds_instance_id(f"http://127.0.0.1:{server.server_port}") == "i-0abc123"
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [
        ("PUT", "/latest/api/token", "300"),
        ("GET", "/latest/meta-data/instance-id", "session-token"),
    ]


# --- configuration ------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("mocked_aws")
def test_configuration_from_the_environment(tmp_path: Path) -> None:
    assert idle.idle_minutes_from({}) == 5
    assert idle.idle_minutes_from({"TESSERA_IDLE_MINUTES": "12.5"}) == 12.5
    for bad in ("0", "-3", "soon"):
        with pytest.raises(ValueError, match="TESSERA_IDLE_MINUTES"):
            idle.idle_minutes_from({"TESSERA_IDLE_MINUTES": bad})
    with pytest.raises(ValueError, match="TESSERA_QUEUE_TRAINING_JOBS_URL"):
        idle.agent_from_environment({})

    sqs = boto3.client("sqs", region_name=REGION)
    url = sqs.create_queue(QueueName="training-jobs")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="{}")
    state = tmp_path / "trainer-state.json"
    write_trainer_state(state, busy=False, job_id=None)
    agent = idle.agent_from_environment(
        {
            "TESSERA_QUEUE_TRAINING_JOBS_URL": url,
            "TESSERA_IDLE_MINUTES": "7",
            "TESSERA_TRAINER_STATE": str(state),
        },
        sqs=sqs,
    )
    assert agent.tracker.idle_period_s == 7 * MINUTE
    assert agent.probes.queued() == 1
    assert agent.probes.trainer() is not None


def test_the_unit_text_runs_the_agent_module_and_shuts_down_on_its_exit_code() -> None:
    assert "ExecStart=/usr/local/bin/tessera-idle-agent" in idle.SYSTEMD_UNIT
    assert "-m services.trainer.idle" in idle.WRAPPER_SCRIPT
    assert f'"$status" -eq {idle.EXIT_STOP_REQUESTED}' in idle.WRAPPER_SCRIPT
    assert "/run/tessera:/run/tessera:ro" in idle.WRAPPER_SCRIPT
    assert str(idle.DEFAULT_TRAINER_STATE).startswith("/run/tessera/")
