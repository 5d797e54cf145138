"""What a tensor-parallel load leaves on the model instance (never on a class), and gathering it back.

`ParallelState` lives in the model's ``__dict__`` beside splice's fusion state. It holds the mesh, the
layout, the checkpoint -> TP-global map (resolved, so it inverts), the source checkpoint's file layout,
and what loading read. It implements `splice.loading.DistributedWeights`: ``splice.save_pretrained`` on a
sharded model gathers through it (`gather_state_dict`) and waits for every rank (`finish_save`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from splice.checkpoint import TAG_OF_DTYPE, CheckpointReader
from splice.errors import SpliceError
from splice.fusion import get_state
from splice.loading.distributed import attach_distributed
from splice.transforms import TensorMeta
from splice.weightmap import WeightMap

STATE_ATTR = "_splice_parallel"


@dataclass
class ParallelState:
    mesh: Any  # the tensor-parallel DeviceMesh
    layout: Any  # splice.parallel.sharding.TPLayout
    checkpoint_map: WeightMap  # checkpoint keys -> TP-global keys, every op resolved
    tensors: dict[str, TensorMeta]  # the TP-global tensors the checkpoint fills, in load order
    source: dict[str, Any]  # the source checkpoint's files, keys, metadata
    num_parameters: int = 0  # of the unsharded model, for the index's total_parameters
    bytes_read: int = 0
    sharded_bytes_read: int = 0
    replicated_bytes_read: int = 0
    bytes_mapped: int = 0  # of bytes_read: pieces mapped from the file, paged in on first touch
    replica_hooks: list[Any] = field(default_factory=list)

    @property
    def tp(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank()

    def install(self, model: nn.Module) -> None:
        """Attach to ``model``: `get_parallel_state` finds it, and saving gathers through it."""
        model.__dict__[STATE_ATTR] = self
        attach_distributed(model, self)

    # splice.loading.DistributedWeights: how splice.save_pretrained saves a model loaded tensor-parallel

    def gather_state_dict(self, model: nn.Module, original: bool = True) -> dict[str, torch.Tensor] | None:
        return gather_state_dict(model, original)

    def finish_save(self, error: BaseException | None) -> None:
        finish_save(error)


def finish_save(error: BaseException | None) -> None:
    """Every rank's last step of ``save_pretrained``: all agree on the outcome before any returns.

    Rank 0 writes while the others wait here, so no rank goes on to read the checkpoint before it is in
    place; if any rank failed (rank 0's write, or refusing diverged replicas), the others raise too.
    """
    import torch.distributed as dist

    mine = None if error is None else f"rank {dist.get_rank()}: {type(error).__name__}: {error}"
    outcomes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine)
    failed = [o for o in outcomes if o is not None]
    if failed and error is None:
        raise SpliceError(f"save_pretrained failed on another rank, nothing was written: {failed[0]}")


def get_parallel_state(model: nn.Module) -> ParallelState:
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise SpliceError(
            f"{type(model).__name__} was not loaded tensor-parallel by splice "
            '(splice.from_pretrained(..., tp_plan="auto"))'
        )
    return state


def source_layout(reader: CheckpointReader) -> dict[str, Any]:
    """The checkpoint's files in order, each with its ``__metadata__`` and its keys, and the index metadata."""
    files: dict[str, list[str]] = {path.name: [] for path in reader.files}
    for key in reader.keys():
        files[reader.file_of(key).name].append(key)
    return {
        "files": [
            {"name": name, "metadata": reader.file_metadata(name), "keys": keys}
            for name, keys in files.items()
        ],
        "index_metadata": dict(reader.index_metadata) if reader.index_path else None,
        "tensors": {k: [TAG_OF_DTYPE[m.dtype], list(m.shape)] for k, m in reader.metas().items()},
    }


# --------------------------------------------------------------------------------------------------
# gathering


def gather_state_dict(
    model: nn.Module, original: bool = True, *, grads: bool = False
) -> dict[str, torch.Tensor] | None:
    """The whole state dict (or the gradients) on global rank 0, ``None`` on the other ranks.

    ``original=True`` gives the original checkpoint layout (unfused, unpadded, replicas merged: the
    layout ``splice.original_state_dict`` gives); ``False`` the runtime layout (fused, unpadded).
    Every rank must call it: each sharded tensor is gathered with a collective, one tensor at a time.
    Merging replicas refuses replicas that differ, and unpadding refuses padding that is not zero.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    parallel = get_parallel_state(model)
    writer = dist.get_rank() == 0
    gathered: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor | None] = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, tensor in model.state_dict(keep_vars=True).items():
        if grads:
            if key not in params:
                continue
            tensor = params[key].grad
            if tensor is None:
                raise SpliceError(f"{key} has no gradient; run backward() first")
        if id(tensor) in seen:  # tied: gathered once, on every rank alike (the collectives must pair up)
            if writer:
                gathered[key] = seen[id(tensor)]
            continue
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        seen[id(tensor)] = full.detach().cpu() if writer else None
        if writer:
            gathered[key] = seen[id(tensor)]
        del full
    if not writer:
        return None
    to_original = parallel.layout.rules.invert()
    state = get_state(model)
    if original or state is None or not state.records:
        wm = to_original
        order = state.original_keys if state is not None else list(gathered)
    else:
        wm = to_original.then(state.weight_map())
        order = list(gathered)
    metas = {k: TensorMeta.of(t) for k, t in gathered.items()}
    plan = wm.compile(list(gathered), metas)
    out = dict(plan.run(gathered.pop))
    rank = {k: i for i, k in enumerate(order)}
    return dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))
