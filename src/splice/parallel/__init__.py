"""Tensor parallelism for fused layouts, on torch.distributed.

::

    model = splice.from_pretrained(AutoModelForCausalLM, path, fusion_config={"qkv": True, "gate_up": True},
                                   tp_plan="auto")          # every rank, under an initialized process group
    splice.save_pretrained(model, out_dir)                 # the original checkpoint, written by rank 0
    splice.parallel.save_shards(model, shards_dir)         # per-rank files + splice-parallel.json
    # offline, no process group, no model code:  splice consolidate SHARDS_DIR OUT_DIR

- `splice.parallel.layout`: the pure maths (per-rank interleaving of fused parts, kv replication,
  padding, which checkpoint rows make up a rank's shard), as reversible WeightMap rules.
- `splice.parallel.sharding`: a model's Transformers TP plan, rewritten for its fused modules.
- `splice.parallel.load`: the loader (`from_pretrained_tp`).
- `splice.parallel.shards` / `splice.parallel.consolidate`: per-rank files and rebuilding the original
  (``splice.parallel.consolidate.consolidate(shards_dir, out_dir)``, or ``splice consolidate``).
- `splice.parallel.lora`: LoRA adapters trained under TP, back to vanilla PEFT tensors.
- `splice.parallel.lora_sharding`: the DTensor factors of LoRA layers on sharded Linears (`splice.peft`
  uses it), and ``clip_grad_norm_`` that counts replicated kv rows once.
- `splice.parallel.view`: ``splice.original_state_dict`` of a sharded model (FSDP2, TP, both): DTensors in
  the original layout over this rank's rows, aliasing the fused parameters, for torch.distributed.checkpoint.
- `splice.parallel.fsdp`: ``splice.save_pretrained`` under FSDP2 (collective; rank 0 writes).
- `splice.parallel.dcp_consolidate`: ``splice consolidate DCP_DIR OUT_DIR --config DIR``, offline.

Imports are lazy: consolidating needs neither transformers nor a process group.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "clip_grad_norm_": "splice.parallel.lora_sharding",
    "from_pretrained_tp": "splice.parallel.load",
    "save_shards": "splice.parallel.shards",
    "gather_state_dict": "splice.parallel.state",
    "get_parallel_state": "splice.parallel.state",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'splice.parallel' has no attribute {name!r}")
