"""A detector fed the image's own uint8 pixels: the input scaling folded into the ONNX graph.

The detector contract takes float32 tiles. Converting uint8 pixels to float32 on the CPU writes four bytes
for every byte read — on the measured pipeline that memory traffic cost more than decoding the image
(bench/README.md, "Pipeline floor") — and a GPU would receive four times the bytes it needs. So where the
scaling is affine (``y = (x - low) * scale``, clipped when a range was stated) the model is composed with
a prefix that does it inside ONNX Runtime: ``DequantizeLinear(x, scale, low)`` (ONNX Runtime's vectorised
kernel, in the first operator's pass over the input) and, for a stated range, ``Clip(0, top)``. The
composed model takes ``[N, C, H, W]`` uint8 and computes the same float32 input (multiplication by the
reciprocal, not division: values agree to within one unit in the last place).

Composed models are cached on disk (:func:`cached_fold`, keyed by the model's SHA-256 and the scaling), so
only the first run of a model pays for importing ``onnx`` (~0.4 s) and composing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)
#: Where composed models are kept (default ``$XDG_CACHE_HOME/tessera/native-input``, else ``~/.cache/...``).
CACHE_ENV = "TESSERA_MODEL_CACHE"

#: DequantizeLinear with a scalar scale needs opset 10; Clip with min/max inputs, 11.
MIN_OPSET = 10
MIN_OPSET_CLIP = 11


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def fold_uint8_scaling(
    model: bytes, *, scale: float, zero_point: int, clip_max: float | None
) -> bytes | None:
    """``model`` (ONNX bytes, one float32 input) composed to take uint8: ``(x - zero_point) * scale``,
    clipped to ``[0, clip_max]`` when given, feeds the original input. None when the model's opset is too
    old for the prefix (the caller then converts on the CPU, as before)."""
    import onnx  # ~0.4 s to import: only when a model is composed, not on every start
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load_from_string(model)
    opset = _default_opset(proto)
    if opset < (MIN_OPSET_CLIP if clip_max is not None else MIN_OPSET):
        return None
    graph = proto.graph
    initialised = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialised]
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        return None
    (feed,) = inputs
    scaled = feed.name
    raw = f"{scaled}__uint8"
    feed.name = raw
    feed.type.tensor_type.elem_type = TensorProto.UINT8
    prefix = "tessera_native_input"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{prefix}_scale"),
            numpy_helper.from_array(np.array(zero_point, dtype=np.uint8), f"{prefix}_zero_point"),
        ]
    )
    nodes = []
    if clip_max is None:
        nodes.append(
            helper.make_node(
                "DequantizeLinear", [raw, f"{prefix}_scale", f"{prefix}_zero_point"], [scaled], name=prefix
            )
        )
    else:
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(0.0, dtype=np.float32), f"{prefix}_low"),
                numpy_helper.from_array(np.array(clip_max, dtype=np.float32), f"{prefix}_high"),
            ]
        )
        unclipped = f"{prefix}_unclipped"
        nodes.append(
            helper.make_node(
                "DequantizeLinear", [raw, f"{prefix}_scale", f"{prefix}_zero_point"], [unclipped], name=prefix
            )
        )
        nodes.append(
            helper.make_node(
                "Clip", [unclipped, f"{prefix}_low", f"{prefix}_high"], [scaled], name=f"{prefix}_clip"
            )
        )
    for index, node in enumerate(nodes):
        graph.node.insert(index, node)
    return proto.SerializeToString()


def cache_dir() -> Path:
    """Where composed models are cached: ``$TESSERA_MODEL_CACHE``, else
    ``$XDG_CACHE_HOME/tessera/native-input``, else ``~/.cache/tessera/native-input``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tessera" / "native-input"


def cached_fold(model: bytes, *, scale: float, zero_point: int, clip_max: float | None) -> bytes | None:
    """:func:`fold_uint8_scaling`, kept on disk: the same model and scaling are composed once per machine.
    A cache that cannot be written only costs the composing again next time."""
    key = f"{scale!r}|{zero_point}|{clip_max!r}|{hashlib.sha256(model).hexdigest()}"
    name = hashlib.sha256(key.encode()).hexdigest()[:32]
    folder = cache_dir()
    path, refused = folder / f"{name}.onnx", folder / f"{name}.unfoldable"
    try:
        if path.is_file():
            return path.read_bytes()
        if refused.is_file():
            return None
    except OSError:
        pass
    composed = fold_uint8_scaling(model, scale=scale, zero_point=zero_point, clip_max=clip_max)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if composed is None:
            refused.touch()
        else:
            handle, partial = tempfile.mkstemp(dir=folder, suffix=".partial")
            with os.fdopen(handle, "wb") as out:
                out.write(composed)
            os.replace(partial, path)  # readers see the whole file or none
    except OSError as error:
        log.info("could not cache the composed model in %s: %s", folder, error)
    return composed
