"""Train/eval mode switching that leaves the networks as it found them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(*networks: nn.Module) -> Iterator[None]:
    """Inside: ``networks`` in evaluation mode (batch norm uses running statistics and does not update
    them); afterwards: each back in the mode it had, so evaluating mid-training changes nothing."""
    modes = [network.training for network in networks]
    try:
        for network in networks:
            network.eval()
        yield
    finally:
        for network, mode in zip(networks, modes, strict=True):
            network.train(mode)
