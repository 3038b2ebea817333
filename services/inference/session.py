"""ONNX Runtime sessions: the CUDA provider when it actually works, the CPU provider otherwise.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` as available even on machines without CUDA; asking for
it there logs an error and silently falls back to the CPU. So the provider is never assumed: the session
is created, and ``session.get_providers()`` says which one runs. With ``providers="auto"`` the fallback's
log noise is muted while the session is created (ONNX Runtime's default logger is process-wide).
"""

from __future__ import annotations

import logging
import threading
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
    session = _open(source, name, options, wanted, quiet=wanted[0] == CUDA)
    in_use = session.get_providers()[0]
    if providers == "cuda" and in_use != CUDA:
        raise UserError(
            "CUDA was requested but ONNX Runtime could not start its CUDA provider here (no GPU, or "
            "CUDA/cuDNN libraries missing); pass --providers auto (providers='auto' from Python) to fall "
            "back to the CPU"
        )
    if wanted[0] == CUDA and in_use != CUDA:
        log.info("CUDA provider not usable on this machine; %s runs on %s", name, in_use)
    return Session(session=session, provider=in_use, name=name)


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
