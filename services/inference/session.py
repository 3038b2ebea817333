"""ONNX Runtime sessions: the CUDA provider when it actually works, the CPU provider otherwise.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` as available even on machines without CUDA; asking for
it there logs an error and silently falls back to the CPU. So the provider is never assumed: the session
is created, and ``session.get_providers()`` says which one runs. With ``providers="auto"`` the fallback's
log noise is muted while the session is created (ONNX Runtime's default logger is process-wide).

CUDA and cuDNN may come from pip packages (``nvidia-*`` wheels: torch's, or ``onnxruntime-gpu[cuda,cudnn]``)
rather than from the system (a CUDA base image): ONNX Runtime's CUDA provider does not find those without
``LD_LIBRARY_PATH``, so before the first session that asks for CUDA, ``onnxruntime.preload_dlls()``
(onnxruntime >= 1.21) loads them once per process. It never runs for ``providers="cpu"``; where the libraries
are missing it costs well under a millisecond, and what it reports is logged, not printed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort

from services.errors import UserError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
Providers = Literal["auto", "cpu", "cuda"]
PROVIDER_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")

#: ONNX Runtime's default logger severity (0 verbose ... 4 fatal); restored after a muted creation.
_DEFAULT_SEVERITY = 2
_log_lock = threading.Lock()
log = logging.getLogger(__name__)
#: ``onnxruntime.preload_dlls`` runs at most once per process (:func:`preload_cuda_libraries`).
_preload_lock = threading.Lock()
_preloaded = threading.Event()
#: The libraries ``preload_dlls`` said it could not load (named in the error when CUDA was required).
_preload_missing: list[str] = []


@dataclass(frozen=True)
class Session:
    """A created session and what it runs on."""

    session: Any  # onnxruntime.InferenceSession
    provider: str  # the execution provider actually in use, e.g. "CPUExecutionProvider"
    name: str  # the model file's stem, or "model" for bytes


def create_session(
    model: str | bytes | Path,
    *,
    providers: str = "auto",
    intra_op_threads: int | None = None,
) -> Session:
    """Open ``model`` (a path or the model's bytes) on the requested provider.

    ``providers``: ``"auto"`` (CUDA when it works, else CPU), ``"cpu"``, or ``"cuda"`` (a UserError when
    CUDA cannot be used here). ``intra_op_threads``: threads for one operator (None: ONNX Runtime's
    default, one per core). Graph optimisations are all on.
    """
    if providers not in PROVIDER_CHOICES:
        raise UserError(f"unknown providers {providers!r}; use one of {', '.join(PROVIDER_CHOICES)}")
    source, name = _model_source(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads is not None:
        if intra_op_threads < 1:
            raise UserError(f"intra_op_threads must be at least 1, got {intra_op_threads}")
        options.intra_op_num_threads = intra_op_threads
    wanted = [CPU] if providers == "cpu" else [CUDA, CPU]
    cuda_listed = CUDA in ort.get_available_providers()
    if providers == "cuda" and not cuda_listed:
        raise UserError(
            "CUDA was requested but this onnxruntime build has no CUDA provider; pass --providers auto "
            "(providers='auto' from Python) to run on the CPU"
        )
    if providers == "auto" and not cuda_listed:
        wanted = [CPU]
    if wanted[0] == CUDA:
        preload_cuda_libraries()
    session = _open(source, name, options, wanted, quiet=wanted[0] == CUDA)
    in_use = session.get_providers()[0]
    if providers == "cuda" and in_use != CUDA:
        missing = f" (not loadable: {', '.join(_preload_missing)})" if _preload_missing else ""
        raise UserError(
            "CUDA was requested but ONNX Runtime could not start its CUDA provider here (no GPU, or "
            f"CUDA/cuDNN libraries missing{missing}); pass --providers auto (providers='auto' from Python) "
            "to fall back to the CPU"
        )
    if wanted[0] == CUDA and in_use != CUDA:
        missing = f" (not loadable: {', '.join(_preload_missing)})" if _preload_missing else ""
        log.info("CUDA provider not usable on this machine%s; %s runs on %s", missing, name, in_use)
    return Session(session=session, provider=in_use, name=name)


def preload_cuda_libraries() -> None:
    """``onnxruntime.preload_dlls()``, once per process: CUDA/cuDNN from pip ``nvidia-*`` packages, found.

    A no-op on onnxruntime < 1.21 (no ``preload_dlls``). Its failures never propagate: the CUDA provider
    then simply does not start (and ``create_session`` says so). ``preload_dlls`` prints the libraries it
    cannot load to stdout: that text is logged at debug level instead (stdout may carry a command's output),
    and its first lines are kept for the error of a ``providers="cuda"`` session that could not use CUDA.
    """
    with _preload_lock:
        if _preloaded.is_set():
            return
        _preloaded.set()
        preload = getattr(ort, "preload_dlls", None)
        if preload is None:
            log.debug(
                "onnxruntime %s has no preload_dlls; CUDA libraries come from the loader's path",
                ort.__version__,
            )
            return
        said = io.StringIO()
        try:
            # redirect_stdout swaps the process-wide sys.stdout for the (sub-millisecond) call.
            with contextlib.redirect_stdout(said), warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                preload()
        except Exception as exc:  # whatever it raises, the CPU provider still works
            log.warning("onnxruntime.preload_dlls() failed: %s", _first_line(exc))
            return
        text = said.getvalue().strip()
        for warning in warned:
            text += f"\n{warning.message}"
        if text.strip():
            log.debug("onnxruntime.preload_dlls(): %s", text.strip())
        _preload_missing[:] = [
            line.split(":", 1)[0].removeprefix("Failed to load ").rsplit("/", 1)[-1]
            for line in text.splitlines()
            if line.startswith("Failed to load ")
        ][:6]


def _model_source(model: str | bytes | Path) -> tuple[str | bytes, str]:
    if isinstance(model, bytes | bytearray):
        return bytes(model), "model"
    path = Path(model)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    return str(path), path.stem


def _open(source: str | bytes, name: str, options: Any, wanted: list[str], *, quiet: bool) -> Any:
    try:
        if not quiet:
            return ort.InferenceSession(source, options, providers=wanted)
        with _log_lock:
            ort.set_default_logger_severity(4)
            try:
                return ort.InferenceSession(source, options, providers=wanted)
            finally:
                ort.set_default_logger_severity(_DEFAULT_SEVERITY)
    except Exception as exc:  # ONNX Runtime raises its own exception types, one per failure kind
        what = name if isinstance(source, bytes) else source
        raise UserError(f"{what} is not a model ONNX Runtime can load: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
