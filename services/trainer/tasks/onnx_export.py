"""ONNX export shared by the dcgan, classifier and sky-position tasks: a CPU copy of a network, written with
a dynamic batch axis and tessera metadata, plus the torch outputs ONNX Runtime must reproduce."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from services.trainer.task import ExportCheck

OPSET = 17


def bare(module: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel (or similar) wrapper, or ``module`` itself."""
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, nn.Module) else module


def export_onnx(
    model: nn.Module,
    path: Path,
    inputs: Mapping[str, np.ndarray],
    output_names: Sequence[str],
    *,
    metadata: Mapping[str, str],
    description: str,
    atol: float = 1e-4,
) -> ExportCheck:
    """Write ``model`` (evaluation mode, on CPU) to ``path`` and return the check for ONNX Runtime.

    ``inputs`` (name -> float32 array, batch first) are both the tracing example and the check's inputs;
    every input and output gets a dynamic batch axis ``N``. ``metadata`` lands in ``metadata_props``.
    The trainer's own copy of the network is not touched (export runs on a deep copy).
    """
    network = copy.deepcopy(bare(model)).cpu().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in inputs.values())
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (single-file output, no onnxscript); hush its notice.
        warnings.simplefilter("ignore", DeprecationWarning)
        # Tracing notes Python-side checks (group norm's batch-size guard) that do not affect the graph.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            network,
            tensors,
            str(path),
            input_names=list(inputs),
            output_names=list(output_names),
            dynamic_axes={name: {0: "N"} for name in (*inputs, *output_names)},
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
        outputs = network(*tensors)
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = description
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return ExportCheck(
        path=path,
        inputs={name: np.asarray(a, dtype=np.float32) for name, a in inputs.items()},
        expected={name: out.numpy() for name, out in zip(output_names, outputs, strict=True)},
        atol=atol,
    )
