"""What each rank holds of a TP-global tensor, cut as DTensor's ``Shard`` cuts it (the tests' reference)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splice.parallel.layout import chunk_bounds


def shard(tensor: torch.Tensor, dim: int, tp: int) -> list[torch.Tensor]:
    """The ``tp`` local pieces of ``tensor`` cut along ``dim`` (views)."""
    return [tensor.narrow(dim, a, b - a) for a, b in chunk_bounds(tensor.shape[dim], tp)]


def unshard(pieces: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """The global tensor of a list of local pieces: the inverse of :func:`shard`."""
    return torch.cat(list(pieces), dim)
