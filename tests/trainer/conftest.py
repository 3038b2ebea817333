"""Fixtures for the trainer's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny networks run fastest on one thread (and do not fight other processes for the cores).

    A module that trains them asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def local_job_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Queued training jobs read and write local files only under the worker's roots (services/jobs/trust.py):
    the tests' jobs use this test's temporary directory, so it is both roots here."""
    monkeypatch.setenv("TESSERA_LOCAL_ROOT", str(tmp_path))
    monkeypatch.setenv("TESSERA_OUTPUT_ROOT", str(tmp_path))
    return tmp_path
