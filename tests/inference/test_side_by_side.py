"""Batches side by side on sessions that draw them themselves: results in order, errors at their place, the
draw bounded, a slow reader never mistaken for a stuck model, and nothing left running after an early exit."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from services.inference import side_by_side
from services.inference.run_control import ModelStuckError, Run, RunControl
from services.inference.side_by_side import BusyClock, run_side_by_side


def _double(session: Any, batch: int, run: Run) -> tuple[str, int]:
    time.sleep(session)  # the "session" is how long its runs take
    return threading.current_thread().name, 2 * batch


def _run(sessions: list[float], batches: Any, **kwargs: Any) -> Iterator[tuple[str, int]]:
    options: dict[str, Any] = {
        "control": RunControl("m", 5),
        "ahead": 2 * len(sessions),
        "prepare": lambda b: b,
    }
    options.update(kwargs)
    return run_side_by_side(sessions, batches, run_one=_double, **options)


def _counted(n: int, drawn: list[int]) -> Iterator[int]:
    """Batches 0 .. n-1, each noted in ``drawn`` as it is drawn."""
    for i in range(n):
        drawn.append(i)
        yield i


def test_results_come_in_order_and_a_fast_session_takes_more() -> None:
    results = list(_run([0.05, 0.001], iter(range(20))))
    assert [value for _, value in results] == [2 * i for i in range(20)]
    ran = [name for name, _ in results]
    assert ran.count("ort-session_1") > ran.count("ort-session_0")


def test_a_failing_batch_or_draw_fails_at_its_place_after_the_ones_before() -> None:
    def batches() -> Iterator[int]:
        yield from range(5)
        raise OSError("the reader broke")

    taken = []
    with pytest.raises(OSError, match="the reader broke"):
        for _, value in _run([0.001, 0.001], batches()):
            taken.append(value)
    assert taken == [0, 2, 4, 6, 8]

    def refuse(batch: int) -> int:
        if batch == 3:
            raise ValueError("batch 3 has the wrong shape")
        return batch

    taken = []
    with pytest.raises(ValueError, match="batch 3"):
        for _, value in _run([0.001, 0.001], iter(range(8)), prepare=refuse):
            taken.append(value)
    assert taken == [0, 2, 4]


def test_the_draw_stays_within_ahead_of_the_results_taken() -> None:
    drawn: list[int] = []
    results = _run([0.0, 0.0], _counted(50, drawn), ahead=3)
    next(results)
    time.sleep(0.2)  # the sessions are idle by now: they wait for room
    assert len(drawn) <= 1 + 3  # the one taken, and three ahead
    results.close()


def test_a_slow_reader_is_not_a_stuck_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting for the next batch (the tile reader) never counts against the batch timeout."""
    monkeypatch.setattr(side_by_side, "STOP_GRACE_S", 0.05)
    control = RunControl("m", 0.1)
    monkeypatch.setattr(RunControl, "result_wait_s", property(lambda self: 0.15))

    def slow_batches() -> Iterator[int]:
        for i in range(3):
            time.sleep(0.4)  # longer than the wait for a result
            yield i

    assert [v for _, v in _run([0.001], slow_batches(), control=control)] == [0, 2, 4]
    assert not control.stuck
    with pytest.raises(ModelStuckError):  # a run past its limit still is
        list(_run([0.5], iter(range(2)), control=control))


def test_leaving_early_stops_drawing_and_leaves_no_thread() -> None:
    drawn: list[int] = []
    control = RunControl("m", 5)
    earlier = set(threading.enumerate())  # a run given up on in another test may still sleep
    results = _run([0.01, 0.01], _counted(1000, drawn), control=control)
    assert next(results)[1] == 0
    results.close()
    time.sleep(0.1)
    count = len(drawn)
    time.sleep(0.1)
    assert len(drawn) == count < 10
    assert not [t for t in set(threading.enumerate()) - earlier if t.name.startswith("ort-session")]
    assert not control.stuck


def test_busy_clock_counts_time_with_a_run_going_once() -> None:
    busy = BusyClock()
    started = time.perf_counter()
    list(_run([0.05, 0.05], iter(range(6)), busy=busy))
    wall = time.perf_counter() - started
    # Six runs of 50 ms on two sessions side by side: ~0.15 s busy, not the 0.3 s the runs add up to.
    assert 0.14 <= busy.seconds <= wall
    assert busy.seconds < 0.28
