"""Stopping a model run that takes too long, or that its caller no longer wants.

ONNX Runtime cannot be interrupted from Python (a run holds its thread until it returns, and Ctrl-C waits
for it), but a run given an ``onnxruntime.RunOptions`` stops between two operators — loops included — once
another thread sets ``terminate`` on it. :class:`RunControl` hands every batch its own options and

- **times it out**: past ``batch_timeout_s`` (``TESSERA_BATCH_TIMEOUT_S``, default
  :data:`DEFAULT_BATCH_TIMEOUT_S`; ``0`` turns it off) the run is told to stop and the batch fails with
  :class:`ModelTimeoutError`, a :class:`~services.errors.UserError` that names the setting;
- **stops it on request**: :meth:`RunControl.stop` (a worker draining before its grace period ends) tells
  every batch in flight to stop, and they, and any batch started later, fail with :class:`RunStoppedError`;
  :meth:`RunControl.cancel` does the same for chosen runs (the caller gave up on them: Ctrl-C, an error).

A single operator that never returns is not stopped by ``terminate``: the caller waits
:data:`STOP_GRACE_S` more, then gives up on the run with :class:`ModelStuckError` and :attr:`RunControl.stuck`
says the process holds a thread it cannot get back (a worker exits so that it is restarted).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import onnxruntime as ort

from services.errors import UserError

BATCH_TIMEOUT_ENV = "TESSERA_BATCH_TIMEOUT_S"
#: A batch of a detector takes well under a second on a GPU and a few seconds on a CPU; two minutes is a
#: model that hangs (or one far too slow to serve), not a slow batch.
DEFAULT_BATCH_TIMEOUT_S = 120.0
#: How long a run told to stop may take to return before it is given up as stuck.
STOP_GRACE_S = 10.0
#: ONNX Runtime logs a terminated run as an error; the exception raised here says it better.
_QUIET = 4
#: How long the watchdog thread waits for a next run before it ends (a later run starts another).
WATCHDOG_LINGER_S = 5.0


class ModelTimeoutError(UserError):
    """A batch ran past the batch timeout: the model hangs, or is too slow for the timeout."""


class ModelStuckError(ModelTimeoutError):
    """A batch ran past the batch timeout and did not stop when told: its thread is lost to this process."""


class RunStoppedError(Exception):
    """The batch was stopped on request (the worker is stopping, or the caller gave up on it)."""


def batch_timeout_from(value: float | None = None, environ: Mapping[str, str] | None = None) -> float | None:
    """``value``, else ``TESSERA_BATCH_TIMEOUT_S``, else the default; ``None`` when that is 0 (no timeout).
    A negative or non-numeric setting is a UserError naming the variable."""
    if value is None:
        text = (os.environ if environ is None else environ).get(BATCH_TIMEOUT_ENV, "").strip()
        try:
            value = float(text) if text else DEFAULT_BATCH_TIMEOUT_S
        except ValueError:
            raise UserError(
                f"{BATCH_TIMEOUT_ENV} must be a number of seconds (0: no timeout), got {text!r}"
            ) from None
    if not value >= 0:
        raise UserError(f"{BATCH_TIMEOUT_ENV} must be 0 (no timeout) or more, got {value}")
    return float(value) or None


@dataclass(eq=False)
class Run:
    """One batch's run: its options, and why it was told to stop (if it was)."""

    options: Any = field(default_factory=ort.RunOptions)
    timed_out: bool = False
    stop_reason: str | None = None
    #: ``time.monotonic()`` past which the run is told to stop (None: no timeout).
    deadline: float | None = None

    def __post_init__(self) -> None:
        self.options.log_severity_level = _QUIET


class RunControl:
    """Time-outs and stops for one model's runs (see the module docstring); thread-safe.

    One watchdog thread per control keeps the time-outs, started with the first run and ended after
    :data:`WATCHDOG_LINGER_S` without one: a thread (or a timer) per batch would cost a thread start per
    batch — hundreds a second with a light model — and the dispatching thread waits for each to start.
    Every run has the same timeout, so deadlines come in the order the runs start: the watchdog only ever
    waits for the oldest run's deadline, and is not woken as runs start and finish (only when it waits
    for none); at that deadline it skips the runs that finished. It therefore ends about
    ``batch_timeout_s + WATCHDOG_LINGER_S`` after the last run.
    """

    def __init__(self, model: str, batch_timeout_s: float | None = None) -> None:
        self.model = model
        self.batch_timeout_s = batch_timeout_from(batch_timeout_s)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running: set[Run] = set()
        # Runs with a deadline, oldest first; the finished ones at the front are dropped as they finish.
        self._deadlines: deque[Run] = deque()
        self._watchdog: threading.Thread | None = None
        self._lingering = False  # the watchdog waits with no deadline to keep
        self._stop_reason: str | None = None
        #: True once a run was given up on: a thread still runs it, and the process should be restarted.
        self.stuck = False

    @property
    def result_wait_s(self) -> float | None:
        """How long a caller waits for a batch's result before giving the run up as stuck."""
        return None if self.batch_timeout_s is None else self.batch_timeout_s + STOP_GRACE_S

    def start(self) -> Run:
        """A new run's options, its timeout armed; :class:`RunStoppedError` once :meth:`stop` was called."""
        run = Run()
        with self._lock:
            if self._stop_reason is not None:
                raise RunStoppedError(self._stop_reason)
            self._running.add(run)
            if self.batch_timeout_s is not None:
                run.deadline = time.monotonic() + self.batch_timeout_s
                self._deadlines.append(run)
                if self._watchdog is None:
                    self._watchdog = threading.Thread(
                        target=self._watch, name=f"batch-timeout-{self.model}", daemon=True
                    )
                    self._watchdog.start()
                elif self._lingering:
                    self._wake.notify()  # it waits for no deadline: this run's is the next
        return run

    def finish(self, run: Run, error: BaseException | None) -> None:
        """Disarm ``run``; when it raised ``error`` because it was told to stop, raise what says why."""
        with self._lock:
            self._running.discard(run)
            self._drop_finished()  # the watchdog is not woken: it finds the run gone at that deadline
        if error is None:
            return
        if run.timed_out:
            raise ModelTimeoutError(self.timeout_message()) from error
        if run.stop_reason is not None:
            raise RunStoppedError(run.stop_reason) from error

    def timeout_message(self, *, stuck: bool = False) -> str:
        """What a timed-out batch says: the model, the limit, and the setting that changes it."""
        what = "and did not stop when told (a thread is lost; the process must be restarted)" if stuck else ""
        return (
            f"model {self.model} did not finish a batch within {self.batch_timeout_s:g} s {what}".rstrip()
            + f"; it hangs, or it is too slow for this limit: set {BATCH_TIMEOUT_ENV} to more seconds "
            f"(0: no limit)"
        )

    def gave_up(self) -> ModelStuckError:
        """The error for a run that outlived its timeout and the stop grace; marks the process stuck."""
        self.stuck = True
        return ModelStuckError(self.timeout_message(stuck=True))

    def cancel(self, runs: Iterable[Run], reason: str) -> None:
        """Tell ``runs`` to stop (between two operators), each failing with :class:`RunStoppedError`."""
        for run in runs:
            run.stop_reason = run.stop_reason or reason
            run.options.terminate = True

    def stop(self, reason: str) -> None:
        """Tell every run in flight to stop, and refuse new ones, with ``reason``."""
        with self._lock:
            self._stop_reason = reason
            running = list(self._running)
        self.cancel(running, reason)

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop_reason is not None

    def _drop_finished(self) -> None:
        """Forget the finished runs at the front of the deadlines (the lock held)."""
        while self._deadlines and self._deadlines[0] not in self._running:
            self._deadlines.popleft()

    def _watch(self) -> None:
        """The watchdog: tell the oldest run to stop once past its deadline; end after a quiet linger."""
        with self._lock:
            while True:
                self._drop_finished()
                if not self._deadlines:
                    self._lingering = True
                    woken = self._wake.wait(WATCHDOG_LINGER_S)
                    self._lingering = False
                    if not woken and not self._deadlines:
                        self._watchdog = None
                        return
                    continue
                oldest = self._deadlines[0]
                assert oldest.deadline is not None
                left = oldest.deadline - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                self._deadlines.popleft()
                oldest.timed_out = True
                oldest.options.terminate = True
