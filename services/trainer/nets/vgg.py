"""A VGG16-style classifier in plain torch: the 13 convolutions of VGG16, each followed by group norm and
ReLU, channel widths scaled by ``width``, and a small head (global average pool + two linear layers).

Layout: 64, 64, M, 128, 128, M, 256 x 3, M, 512 x 3, M, 512 x 3, M (3 x 3 convolutions, M: 2 x 2 max pool),
each width multiplied by ``width`` (at least 1 channel).

Normalisation: plain VGG16 trains poorly from scratch, so each convolution is normalised as in vgg16_bn,
but with GroupNorm rather than BatchNorm: it keeps no running statistics, so the network computes the same
thing in training and in evaluation whatever the batch size. FITS sets are small and the classifier
service sees frames one at a time; with BatchNorm, a short training on a small set evaluated at chance
while its training batches were already classified right (running statistics lagging the weights).

The global pool replaces VGG16's 4096-wide fully connected layers (100M+ parameters) and lets the network
take any input size that is a multiple of 32.

Views: an input may stack ``views`` different pictures of one frame (``in_channels`` channels each; for the
FITS classifier, the binned whole frame and a grid of unbinned star stamps). Each view then has its own
trunk (the 13 convolutions), and the head sees their pooled features side by side: the pictures are not
aligned pixel for pixel, so mixing them in the first convolution would make the network untangle them.
"""

from __future__ import annotations

import torch
from torch import nn

VGG16_LAYOUT: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VggClassifier(nn.Module):
    """Frames ``[N, views * in_channels, H, W]`` -> class logits ``[N, classes]``."""

    def __init__(
        self, classes: int, in_channels: int = 1, width: float = 1.0, head_width: int = 256, views: int = 1
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.features, channels = vgg_trunk(in_channels, width)
        # Views after the first: a trunk each (none for one view, so such models keep their state dicts).
        self.view_features = nn.ModuleList(vgg_trunk(in_channels, width)[0] for _ in range(views - 1))
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * views, head_width),
            nn.ReLU(True),
            nn.Linear(head_width, classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Logits for ``frames``."""
        if not len(self.view_features):
            return self.head(self.features(frames).mean(dim=(2, 3), keepdim=True))
        views = torch.split(frames, self.in_channels, dim=1)
        trunks = [self.features, *self.view_features]
        pooled = [
            trunk(view).mean(dim=(2, 3), keepdim=True) for trunk, view in zip(trunks, views, strict=True)
        ]
        return self.head(torch.cat(pooled, dim=1))


def vgg_trunk(in_channels: int, width: float) -> tuple[nn.Sequential, int]:
    """The 13 convolutions (each with group norm and ReLU) and 5 max pools of :data:`VGG16_LAYOUT`, widths
    scaled by ``width``; and the channels it puts out."""
    layers: list[nn.Module] = []
    channels = in_channels
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = max(1, round(int(item) * width))
        layers += [
            nn.Conv2d(channels, out, 3, padding=1, bias=False),
            nn.GroupNorm(norm_groups(out), out),
            nn.ReLU(True),
        ]
        channels = out
    return nn.Sequential(*layers), channels


def norm_groups(channels: int) -> int:
    """Groups for ``channels``: the largest divisor that is at most 32 and leaves at least 4 channels per
    group (1 below 8 channels; a group per channel would erase each channel's mean brightness)."""
    return max(d for d in range(1, min(32, channels // 4) + 1) if channels % d == 0) if channels >= 8 else 1


def conv_count(model: VggClassifier) -> int:
    """Number of convolutions (13 for the VGG16 layout)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())
