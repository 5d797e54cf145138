"""Transformers 5.23's own documented route to fused q/k/v and gate/up for Llama (the comparison baseline).

From transformers' docs (monkey_patching.md): subclass the attention and MLP with a fused Linear,
register them process-wide with ``register_patch_mapping``, and register ``WeightConverter`` +
``Concatenate`` rules for the "llama" model type, then call ``from_pretrained``. Both registrations
are global; benchmarks run this in its own process so it cannot leak into other measurements.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, Concatenate, WeightConverter
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.models.llama.modeling_llama import (
    ALL_ATTENTION_FUNCTIONS,
    LlamaAttention,
    LlamaMLP,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.monkey_patching import register_patch_mapping


class LlamaFusedAttention(LlamaAttention):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.q_size = config.num_attention_heads * self.head_dim
        self.kv_size = config.num_key_value_heads * self.head_dim
        ref = self.q_proj.weight
        self.qkv_proj = nn.Linear(
            config.hidden_size,
            self.q_size + 2 * self.kv_size,
            bias=config.attention_bias,
            device=ref.device,
            dtype=ref.dtype,
        )
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs
    ):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        query_states = q.view(hidden_shape).transpose(1, 2)
        key_states = k.view(hidden_shape).transpose(1, 2)
        value_states = v.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )  # fmt: skip
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class LlamaFusedMLP(LlamaMLP):
    def __init__(self, config):
        super().__init__(config)
        ref = self.gate_proj.weight
        self.gate_up_proj = nn.Linear(
            self.hidden_size,
            2 * self.intermediate_size,
            bias=config.mlp_bias,
            device=ref.device,
            dtype=ref.dtype,
        )
        del self.gate_proj, self.up_proj

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def load(path: str, dtype: torch.dtype = torch.float32):
    register_patch_mapping({"LlamaAttention": LlamaFusedAttention, "LlamaMLP": LlamaFusedMLP}, overwrite=True)
    register_checkpoint_conversion_mapping(
        "llama",
        [
            WeightConverter(["q_proj", "k_proj", "v_proj"], ["qkv_proj"], [Concatenate(dim=0)]),
            WeightConverter(["gate_proj", "up_proj"], ["gate_up_proj"], [Concatenate(dim=0)]),
        ],
        overwrite=True,
    )
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
