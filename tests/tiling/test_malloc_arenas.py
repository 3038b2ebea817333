"""cap_malloc_arenas: glibc's arenas capped once per process, the user's MALLOC_ARENA_MAX left to win."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from services.tiling import allocator

CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
from services.tiling.allocator import cap_malloc_arenas
print(json.dumps([cap_malloc_arenas(), cap_malloc_arenas()]))
"""


def run_child(env: dict[str, str]) -> list[bool]:
    repo = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(repo=repo)], env=env, capture_output=True, text=True, check=True
    )
    result: list[bool] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the arena cap is glibc's")
def test_the_cap_is_set_once_on_glibc() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert run_child(env) == [True, True]


def test_a_users_malloc_arena_max_wins() -> None:
    env = {**os.environ, "MALLOC_ARENA_MAX": "8"}
    assert run_child(env) == [False, False]


def test_nothing_is_done_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.cap_malloc_arenas() is False
