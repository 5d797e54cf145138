"""model.tp_plan names the modules a fused model has: per instance, restored by unfuse, nothing global changed."""

from __future__ import annotations

import re

import tiny
import transformers as T
from transformers.distributed.tensor_parallel import get_kv_heads_per_rank

import splice
from splice.fusion.linear import LinearSlice

LLAMA_PLAN = {
    "lm_head": "colwise_gather_output",
    "model.embed_tokens": "embedding_rowwise",
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}


def named(model, plan):
    """Each plan key -> the modules it names (``*`` standing for a layer number, as transformers reads it)."""
    paths = dict(model.named_modules())
    return {
        key: [m for p, m in paths.items() if re.fullmatch(re.escape(key).replace(r"\*", r"\d+"), p)]
        for key in plan
    }


def true_to_modules(model):
    for key, modules in named(model, model.tp_plan).items():
        assert modules, f"{key} names no module"
        assert not any(isinstance(m, LinearSlice) for m in modules), f"{key} names a slice"


def test_qkv_and_gate_up_name_the_fused_linears_and_unfuse_restores_the_plan():
    config = tiny.llama_config()
    model, other = T.LlamaForCausalLM(config), T.LlamaForCausalLM(config)  # one config object, two models
    original, class_plan = model.tp_plan, dict(T.LlamaForCausalLM._tp_plan)
    assert original == LLAMA_PLAN
    splice.fuse(model, ["qkv", "gate_up"])
    assert model.tp_plan == {
        "lm_head": "colwise_gather_output",
        "model.embed_tokens": "embedding_rowwise",
        "model.layers.*.self_attn.qkv_proj": "colwise",
        "model.layers.*.self_attn.o_proj": "rowwise",
        "model.layers.*.mlp.gate_up_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
    }
    assert model.model.tp_plan == {
        k.removeprefix("model."): v for k, v in model.tp_plan.items() if k.startswith("model.")
    }
    true_to_modules(model)
    assert (
        get_kv_heads_per_rank(model.tp_plan, 2, 2) == 1
    )  # transformers reads qkv_proj as sharding the kv heads
    # nothing global: the class, the (shared) config and the other model keep the unfused names
    assert other.tp_plan == LLAMA_PLAN and dict(T.LlamaForCausalLM._tp_plan) == class_plan
    assert "layers.*.self_attn.q_proj" in model.config.base_model_tp_plan
    assert "layers.*.self_attn.q_proj" in T.LlamaForCausalLM(config).tp_plan.__repr__()
    splice.unfuse(model)
    assert model.tp_plan is original and model.tp_plan == LLAMA_PLAN


def test_norm_mlp_drops_the_entries_of_the_modules_it_moved():
    model = tiny.causal_lm("llama")
    splice.fuse(model, ["qkv", "gate_up", "norm_mlp"])
    assert model.tp_plan == {
        "lm_head": "colwise_gather_output",
        "model.embed_tokens": "embedding_rowwise",
        "model.layers.*.self_attn.qkv_proj": "colwise",
        "model.layers.*.self_attn.o_proj": "rowwise",
    }
    true_to_modules(model)
    splice.unfuse(model, family="norm_mlp")  # gate_up is in place again: its entry comes back
    assert model.tp_plan["model.layers.*.mlp.gate_up_proj"] == "colwise"
    assert model.tp_plan["model.layers.*.mlp.down_proj"] == "rowwise"
    splice.unfuse(model)
    assert model.tp_plan == LLAMA_PLAN


def test_fusing_some_layers_names_the_others_one_by_one():
    model = tiny.causal_lm("llama", num_hidden_layers=3)
    splice.fuse(model, {"qkv": {"modules": r"layers\.[01]\."}})
    plan = model.tp_plan
    assert (
        plan["model.layers.*.self_attn.qkv_proj"] == "colwise"
    )  # names layers 0 and 1, the only ones with one
    assert [k for k in plan if re.search(r"\.[qkv]_proj$", k)] == [
        "model.layers.2.self_attn.q_proj",
        "model.layers.2.self_attn.k_proj",
        "model.layers.2.self_attn.v_proj",
    ]
    true_to_modules(model)


def test_siblings_with_different_styles_leave_the_fused_linear_unplanned():
    model = tiny.causal_lm("llama")
    model.model._tp_plan = {**model.model._tp_plan, "layers.*.self_attn.k_proj": "rowwise"}
    splice.fuse(model.model, ["qkv"])
    assert not any("qkv_proj" in k for k in model.model.tp_plan)
    assert "layers.*.self_attn.o_proj" in model.model.tp_plan
