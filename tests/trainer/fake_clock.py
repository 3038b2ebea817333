"""A clock the idle agent and the busy heartbeat read instead of the real one: tests move time by hand."""

from __future__ import annotations

MINUTE = 60.0
T0 = 1_800_000_000.0  # a fixed "now" for the fake clock


class FakeClock:
    """``clock()`` is now; ``clock.sleep(s)`` moves now forward without waiting."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
