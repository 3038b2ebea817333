"""Fixtures for the inference tests: saved ONNX models (builders in ``onnx_builders``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from onnx_builders import CLASS_NAMES, contract_model, save


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """``make_model(model_proto, name, metadata=None) -> path`` of the saved .onnx file."""

    def _make(model: onnx.ModelProto, name: str = "detector", metadata: dict[str, str] | None = None) -> Path:
        return save(model, tmp_path / f"{name}.onnx", metadata)

    return _make


@pytest.fixture
def contract_path(make_model: Callable[..., Path]) -> Path:
    """A contract detector with class names in its metadata."""
    return make_model(contract_model(), "contract", {"tessera.class_names": json.dumps(CLASS_NAMES)})
