"""The demo detector: a small CenterNet-style fully convolutional network in plain torch.

Backbone to stride 16 with a light top-down path back to stride 4; per-class centre heatmap (sigmoid, focal
loss), centre offset and log box size heads. Decoding is part of ``forward`` (3 x 3 max-pool peak picking,
then a fixed top-K), so the exported ONNX graph emits the tessera detector contract directly:
``boxes [N, K, 4]`` (x1, y1, x2, y2 in input pixels, clipped to the input), ``scores [N, K]``,
``labels [N, K]`` (int64). Input is ``[N, 3, H, W]`` float32 scaled x/255, H and W multiples of 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch spelling)
from torch import nn

#: Output stride of the heatmap and regression maps.
STRIDE = 4
#: Detections emitted per image (the K of the contract).
MAX_DETECTIONS = 100
#: Prior probability the heatmap starts from (CenterNet's bias initialisation).
_PRIOR = 0.05
_MAX_LOG_SIZE = 6.0  # exp(6) * 4 px = 1600 px: far beyond any object this model is meant for


@dataclass(frozen=True)
class HeadMaps:
    """Raw outputs: heat logits [N, C, h, w]; regression [N, 4, h, w] (dx, dy, log w, log h) per cell."""

    heat: torch.Tensor
    regression: torch.Tensor


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class CenterNetDetector(nn.Module):
    """Small CenterNet: ``forward`` decodes (boxes, scores, labels); ``heads`` gives the raw maps."""

    def __init__(self, num_classes: int, width: int = 32, max_detections: int = MAX_DETECTIONS) -> None:
        super().__init__()
        w4, w8, w16 = width, width * 3 // 2, width * 2
        self.num_classes = num_classes
        self.max_detections = max_detections
        self.stem = nn.Sequential(_conv(3, 16, 2), _conv(16, w4, 2), _conv(w4, w4))
        self.down8 = nn.Sequential(_conv(w4, w8, 2), _conv(w8, w8), _conv(w8, w8))
        self.down16 = nn.Sequential(_conv(w8, w16, 2), _conv(w16, w16), _conv(w16, w16))
        self.lateral16 = nn.Conv2d(w16, w8, 1)
        self.merge8 = _conv(w8, w8)
        self.lateral8 = nn.Conv2d(w8, w4, 1)
        self.merge4 = _conv(w4, w4)
        self.heat_head = nn.Sequential(_conv(w4, w4), nn.Conv2d(w4, num_classes, 1))
        self.box_head = nn.Sequential(_conv(w4, w4), nn.Conv2d(w4, 4, 1))
        heat_out = self.heat_head[-1]
        assert isinstance(heat_out, nn.Conv2d) and heat_out.bias is not None
        nn.init.constant_(heat_out.bias, -math.log((1 - _PRIOR) / _PRIOR))

    def heads(self, images: torch.Tensor) -> HeadMaps:
        """The raw heat logits and regression maps at stride 4."""
        f4 = self.stem(images)
        f8 = self.down8(f4)
        f16 = self.down16(f8)
        u8 = self.merge8(f8 + F.interpolate(self.lateral16(f16), scale_factor=2.0, mode="nearest"))
        u4 = self.merge4(f4 + F.interpolate(self.lateral8(u8), scale_factor=2.0, mode="nearest"))
        return HeadMaps(self.heat_head(u4), self.box_head(u4))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoded detections: boxes [N, K, 4] (input px), scores [N, K], labels [N, K] int64."""
        maps = self.heads(images)
        return decode(maps, images.shape[-2], images.shape[-1], self.max_detections)


def decode(
    maps: HeadMaps, image_height: int, image_width: int, max_detections: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Peak picking on the heatmap (a peak is its own 3 x 3 maximum), top-K over classes and positions."""
    heat = torch.sigmoid(maps.heat)
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat).to(heat.dtype)
    height, width = heat.shape[-2], heat.shape[-1]
    cells = height * width
    scores, index = torch.topk(peaks.flatten(1), max_detections, dim=1)
    labels = torch.div(index, cells, rounding_mode="floor")
    position = index - labels * cells
    row = torch.div(position, width, rounding_mode="floor")
    col = position - row * width
    regression = torch.gather(maps.regression.flatten(2), 2, position.unsqueeze(1).expand(-1, 4, -1))
    centre_x = (col.to(heat.dtype) + regression[:, 0]) * STRIDE
    centre_y = (row.to(heat.dtype) + regression[:, 1]) * STRIDE
    half_w = torch.exp(regression[:, 2].clamp(max=_MAX_LOG_SIZE)) * (STRIDE / 2)
    half_h = torch.exp(regression[:, 3].clamp(max=_MAX_LOG_SIZE)) * (STRIDE / 2)
    boxes = torch.stack(
        (
            (centre_x - half_w).clamp(0, image_width),
            (centre_y - half_h).clamp(0, image_height),
            (centre_x + half_w).clamp(0, image_width),
            (centre_y + half_h).clamp(0, image_height),
        ),
        dim=-1,
    )
    return boxes, scores, labels


@dataclass(frozen=True)
class Targets:
    """Training targets at stride 4 for a batch: heat [B, C, h, w] (Gaussian peaks), and per object its
    flat cell index (batch-major), offset [M, 2] and log size [M, 2]."""

    heat: torch.Tensor
    cell_index: torch.Tensor
    offset: torch.Tensor
    log_size: torch.Tensor


def encode_targets(
    boxes: list[np.ndarray], labels: list[np.ndarray], num_classes: int, height: int, width: int
) -> Targets:
    """Targets for a batch of images from their boxes (x1, y1, x2, y2 px) and labels."""
    out_h, out_w = height // STRIDE, width // STRIDE
    heat = np.zeros((len(boxes), num_classes, out_h, out_w), np.float32)
    cell_index, offsets, log_sizes = [], [], []
    rows, cols = np.arange(out_h, dtype=np.float32), np.arange(out_w, dtype=np.float32)
    for b, (image_boxes, image_labels) in enumerate(zip(boxes, labels, strict=True)):
        for (x1, y1, x2, y2), label in zip(image_boxes.tolist(), image_labels.tolist(), strict=True):
            w, h = (x2 - x1) / STRIDE, (y2 - y1) / STRIDE
            if w <= 0 or h <= 0:
                continue
            cx, cy = (x1 + x2) / (2 * STRIDE), (y1 + y2) / (2 * STRIDE)
            ix, iy = min(int(cx), out_w - 1), min(int(cy), out_h - 1)
            # Elliptic Gaussian around the centre cell; its width follows the object's (TTFNet-style).
            sigma_x, sigma_y = max(w / 6, 0.5), max(h / 6, 0.5)
            gx = np.exp(-((cols - ix) ** 2) / (2 * sigma_x**2))
            gy = np.exp(-((rows - iy) ** 2) / (2 * sigma_y**2))
            np.maximum(heat[b, label], gy[:, None] * gx[None, :], out=heat[b, label])
            cell_index.append((b * out_h + iy) * out_w + ix)
            offsets.append((cx - ix, cy - iy))
            log_sizes.append((math.log(w), math.log(h)))
    return Targets(
        heat=torch.from_numpy(heat),
        cell_index=torch.tensor(cell_index, dtype=torch.int64),
        offset=torch.tensor(offsets, dtype=torch.float32).reshape(-1, 2),
        log_size=torch.tensor(log_sizes, dtype=torch.float32).reshape(-1, 2),
    )


@dataclass(frozen=True)
class LossParts:
    """The loss and its parts (detached floats for logging)."""

    total: torch.Tensor
    heat: float
    offset: float
    size: float


def detection_loss(maps: HeadMaps, targets: Targets, size_weight: float = 1.0) -> LossParts:
    """CenterNet loss: penalty-reduced focal loss on the heatmap plus L1 on offset and log size at centres."""
    logits = maps.heat
    target = targets.heat
    positive = target.eq(1).to(logits.dtype)
    prob = torch.sigmoid(logits)
    # log-sigmoid forms keep the focal loss finite for saturated logits.
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    pos_loss = -(positive * (1 - prob).pow(2) * log_p).sum()
    neg_loss = -((1 - positive) * (1 - target).pow(4) * prob.pow(2) * log_not_p).sum()
    count = max(float(positive.sum()), 1.0)
    heat_loss = (pos_loss + neg_loss) / count

    if targets.cell_index.numel():
        regression = maps.regression.permute(0, 2, 3, 1).reshape(-1, 4)[targets.cell_index]
        offset_loss = F.l1_loss(regression[:, :2], targets.offset)
        size_loss = F.l1_loss(regression[:, 2:], targets.log_size)
    else:
        offset_loss = size_loss = maps.regression.sum() * 0.0
    total = heat_loss + offset_loss + size_weight * size_loss
    return LossParts(total, float(heat_loss.detach()), float(offset_loss.detach()), float(size_loss.detach()))


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
