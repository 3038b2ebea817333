"""CUDA libraries from pip packages: ``onnxruntime.preload_dlls()`` once before CUDA, never for CPU."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from services.errors import UserError
from services.inference import session as session_mod
from services.inference.detector import OnnxDetector
from services.inference.session import CPU, CUDA, create_session, preload_cuda_libraries

MISSING = (
    "Failed to load libcublasLt.so.13: libcublasLt.so.13: cannot open shared object file: No such file\n"
    "Failed to load libcurand.so.10: libcurand.so.10: cannot open shared object file: No such file\n"
    "Please follow https://onnxruntime.ai/docs/install/#cuda-and-cudnn to install CUDA."
)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A fresh process's preload state; ``onnxruntime.preload_dlls`` replaced by a counter that prints as
    the real one does where the libraries are missing; CUDA listed as available (as onnxruntime-gpu does)."""
    made: list[int] = []

    def fake_preload(
        cuda: bool = True, cudnn: bool = True, msvc: bool = True, directory: object = None
    ) -> None:
        made.append(1)
        print(MISSING)

    monkeypatch.setattr(session_mod, "_preloaded", threading.Event())
    monkeypatch.setattr(session_mod, "_preload_missing", [])
    monkeypatch.setattr(session_mod.ort, "preload_dlls", fake_preload, raising=False)
    monkeypatch.setattr(session_mod.ort, "get_available_providers", lambda: [CUDA, CPU])
    return made


def test_cpu_sessions_never_preload(calls: list[int], contract_path: Path) -> None:
    create_session(contract_path, providers="cpu")
    create_session(contract_path.read_bytes(), providers="cpu")
    OnnxDetector(contract_path, providers="cpu", sessions=2)
    assert calls == []


def test_auto_preloads_once_and_prints_nothing(
    calls: list[int],
    contract_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=session_mod.__name__)
    first = create_session(contract_path, providers="auto")
    create_session(contract_path, providers="auto")
    OnnxDetector(contract_path, providers="auto")
    assert calls == [1]
    assert first.provider in {CPU, CUDA}
    # What preload_dlls printed went to the log, not to stdout (which may carry a command's output).
    assert "Failed to load" not in capsys.readouterr().out
    assert "libcublasLt.so.13" in caplog.text
    assert session_mod._preload_missing == ["libcublasLt.so.13", "libcurand.so.10"]


def test_cuda_error_names_the_missing_libraries(calls: list[int], contract_path: Path) -> None:
    try:
        opened = create_session(contract_path, providers="cuda")
    except UserError as exc:
        assert "libcublasLt.so.13" in str(exc), exc
        assert "--providers auto" in str(exc)
    else:
        pytest.skip(f"CUDA works here ({opened.provider}): nothing is missing")
    assert calls == [1]


def test_a_failing_preload_is_logged_and_the_cpu_still_runs(
    monkeypatch: pytest.MonkeyPatch, contract_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(**_: object) -> None:
        raise OSError("no such directory")

    monkeypatch.setattr(session_mod, "_preloaded", threading.Event())
    monkeypatch.setattr(session_mod.ort, "preload_dlls", broken, raising=False)
    monkeypatch.setattr(session_mod.ort, "get_available_providers", lambda: [CUDA, CPU])
    opened = create_session(contract_path, providers="auto")
    assert opened.provider in {CPU, CUDA}
    assert "preload_dlls() failed: no such directory" in caplog.text


def test_older_onnxruntime_without_preload(monkeypatch: pytest.MonkeyPatch, contract_path: Path) -> None:
    monkeypatch.setattr(session_mod, "_preloaded", threading.Event())
    monkeypatch.delattr(session_mod.ort, "preload_dlls", raising=False)
    assert create_session(contract_path, providers="auto").provider in {CPU, CUDA}


def test_the_real_preload_is_quick_and_quiet(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(session_mod, "_preloaded", threading.Event())
    monkeypatch.setattr(session_mod, "_preload_missing", [])
    started = time.perf_counter()
    preload_cuda_libraries()
    preload_cuda_libraries()
    assert time.perf_counter() - started < 2.0
    assert capsys.readouterr().out == ""
