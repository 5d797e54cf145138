"""What each rank does in the MoE tensor- and expert-parallel tests (see test_moe.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import ranks
import torch

PRELOAD = [
    "torch",
    "torch.distributed.tensor.parallel",
    "transformers",
    "transformers.models.mixtral.modeling_mixtral",
    "transformers.models.qwen3_moe.modeling_qwen3_moe",
    "splice.hf",
    "splice.parallel.load",
    "splice.parallel.shards",
    "tiny",
]


def spawn(scenario: str, world: int, workdir: Path, **options: Any) -> list[dict[str, Any]]:
    return ranks.spawn(sys.modules[__name__], scenario, world, workdir, **options)


def moe(
    rank: int,
    world: int,
    workdir: Path,
    *,
    source: str,
    ids: torch.Tensor,
    name: str,
    ep: bool,
    refuse: str | None,
    options: dict[str, Any],
) -> dict:
    """Load fused (qkv) and sharded, run forward, generate and backward, gather, save both ways.

    ``ep``: expert parallel (``DistributedConfig(tp_size=world, ep_size=world)``), else the model's TP plan.
    ``refuse``: a checkpoint whose experts do not divide by ``world``, to collect the refusals.
    """
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, DistributedConfig

    import splice
    from splice.parallel import gather_state_dict, get_parallel_state, save_shards

    def load(path: str, **request: Any):
        return splice.from_pretrained(
            AutoModelForCausalLM, path, fusion_config={"qkv": True}, **options, **request
        )

    out: dict[str, Any] = {}
    if refuse is not None:
        out["indivisible"] = ranks.error_of(
            lambda: load(refuse, distributed_config=DistributedConfig(tp_size=world, ep_size=world))
        )
        out["ep_size"] = ranks.error_of(
            lambda: load(refuse, distributed_config={"tp_size": world, "ep_size": 2 * world})
        )
    if ep:
        model = load(source, distributed_config=DistributedConfig(tp_size=world, ep_size=world))
    else:
        model = load(source, tp_plan="auto")
    parallel = get_parallel_state(model)
    experts = model.model.layers[0].mlp.experts
    out |= {
        "gate_up": tuple(experts.gate_up_proj.to_local().shape),
        "down": tuple(experts.down_proj.to_local().shape),
        "gate_up_local": experts.gate_up_proj.to_local().clone(),
        "down_local": experts.down_proj.to_local().clone(),
        "num_experts": experts.num_experts,
        "bytes": {"sharded": parallel.sharded_bytes_read, "replicated": parallel.replicated_bytes_read},
    }
    # the original layout as views of this rank's pieces (per-expert boxes), written by DCP's HF writer
    import torch.distributed.checkpoint as dcp

    view = splice.original_state_dict(model)
    writer = dcp.HuggingFaceStorageWriter(
        str(workdir / f"dcp-{name}"), save_distributed=True, enable_consolidation=True
    )
    dcp.save(view, storage_writer=writer)
    with torch.no_grad():
        out["logits"] = model(ids).logits
    out["generated"] = model.generate(ids[:1], max_new_tokens=6, do_sample=False, min_new_tokens=6)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    out["loss"] = loss.detach()
    out["grads"] = ranks.copy_state(gather_state_dict(model, grads=True))
    out["state_dict"] = ranks.copy_state(gather_state_dict(model))
    splice.save_pretrained(model, workdir / f"saved-{name}")
    dist.barrier()
    save_shards(model, workdir / f"shards-{name}")
    dist.barrier()
    return out


SCENARIOS = {"moe": moe}
