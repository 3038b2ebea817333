"""Shared fixtures: the offline Pulumi runner (fresh mocks and event loop per call)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from stacks.offline import OfflineRun, run_offline

Program = Callable[[], Mapping[str, Any] | None]


@pytest.fixture
def offline() -> Callable[..., OfflineRun]:
    """Run a Pulumi program under mocks (``preview=False``) and get back every declared resource.

    Usage: ``run = offline(lambda: {"url": Queues("q", QueuesArgs()).urls["image-requests"]})``.
    Keyword arguments go to :func:`stacks.offline.run_offline` (``config=``, ``stack=``, ``stack_outputs=``).
    """

    def _run(program: Program, **kwargs: Any) -> OfflineRun:
        return run_offline(program, **kwargs)

    return _run
