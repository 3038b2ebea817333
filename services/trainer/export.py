"""Export the demo detector to ONNX in the tessera detector contract, and check the export against torch."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from services.trainer.detector_net import CenterNetDetector

INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "labels")
OPSET = 17


def export_detector(
    model: CenterNetDetector,
    path: str | Path,
    class_names: Sequence[str],
    *,
    tile: tuple[int, int] = (512, 512),
    name: str | None = None,
    description: str = "",
) -> Path:
    """Write ``model`` as ONNX: input ``images [N, 3, H, W]`` (dynamic N); outputs boxes, scores, labels.

    Metadata (``metadata_props``): ``tessera.class_names`` (JSON list), ``tessera.input_scale`` ("1/255"),
    ``tessera.tile_size`` ("WxH"), ``tessera.max_detections`` (K), ``tessera.architecture`` and
    ``tessera.name`` (``name``, default: the file name without suffix).
    """
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} classes")
    tile_w, tile_h = tile
    model = model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (single-file output, no onnxscript); hush its notice.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, tile_h, tile_w),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "N"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    metadata = {
        "tessera.class_names": json.dumps(list(class_names)),
        "tessera.input_scale": "1/255",
        "tessera.tile_size": f"{tile_w}x{tile_h}",
        "tessera.max_detections": str(model.max_detections),
        "tessera.architecture": "centernet-stride4",
        "tessera.name": name or path.stem,
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = description or "tessera demo detector (CenterNet-style, trained on synthetic scenes)"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def export_mismatch(
    model: CenterNetDetector, path: str | Path, images: np.ndarray, min_score: float = 0.05
) -> float:
    """Largest difference between torch and ONNX Runtime on ``images`` (float32 [N, 3, H, W], x/255).

    Compares all scores, and the boxes and labels of detections scoring at least ``min_score``; those are
    compared as sorted sets, because top-K may order exactly tied scores differently. Returns inf when the
    two disagree on which detections pass ``min_score`` or on their labels.
    """
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.astype(np.float32)})
    with torch.no_grad():
        t_boxes, t_scores, t_labels = (
            t.numpy() for t in model.eval()(torch.from_numpy(images.astype(np.float32)))
        )
    worst = float(np.abs(np.asarray(scores) - t_scores).max())
    for i in range(images.shape[0]):
        mine = _sorted_detections(boxes[i], scores[i], labels[i], min_score)
        theirs = _sorted_detections(t_boxes[i], t_scores[i], t_labels[i], min_score)
        if mine.shape != theirs.shape or not np.array_equal(mine[:, 0], theirs[:, 0]):
            return float("inf")
        if len(mine):
            worst = max(worst, float(np.abs(mine[:, 1:] - theirs[:, 1:]).max()))
    return worst


def _sorted_detections(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, min_score: float
) -> np.ndarray:
    keep = scores >= min_score
    table = np.column_stack([labels[keep].astype(np.float64), np.round(boxes[keep], 2), scores[keep]])
    order = np.lexsort(table[:, ::-1].T) if len(table) else np.zeros(0, np.int64)
    return table[order]
