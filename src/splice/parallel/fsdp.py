"""Saving a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``), alone or over splice's TP.

``splice.save_pretrained`` gathers through :class:`FullyShardedWeights` (:func:`gather_state_dict`) when the parameters are DTensors that splice
did not shard itself: every rank takes part in gathering one tensor at a time, rank 0 keeps the full
tensors, converts them to the original layout exactly as a single process would, and writes; then
:func:`splice.parallel.state.finish_save` makes every rank wait for the checkpoint and raise if any
rank failed. The files are byte for byte what a single process saving the same weights writes.

For a checkpoint written by every rank at once, without gathering, save the sharded original-layout view
(`splice.parallel.view`) with torch.distributed.checkpoint's ``HuggingFaceStorageWriter``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from splice.fusion.surgery import original_state_dict
from splice.parallel.state import finish_save

__all__ = ["FullyShardedWeights", "finish_save", "gather_state_dict"]


@dataclass
class FullyShardedWeights:
    """`splice.loading.DistributedWeights` for a model sharded by ``fully_shard`` (alone or over splice's TP)."""

    state_dict: dict[str, torch.Tensor] | None = None  # the fused model's, if given to save_pretrained
    num_parameters: int | None = None  # DTensors report their global sizes: counting them is right

    def gather_state_dict(self, model: nn.Module, original: bool = True) -> dict[str, torch.Tensor] | None:
        return gather_state_dict(model, original, state_dict=self.state_dict)

    def finish_save(self, error: BaseException | None) -> None:
        finish_save(error)


def gather_state_dict(
    model: nn.Module, original: bool = True, *, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor] | None:
    """The whole state dict on global rank 0 (original layout unless ``original=False``), ``None`` elsewhere.

    Collective: every rank must call it, with the same keys. ``state_dict`` is the fused model's
    (DTensors, as ``model.state_dict()`` or accelerate's sharded state dict gives them).
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    runtime = model.state_dict() if state_dict is None else state_dict
    writer = dist.get_rank() == 0
    gathered: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    for key, tensor in runtime.items():
        if id(tensor) in seen:  # tied: gathered once (ranks iterate alike, so the collectives pair up)
            if writer:
                gathered[key] = seen[id(tensor)]
            continue
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if writer:
            gathered[key] = seen[id(tensor)] = full.detach().cpu()
        else:
            seen[id(tensor)] = None  # type: ignore[assignment]
        del full
    if not writer:
        return None
    return original_state_dict(model, gathered) if original else gathered
