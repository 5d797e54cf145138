"""``splice.parallel.save_shards``: each rank writes its own tensors; rank 0 writes what it takes to rebuild.

A shards directory holds::

    rank-00000-of-00002.safetensors     rank 0's pieces of the sharded tensors, and the replicated ones
    rank-00001-of-00002.safetensors     rank 1's pieces
    splice-parallel.json                the metadata (below)
    config.json, generation_config.json the model's configs, as save_pretrained writes them

``splice-parallel.json`` says, with no model code needed to read it:

- ``tensors``: every TP-global tensor, its dtype, global shape, cut dim and each rank's bounds;
- ``weight_map``: the checkpoint -> TP-global map, every op resolved (transformers' renames, the fusion
  undone, parts padded or replicated, fused parts interleaved per rank); its inverse rebuilds the
  original checkpoint;
- ``layout``: per column group the parts, their padding and replication (for people, and for LoRA);
- ``fusion_config`` and ``tp_plan``;
- ``source``: the source checkpoint's files, their keys and metadata and the index metadata, so the
  rebuilt checkpoint has the same split, bit for bit.

The directory is built in a staging directory beside it and swapped in atomically by rank 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.checkpoint import TAG_OF_DTYPE, CheckpointWriter, atomic
from splice.errors import CheckpointError
from splice.fusion.surgery import get_state
from splice.loading.resolve import save_configs
from splice.parallel.layout import chunk_bounds
from splice.parallel.state import get_parallel_state
from splice.transforms import TensorMeta

FORMAT = "splice.parallel.shards"
METADATA_NAME = "splice-parallel.json"
RANK_KEY = "splice.parallel.rank"
WORLD_KEY = "splice.parallel.world_size"


def shard_filename(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"


def save_shards(model: nn.Module, shards_dir: str | os.PathLike) -> Path:
    """Write this rank's shard file; rank 0 also writes the metadata and configs. Every rank must call it.

    Returns the directory. It replaces ``shards_dir`` atomically once every rank has written its file.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    parallel = get_parallel_state(model)
    tp, rank = parallel.tp, parallel.rank
    out = Path(os.path.realpath(shards_dir))
    leader = dist.get_rank() == 0
    writes = 0 in parallel.mesh.mesh.flatten().tolist()  # the tensor-parallel group holding global rank 0
    box = [str(atomic.make_staging_dir(out)) if leader else None]
    dist.broadcast_object_list(box, src=0)
    staging = Path(box[0])
    failure = ""
    if writes:
        try:
            tensors = dict(model.state_dict(keep_vars=True))
            local: dict[str, torch.Tensor] = {}
            for key in parallel.tensors:
                tensor = tensors[key].detach()
                if isinstance(tensor, DTensor):
                    local[key] = tensor.to_local()
                elif rank == 0:
                    local[key] = tensor
            _write_file(staging, shard_filename(rank, tp), local, {RANK_KEY: str(rank), WORLD_KEY: str(tp)})
        except Exception as exc:  # every rank must hear of it, or rank 0 would publish a partial directory
            failure = f"{type(exc).__name__}: {exc}"
    failures: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    bad = [f"rank {r} could not write its shard: {f}" for r, f in enumerate(failures) if f]
    if leader:
        try:
            if not bad:
                _write_metadata(model, staging, parallel)
                atomic.fsync_dir(staging)
                atomic.replace_dir(staging, out)
        except Exception as exc:
            bad.append(f"rank 0 could not finish the directory: {type(exc).__name__}: {exc}")
        finally:
            if bad:
                atomic.remove_tree(staging)
    outcome = [bad[0] if bad else ""]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        raise CheckpointError(f"{out}: {outcome[0]}; nothing was changed")
    return out


def _write_file(staging: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    # CheckpointWriter swaps a directory into place; write into a private one and move the file up.
    inner = staging / f".{name}.d"
    metas = {k: TensorMeta.of(t) for k, t in tensors.items()}
    with CheckpointWriter(inner, metas, metadata={"format": "pt", **metadata}, weights_name=name) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
    os.replace(inner / name, staging / name)
    os.rmdir(inner)


def _write_metadata(model: nn.Module, staging: Path, parallel: Any) -> None:
    tp = parallel.tp
    dims = parallel.layout.dims
    state = get_state(model)
    tensors = {}
    for key, meta in parallel.tensors.items():
        dim = dims.get(key)
        tensors[key] = {
            "dtype": TAG_OF_DTYPE[meta.dtype],
            "shape": list(meta.shape),
            "dim": dim,
            "bounds": None if dim is None else [list(b) for b in chunk_bounds(meta.shape[dim], tp)],
        }
    document = {
        "format": FORMAT,
        "version": 1,
        "world_size": tp,
        "files": [shard_filename(r, tp) for r in range(tp)],
        "tensors": tensors,
        "weight_map": parallel.checkpoint_map.to_dict(),
        "layout": parallel.layout.describe(),
        "fusion_config": dict(state.config) if state is not None else {},
        "tp_plan": dict(parallel.layout.styles),
        "source": parallel.source,
    }
    (staging / METADATA_NAME).write_text(json.dumps(document, indent=1) + "\n")
    example = {k: torch.empty(0, dtype=m.dtype) for k, m in parallel.tensors.items()}
    try:
        save_configs(model, staging, example)  # the original layout's: no fusion_config
    except (AttributeError, TypeError) as exc:  # not a transformers model: the weights are still complete
        raise CheckpointError(f"{staging}: cannot write the model's configs: {exc}") from None
