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

    Compares the detections scoring at least ``min_score``: each one of either side must have a detection of
    the same label on the other side (scoring at least ``min_score`` less a rounding margin, so a detection
    right at the cut, kept by one and dropped by the other for a difference in the last float bits, is no
    disagreement), matched to the nearest box; the difference is the larger of the box's and the score's.
    The sides may order tied scores differently. Returns inf when a detection has no counterpart.
    """
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.astype(np.float32)})
    with torch.no_grad():
        t_boxes, t_scores, t_labels = (
            t.numpy() for t in model.eval()(torch.from_numpy(images.astype(np.float32)))
        )
    worst = 0.0
    for i in range(images.shape[0]):
        ours = (np.asarray(boxes[i]), np.asarray(scores[i]), np.asarray(labels[i]))
        theirs = (t_boxes[i], t_scores[i], t_labels[i])
        for a, b in ((ours, theirs), (theirs, ours)):
            gap = _unmatched_gap(a, b, min_score)
            if gap == float("inf"):
                return gap
            worst = max(worst, gap)
    return worst


#: Scores this close to the cut may fall on either side of it in torch and in ONNX Runtime.
_CUT_MARGIN = 1e-4


def _unmatched_gap(
    a: tuple[np.ndarray, np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray, np.ndarray],
    min_score: float,
) -> float:
    """For each detection of ``a`` scoring at least ``min_score``, the box difference to the nearest
    detection of ``b`` with its label scoring at least ``min_score - margin``; the largest (inf: none).

    A detection whose score is shared (to the margin) by more than its counterpart is left out: on a flat
    heat-map plateau neighbouring pixels tie, and which of them is a peak is decided by the last float bits
    (an untrained network makes such plateaus; the sorted scores are still compared by the caller).
    """
    a_boxes, a_scores, a_labels = a
    b_boxes, b_scores, b_labels = b
    loose = b_scores >= min_score - _CUT_MARGIN
    every = np.concatenate([a_scores, b_scores])
    worst = 0.0
    for box, score, label in zip(a_boxes, a_scores, a_labels, strict=True):
        if score < min_score or np.count_nonzero(np.abs(every - score) < _CUT_MARGIN) > 2:
            continue
        chosen = loose & (b_labels == label)
        if not chosen.any():
            return float("inf")
        gaps = np.maximum(np.abs(b_boxes[chosen] - box).max(axis=1), np.abs(b_scores[chosen] - score))
        worst = max(worst, float(gaps.min()))
    return worst
