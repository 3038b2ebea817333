"""The sky-position regressor (celnav): a small conv net over the sky image plus an MLP over time features.

Image ``[N, C, S, S]`` (C = 1 or 3, values x/255) -> four stride-2 conv blocks (widths w, 2w, 4w, 8w) ->
adaptive average pool to 4 x 4 (keeps the coarse layout of the sky: where the bright stars sit matters, not
only whether they are there) -> flattened. Time ``[N, k]`` -> Linear(k, 32) + ReLU. Both concatenated ->
Linear -> ReLU -> Linear to three numbers (a, s, c):

- latitude = 90 * tanh(a) degrees: always in (-90, 90), smooth;
- longitude = atan2(s, c) in degrees, (-180, 180]: predicted as a direction on the circle, so 179 deg E and
  179 deg W are neighbours and the dateline is no discontinuity for the loss (tanh * 180 would make the
  network cross the whole range to go from one to the other).

Output ``[N, 2]`` = (lat, lon) in degrees. The loss is :func:`great_circle_km`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from services.celnav.distance import EARTH_RADIUS_KM

_DEGREES = 180.0 / math.pi
_SQUARE_EPS = 1e-12  # keeps sqrt differentiable at zero distance; worth ~6 m


class SkyPositionNet(nn.Module):
    """(image, time features) -> (lat, lon) in degrees."""

    def __init__(self, channels: int = 1, time_features: int = 6, width: int = 16, hidden: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = channels
        for cout in (width, width * 2, width * 4, width * 8):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(True),
            ]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten()]
        self.image = nn.Sequential(*layers)
        self.time = nn.Sequential(nn.Linear(time_features, 32), nn.ReLU(True))
        self.head = nn.Sequential(nn.Linear(cin * 16 + 32, hidden), nn.ReLU(True), nn.Linear(hidden, 3))

    def forward(self, image: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """(lat, lon) degrees ``[N, 2]``."""
        raw = self.head(torch.cat([self.image(image), self.time(time)], dim=1))
        lat = 90.0 * torch.tanh(raw[:, 0])
        lon = torch.atan2(raw[:, 1], raw[:, 2]) * _DEGREES  # not rad2deg: the ONNX exporter lacks it
        return torch.stack([lat, lon], dim=1)


def great_circle_km(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Great-circle distance in km between (lat, lon) degree pairs ``[..., 2]`` on a spherical Earth.

    The haversine distance, computed in its numerically safe form atan2(|u x v|, u . v) over unit vectors:
    accurate at every separation (haversine's asin loses precision near antipodes, the cosine formula near
    zero) and with finite gradients everywhere, zero distance included.
    """
    u, v = _unit_vectors(predicted), _unit_vectors(target)
    cross = torch.linalg.cross(u, v, dim=-1)
    sine = torch.sqrt((cross * cross).sum(dim=-1) + _SQUARE_EPS)
    cosine = (u * v).sum(dim=-1)
    return EARTH_RADIUS_KM * torch.atan2(sine, cosine)


def _unit_vectors(latlon: torch.Tensor) -> torch.Tensor:
    lat, lon = torch.deg2rad(latlon[..., 0]), torch.deg2rad(latlon[..., 1])
    return torch.stack(
        [torch.cos(lat) * torch.cos(lon), torch.cos(lat) * torch.sin(lon), torch.sin(lat)], dim=-1
    )
