"""Determinism: networks initialised from the job's seed; every epoch's shuffle and random draws from one
generator seeded by (seed, epoch).

Nothing here leaves torch's global random state changed, so a job resumed at epoch ``e`` draws exactly what an
uninterrupted job drew in epoch ``e``, whatever ran before it in the process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_EPOCH_STRIDE = 1_000_003  # a prime: (seed, epoch) pairs map to distinct generator seeds


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for epoch ``epoch`` of a job seeded ``seed``; ``stream`` separates independent uses."""
    value = (seed * _EPOCH_STRIDE + epoch) * 7919 + stream
    return torch.Generator().manual_seed(value % (2**63 - 1))


def batch_indices(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """A shuffled pass over ``range(count)`` in batches of ``batch_size`` (the last may be smaller)."""
    order = torch.randperm(count, generator=generator)
    for start in range(0, count, batch_size):
        yield order[start : start + batch_size]


def held_out_split(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) indices of ``count`` items: ``round(count * fraction)`` held out, at most
    ``count - 1`` so training always keeps one, chosen by ``seed``; both lists sorted."""
    held = min(count - 1, round(count * fraction)) if count > 0 else 0
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held:]), sorted(order[:held])


def batch_count(count: int, batch_size: int) -> int:
    """How many batches :func:`batch_indices` yields."""
    return math.ceil(count / batch_size)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside: torch's CPU random state seeded with ``seed``; afterwards: the state as it was before.

    Networks are built inside it on the CPU (then moved), so the same seed gives the same weights on any
    device.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
