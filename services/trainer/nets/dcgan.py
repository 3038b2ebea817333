"""The msls-dcgan networks (Radford et al. 2015 layout) at 64 or 128 px, in plain torch.

Generator: a ``nz``-long latent ``[N, nz, 1, 1]`` -> ConvTranspose 4x4 to ``ngf * S/8`` channels at 4 x 4,
then ConvTranspose(4, stride 2) + BatchNorm + ReLU stages halving the channels up to ``ngf`` at S/2, and a
last ConvTranspose to 3 channels + tanh: images in [-1, 1] at S x S. The discriminator mirrors it with
LeakyReLU(0.2) and ends in a 4 x 4 convolution to one logit per image (no sigmoid: the loss is
BCE-with-logits). At 64 px both are exactly msls-dcgan's ``Generator64``/``Discriminator64``; 128 px adds one
stage at the wide end (``ngf * 16``).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

IMAGE_SIZES = (64, 128)


def _stages(image_size: int) -> int:
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image size {image_size} is not one of {IMAGE_SIZES}")
    return int(math.log2(image_size)) - 2  # 4 -> S takes log2(S/4) doublings; the last one makes RGB


class Generator(nn.Module):
    """Latent ``[N, nz, 1, 1]`` -> images ``[N, 3, S, S]`` in [-1, 1]."""

    def __init__(self, image_size: int = 64, nz: int = 100, ngf: int = 64) -> None:
        super().__init__()
        self.image_size, self.nz = image_size, nz
        widths = [ngf * 2**i for i in reversed(range(_stages(image_size)))]  # e.g. 8, 4, 2, 1 x ngf
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(nz, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        ]
        for cin, cout in itertools.pairwise(widths):
            layers += [
                nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(True),
            ]
        layers += [nn.ConvTranspose2d(widths[-1], 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        """Images for ``noise``."""
        return self.main(noise)


class Discriminator(nn.Module):
    """Images ``[N, 3, S, S]`` -> one real/fake logit per image, ``[N]``."""

    def __init__(self, image_size: int = 64, ndf: int = 64) -> None:
        super().__init__()
        widths = [ndf * 2**i for i in range(_stages(image_size))]  # e.g. 1, 2, 4, 8 x ndf
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for cin, cout in itertools.pairwise(widths):
            layers += [
                nn.Conv2d(cin, cout, 4, 2, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False))
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (real > 0) for ``images``."""
        return self.main(images).flatten()


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: convolutions N(0, 0.02), batch-norm scales N(1, 0.02) and zero shifts."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
