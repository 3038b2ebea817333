"""A model that never returns is stopped: by the batch timeout (the batch fails with a message naming the
setting, and the detector goes on working), by a stop (a worker draining), and, when even ONNX Runtime
cannot stop it, given up on with the process marked as needing a restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx_builders import hanging_model, tiles_of_means

from services.errors import UserError
from services.inference import run_control, side_by_side
from services.inference.detector import OnnxDetector
from services.inference.run_control import (
    BATCH_TIMEOUT_ENV,
    DEFAULT_BATCH_TIMEOUT_S,
    ModelStuckError,
    ModelTimeoutError,
    RunStoppedError,
    batch_timeout_from,
)


@pytest.fixture
def hanging_path(make_model: Callable[..., Path]) -> Path:
    return make_model(hanging_model(), "hanging")


@pytest.fixture
def finishing_path(make_model: Callable[..., Path]) -> Path:
    """The same graph with a loop of three trips: it returns."""
    return make_model(hanging_model(trips=3), "finishing")


@pytest.mark.parametrize("sessions", [1, 2])
def test_a_hung_batch_fails_at_the_timeout_and_the_detector_goes_on(
    hanging_path: Path, sessions: int
) -> None:
    detector = OnnxDetector(
        hanging_path, providers="cpu", batch_size=2, sessions=sessions, batch_timeout_s=0.5
    )
    for _ in range(2):  # a timed-out run leaves its session usable: the next batch is timed out again
        started = time.monotonic()
        with pytest.raises(ModelTimeoutError, match=BATCH_TIMEOUT_ENV) as caught:
            detector.detect(tiles_of_means([0.5, 0.2, 0.3]))
        assert 0.5 <= time.monotonic() - started < 3.0
        assert "model hanging did not finish a batch within 0.5 s" in str(caught.value)
        assert isinstance(caught.value, UserError)  # a region fails with this reason; it is not retried
    assert not detector.stuck
    detector.close()


def test_a_model_that_returns_in_time_is_not_disturbed(finishing_path: Path) -> None:
    detector = OnnxDetector(finishing_path, providers="cpu", batch_size=2, batch_timeout_s=5)
    found = detector.detect(tiles_of_means([0.5, 0.2, 0.3]))
    assert len(found) == 3 and len(found[0]) > 0  # a mean of 0.5 scores over the threshold


def test_the_timeout_comes_from_the_environment(hanging_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert batch_timeout_from(environ={}) == DEFAULT_BATCH_TIMEOUT_S
    assert batch_timeout_from(environ={BATCH_TIMEOUT_ENV: "0"}) is None
    assert batch_timeout_from(environ={BATCH_TIMEOUT_ENV: " 2.5 "}) == 2.5
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(UserError, match=BATCH_TIMEOUT_ENV):
            batch_timeout_from(environ={BATCH_TIMEOUT_ENV: bad})
    monkeypatch.setenv(BATCH_TIMEOUT_ENV, "0.3")
    detector = OnnxDetector(hanging_path, providers="cpu", batch_size=1, sessions=1)
    with pytest.raises(ModelTimeoutError, match=r"within 0\.3 s"):
        detector.detect(tiles_of_means([0.5]))


def test_stop_ends_the_batches_in_flight_and_refuses_new_ones(hanging_path: Path) -> None:
    detector = OnnxDetector(hanging_path, providers="cpu", batch_size=1, sessions=2, batch_timeout_s=0)
    assert detector.control.batch_timeout_s is None
    raised: list[BaseException] = []

    def detect() -> None:
        try:
            detector.detect(tiles_of_means([0.5, 0.2, 0.3, 0.4]))
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=detect)
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive()
    stopped_at = time.monotonic()
    detector.stop("the worker is stopping")
    thread.join(timeout=5)
    assert not thread.is_alive() and time.monotonic() - stopped_at < 3
    assert len(raised) == 1 and isinstance(raised[0], RunStoppedError)
    assert "the worker is stopping" in str(raised[0])
    with pytest.raises(RunStoppedError):
        detector.detect(tiles_of_means([0.5]))
    detector.close()


def test_a_consumer_that_gives_up_stops_the_runs_it_left(hanging_path: Path) -> None:
    """What Ctrl-C does to ``tessera run``: the caller's wait is interrupted, and the runs in flight stop."""
    detector = OnnxDetector(hanging_path, providers="cpu", batch_size=1, sessions=2, batch_timeout_s=0)
    batches = detector.detect_many(tiles_of_means([0.5])[None].repeat(4, axis=0))
    runs_seen: list[Any] = []
    original = detector.control.start

    def start() -> Any:
        run = original()
        runs_seen.append(run)
        return run

    detector.control.start = start  # type: ignore[method-assign]
    raised: list[BaseException] = []

    def consume() -> None:
        try:
            next(batches, None)
        except RunStoppedError as error:
            raised.append(error)

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    # What the generator's finally does when KeyboardInterrupt leaves the consumer.
    detector.control.cancel(runs_seen, "interrupted")
    thread.join(timeout=5)
    assert not thread.is_alive() and time.monotonic() - started < 3
    assert all(run.options.terminate for run in runs_seen) and runs_seen
    assert len(raised) == 1 and "interrupted" in str(raised[0])


class _DeafSession:
    """A session whose run ignores ``terminate`` (a single operator that never returns)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def run(self, names: Any, feed: Any, options: Any) -> Any:
        time.sleep(self.seconds)
        raise RuntimeError("ended")


def test_a_batch_that_cannot_be_stopped_is_given_up_and_marks_the_detector_stuck(
    hanging_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_control, "STOP_GRACE_S", 0.2)
    monkeypatch.setattr(side_by_side, "STOP_GRACE_S", 0.2)
    detector = OnnxDetector(hanging_path, providers="cpu", batch_size=1, sessions=1, batch_timeout_s=0.2)
    detector._sessions = [_DeafSession(2.0)]
    started = time.monotonic()
    with pytest.raises(ModelStuckError, match="did not stop when told") as caught:
        detector.detect(np.zeros((1, 3, 32, 32), np.float32))
    assert time.monotonic() - started < 1.5
    assert isinstance(caught.value, ModelTimeoutError)
    assert detector.stuck
    closing = time.monotonic()
    detector.close()  # does not wait for the lost thread
    assert time.monotonic() - closing < 0.5


def _watchdogs(model: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"batch-timeout-{model}"]


def test_one_watchdog_keeps_every_batchs_timeout_and_ends_when_the_model_is_idle(
    finishing_path: Path, hanging_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timeouts cost no thread per batch: one watchdog per model, gone after a quiet spell, back with the
    next batch — and a batch that hangs after many that returned is still stopped at its timeout."""
    monkeypatch.setattr(run_control, "WATCHDOG_LINGER_S", 0.3)
    detector = OnnxDetector(finishing_path, providers="cpu", batch_size=1, sessions=2, batch_timeout_s=0.8)
    earlier = {t.ident for t in _watchdogs(detector.name)}  # other tests' models of the same name
    threads_before = threading.active_count()
    seen: set[int | None] = set()
    tiles = tiles_of_means([0.5, 0.2, 0.3, 0.4])
    for found in detector.detect_many(tiles[i % 4][None] for i in range(40)):
        assert len(found) == 1
        seen.update(t.ident for t in _watchdogs(detector.name) if t.ident not in earlier)
    assert len(seen) == 1  # the same watchdog for all 40 batches
    assert threading.active_count() <= threads_before + 3  # two session threads and the watchdog
    deadline = time.monotonic() + 4  # it ends a timeout and a linger after the last batch
    while seen & {t.ident for t in _watchdogs(detector.name)} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not seen & {t.ident for t in _watchdogs(detector.name)}  # ended once no batch was left to watch
    detector.close()

    hanging = OnnxDetector(hanging_path, providers="cpu", batch_size=1, sessions=1, batch_timeout_s=0.4)
    for _ in range(2):  # after the watchdog ended, a later batch is timed out again
        started = time.monotonic()
        with pytest.raises(ModelTimeoutError):
            hanging.detect(tiles_of_means([0.5]))
        assert 0.4 <= time.monotonic() - started < 2.5
        time.sleep(0.6)  # past the linger: the watchdog ends, and the next batch starts another
    hanging.close()
