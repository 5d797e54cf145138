"""What each rank does in the tensor-parallel tests. One spawn per scenario; the parent checks the results.

Ranks start from a forkserver that has already imported torch, transformers and splice, so a
scenario costs its own work, not four interpreters importing torch on two cores.
"""

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
    "transformers.models.llama.modeling_llama",
    "splice.hf",
    "splice.parallel.load",
    "splice.parallel.shards",
    "tiny",
]


def spawn(scenario: str, world: int, workdir: Path, **options: Any) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world`` ranks (gloo, CPU); returns each rank's results."""
    return ranks.spawn(sys.modules[__name__], scenario, world, workdir, **options)


# --------------------------------------------------------------------------------------------------
# scenarios


def inference_paths(model, ids: torch.Tensor) -> dict[str, Any]:
    """No-grad logits (local shards), grad-mode logits (DTensor runs every op), and the no-grad path's ops."""
    out: dict[str, Any] = {}
    with torch.no_grad():
        out["logits"] = model(ids).logits
    out["dtensor_path_logits"] = model(ids).logits.detach()
    with torch.no_grad(), torch.profiler.profile() as profile:
        model(ids)
    events = profile.key_averages()
    out["local_path"] = {
        "dtensor_ops": sorted(
            {"PythonSubclass", "Redistribute", "_FromTorchTensor"} & {e.key for e in events}
        ),
        "all_reduces": next(e.count for e in events if e.key == "c10d::allreduce_"),
    }
    return out


def llama(rank: int, world: int, workdir: Path, *, source: str, ids: torch.Tensor, extra_loads: bool) -> dict:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import splice
    from splice.parallel import gather_state_dict, get_parallel_state, save_shards

    out: dict[str, Any] = {}
    fusion = {"qkv": True, "gate_up": True}
    model = splice.from_pretrained(AutoModelForCausalLM, source, fusion_config=fusion, tp_plan="auto")
    parallel = get_parallel_state(model)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    out["local"] = {
        "qkv_proj": tuple(attention.qkv_proj.weight.to_local().shape),
        "qkv_bounds": attention.q_proj.shared.bounds,
        "num_key_value_groups": attention.num_key_value_groups,
        "class_untouched": "num_key_value_groups" not in type(attention).__dict__,
        "gate_up_proj": tuple(mlp.gate_up_proj.weight.to_local().shape),
        "gate_up_bounds": mlp.gate_proj.shared.bounds,
        "down_proj": tuple(mlp.down_proj.weight.to_local().shape),
        "embed": tuple(model.model.embed_tokens.weight.to_local().shape),
        "norm_is_plain": type(model.model.norm.weight.data) is torch.Tensor,
        # a slice's weight is this rank's k rows of the local fused weight, as a plain tensor
        "k_slice_is_local": type(attention.k_proj.weight) is torch.Tensor
        and torch.equal(
            attention.k_proj.weight,
            attention.qkv_proj.weight.to_local()[slice(*attention.q_proj.shared.bounds[1])],
        ),
    }
    out["bytes"] = {
        "total": parallel.bytes_read,
        "sharded": parallel.sharded_bytes_read,
        "replicated": parallel.replicated_bytes_read,
        "mapped": parallel.bytes_mapped,
    }
    out.update(inference_paths(model, ids))
    out["generated"] = model.generate(ids[:1], max_new_tokens=10, do_sample=False, min_new_tokens=10)

    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    out["loss"] = loss.detach()
    out["grads"] = ranks.copy_state(
        gather_state_dict(model, grads=True)
    )  # gathered tensors may share memory with the model
    out["state_dict"] = ranks.copy_state(gather_state_dict(model))
    out["runtime_state_dict"] = ranks.copy_state(gather_state_dict(model, original=False))
    splice.save_pretrained(model, workdir / f"saved-{world}")
    dist.barrier()
    save_shards(model, workdir / f"shards-{world}")

    torch.optim.SGD(model.parameters(), lr=0.5).step()  # replicas must stay equal, padding zero
    splice.save_pretrained(model, workdir / f"stepped-{world}")
    dist.barrier()

    if extra_loads:
        from transformers import DistributedConfig

        model.eval()
        with torch.no_grad():
            again = splice.from_pretrained(
                AutoModelForCausalLM,
                source,
                fusion_config=fusion,
                distributed_config=DistributedConfig(tp_size=world),
            )
            out["distributed_config_logits"] = again(ids).logits
            unfused = splice.from_pretrained(AutoModelForCausalLM, source, fusion_config={}, tp_plan="auto")
            out["unfused_logits"] = unfused(ids).logits
            out["unfused_q_proj"] = tuple(unfused.model.layers[0].self_attn.q_proj.weight.to_local().shape)
            half = splice.from_pretrained(
                AutoModelForCausalLM, source, fusion_config=fusion, tp_plan="auto", dtype=torch.bfloat16
            )  # slices read as float32 and converted on the way in
            out["bf16_logits"] = half(ids).logits

    if world == 4:
        # a replica that drifted, and padding that is no longer zero, must stop consolidation
        k_start = attention.q_proj.shared.bounds[1][0]
        local = attention.qkv_proj.weight.data.to_local()
        with torch.no_grad():
            kept = local[k_start].clone()
            if rank == 1:
                local[k_start] += 1.0
            out["diverged"] = ranks.error_of(lambda: gather_state_dict(model))
            # save_pretrained: rank 0 refuses, and every other rank raises too instead of returning
            out["diverged_save"] = ranks.error_of(
                lambda: splice.save_pretrained(model, workdir / f"diverged-{world}")
            )
            local[k_start] = kept
            gate_up = mlp.gate_up_proj.weight.data.to_local()
            if rank == world - 1:
                gate_up[-1] = 1.0
            out["dirty_padding"] = ranks.error_of(lambda: gather_state_dict(model))
    return out


def variants(rank: int, world: int, workdir: Path, *, source: str, ids: torch.Tensor) -> dict:
    """Qwen2 (q/k/v biases) with tied embeddings and a vocabulary that does not divide by the ranks."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import splice
    from splice.parallel import gather_state_dict, save_shards

    model = splice.from_pretrained(
        AutoModelForCausalLM, source, fusion_config=["qkv", "gate_up"], tp_plan="auto"
    )
    out: dict[str, Any] = {
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "embed": tuple(model.model.embed_tokens.weight.to_local().shape),
        "qkv_bias": tuple(model.model.layers[0].self_attn.qkv_proj.bias.to_local().shape),
    }
    out.update(inference_paths(model, ids))
    out["generated"] = model.generate(ids[:1], max_new_tokens=10, do_sample=False, min_new_tokens=10)
    model.train()
    model(ids, labels=ids).loss.backward()
    out["grads"] = ranks.copy_state(gather_state_dict(model, grads=True))
    grid = splice.from_pretrained(
        AutoModelForCausalLM, source, fusion_config=["qkv"], tp_plan="auto", tp_size=2
    )
    out["grid_embed"] = tuple(
        grid.model.embed_tokens.weight.to_local().shape
    )  # 2 x 2: data x tensor parallel
    with torch.no_grad():
        out["grid_logits"] = grid(ids).logits
    splice.save_pretrained(model, workdir / "saved-variants")
    dist.barrier()
    save_shards(model, workdir / "shards-variants")
    return out


SCENARIOS = {"llama": llama, "variants": variants}
