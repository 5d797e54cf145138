"""A small Llama-shaped state dict and the q/k/v + gate/up fusion map the weight map tests share."""

from __future__ import annotations

import torch

from splice.transforms import TensorMeta, bitwise_equal
from splice.weightmap import WeightMap

FUSED = WeightMap.parse(
    [
        "model.layers.*.self_attn.{q,k,v}_proj.weight -> model.layers.*.self_attn.qkv_proj.weight | concat(dim=0)",
        "model.layers.*.mlp.{gate,up}_proj.weight -> model.layers.*.mlp.gate_up_proj.weight | concat(dim=0)",
    ]
)


def llama_state_dict(layers=2, hidden=16, heads=4, kv_heads=2, inter=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = hidden // heads
    sd = {"model.embed_tokens.weight": torch.randn(32, hidden, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = torch.randn(heads * d, hidden, generator=g)
        sd[p + "self_attn.k_proj.weight"] = torch.randn(kv_heads * d, hidden, generator=g)
        sd[p + "self_attn.v_proj.weight"] = torch.randn(kv_heads * d, hidden, generator=g)
        sd[p + "self_attn.o_proj.weight"] = torch.randn(hidden, heads * d, generator=g)
        sd[p + "mlp.gate_proj.weight"] = torch.randn(inter, hidden, generator=g)
        sd[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden, generator=g)
        sd[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=g)
        sd[p + "input_layernorm.weight"] = torch.randn(hidden, generator=g)
    sd["lm_head.weight"] = torch.randn(32, hidden, generator=g)
    return sd


def metas(sd):
    return {k: TensorMeta.of(v) for k, v in sd.items()}


def assert_same(a, b):
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert bitwise_equal(a[k], b[k]), k
