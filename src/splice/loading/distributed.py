"""The interface between saving and a model whose weights are distributed over ranks.

``splice.save_pretrained`` on such a model is collective: every rank gathers, rank 0 writes, every rank
waits for the outcome. How to gather and how to agree depends on who distributed the weights
(`splice.parallel`'s tensor-parallel loader, or FSDP2), so they implement `DistributedWeights`, and
saving finds the implementation of a model through `distributed_weights` (one documented lookup) rather
than through attributes of other packages' objects.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

ATTR = "_splice_distributed"  # in the model instance's __dict__, never on a class


@runtime_checkable
class DistributedWeights(Protocol):
    """How to save a model whose parameters are spread over the ranks of a process group."""

    num_parameters: int | None  # of the unsharded model (index.json's total_parameters); None: count them

    def gather_state_dict(self, model: nn.Module, original: bool = True) -> dict[str, torch.Tensor] | None:
        """Collective: the whole state dict (original layout unless ``original=False``) on rank 0, else None."""
        ...

    def finish_save(self, error: BaseException | None) -> None:
        """Collective, every rank's last step: wait for rank 0's write; raise if any rank failed."""
        ...


def attach_distributed(model: nn.Module, weights: DistributedWeights) -> None:
    """Declare how ``model``'s distributed weights are saved (the loader that distributed them calls this)."""
    if not isinstance(weights, DistributedWeights):
        raise TypeError(f"{type(weights).__name__} does not implement splice.loading.DistributedWeights")
    model.__dict__[ATTR] = weights


def distributed_weights(model: nn.Module) -> DistributedWeights | None:
    """The `DistributedWeights` a loader attached to ``model``, or None for a model loaded whole."""
    return model.__dict__.get(ATTR)


def num_parameters(model: nn.Module) -> int:
    """The parameter count a checkpoint index records: of the unsharded model, each tied tensor once."""
    weights = distributed_weights(model)
    if weights is not None and weights.num_parameters is not None:
        return weights.num_parameters  # DTensor global sizes would count kv replicas and padding
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()  # a DTensor reports its global size
    return total
