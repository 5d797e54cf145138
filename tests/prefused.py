"""Tiny models whose checkpoints ship q/k/v pre-fused, and each model's own reading of its fused output.

``reference`` splits a fused q/k/v output the way the modeling code does (its own ``_split_heads`` or
``chunk``), into q, k, v of shape [..., heads * head_dim]; a test compares that with what the split
``q_proj``/``k_proj``/``v_proj`` compute, which is what proves the layout (logits alone cannot: the
stand-in reassembles the fused output whatever the layout).
"""

from __future__ import annotations

import torch
import transformers as T

SMALL = dict(vocab_size=128, bos_token_id=1, eos_token_id=2)


def falcon(**arch):
    config = T.FalconConfig(
        **SMALL, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, bias=True, **arch
    )
    return T.FalconForCausalLM(config)


CONFIGS = {
    "falcon": lambda: falcon(multi_query=False, new_decoder_architecture=False),  # per head [q k v]
    "falcon_mq": lambda: falcon(multi_query=True, new_decoder_architecture=False),  # [q; k; v], one kv head
    "falcon_gqa": lambda: falcon(new_decoder_architecture=True, num_kv_heads=2),  # per kv group [q q q k v]
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(
        T.GPTNeoXConfig(
            **SMALL,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=80,
            attention_bias=True,
        )  # fmt: skip
    ),
    "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(**SMALL, hidden_size=48, n_layer=2, n_head=4)),
    "mpt": lambda: T.MptForCausalLM(
        T.MptConfig(**SMALL, d_model=48, n_layers=2, n_heads=4, max_seq_len=64, expansion_ratio=2)
    ),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(**SMALL, n_embd=48, n_layer=2, n_head=4, n_positions=64)),
    "codegen": lambda: T.CodeGenForCausalLM(
        T.CodeGenConfig(**SMALL, n_embd=64, n_layer=2, n_head=8, rotary_dim=4, n_positions=64)
    ),
    "persimmon": lambda: T.PersimmonForCausalLM(
        T.PersimmonConfig(
            **SMALL,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )  # fmt: skip
    ),
    "gpt_neox_japanese": lambda: T.GPTNeoXJapaneseForCausalLM(
        T.GPTNeoXJapaneseConfig(
            **SMALL,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_multiple_size=2,
            max_position_embeddings=64,
        )  # fmt: skip
    ),
    "gpt_bigcode": lambda: T.GPTBigCodeForCausalLM(  # multi-query: [q; k; v] with one kv head
        T.GPTBigCodeConfig(**SMALL, n_embd=48, n_layer=2, n_head=4, n_positions=64, multi_query=True)
    ),
    "gpt_bigcode_mha": lambda: T.GPTBigCodeForCausalLM(  # per head [q k v]
        T.GPTBigCodeConfig(**SMALL, n_embd=48, n_layer=2, n_head=4, n_positions=64, multi_query=False)
    ),
    "openai": lambda: T.OpenAIGPTLMHeadModel(
        T.OpenAIGPTConfig(vocab_size=128, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    ),
    "modernbert": lambda: T.ModernBertForMaskedLM(
        T.ModernBertConfig(
            vocab_size=128,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
            global_attn_every_n_layers=1,
        )  # fmt: skip
    ),
}


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = CONFIGS[kind]().eval()
    with torch.no_grad():  # non-zero biases, so a misplaced bias row shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model


def attentions(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


def _falcon(attn, out):
    q, k, v = attn._split_heads(out)  # [..., heads, head_dim] (new architecture: kv broadcast to q)
    if attn.new_decoder_architecture:
        g = attn.num_heads // attn.num_kv_heads
        k, v = k[..., ::g, :], v[..., ::g, :]
    return [t.flatten(-2) for t in (q, k, v)]


def _codegen(attn, out):
    local = out.reshape(out.shape[:-1] + (4, -1))
    q, v, k = torch.split(local, attn.embed_dim // 4, dim=-1)
    return [t.flatten(-2) for t in (q, k, v)]


REFERENCE = {
    "falcon": _falcon,
    "falcon_mq": _falcon,
    "falcon_gqa": _falcon,
    "gpt_neox": lambda a, out: [
        t.flatten(-2) for t in out.view(*out.shape[:-1], -1, 3 * a.head_size).chunk(3, dim=-1)
    ],
    "bloom": lambda a, out: [t.transpose(1, 2).flatten(-2) for t in a._reshape(out)],  # [b, heads, len, d]
    "mpt": lambda a, out: list(out.chunk(3, dim=-1)),
    "gpt2": lambda a, out: list(out.split(a.split_size, dim=-1)),
    "codegen": _codegen,
}


def _per_head(a, out, heads, d):
    per_head = out.view(*out.shape[:-1], heads, 3 * d)
    return [per_head[..., i * d : (i + 1) * d].flatten(-2) for i in range(3)]


REFERENCE |= {
    "persimmon": lambda a, out: [t.flatten(-2) for t in a._split_heads(out)],
    "gpt_neox_japanese": lambda a, out: _per_head(a, out, a.num_attention_heads, a.head_size),
    "gpt_bigcode": lambda a, out: list(out.split((a.embed_dim, a.kv_dim, a.kv_dim), dim=-1)),
    "gpt_bigcode_mha": lambda a, out: _per_head(a, out, a.num_heads, a.head_dim),
    "openai": lambda a, out: list(out.split(a.split_size, dim=-1)),
    "modernbert": lambda a, out: list(out.chunk(3, dim=-1)),  # view(..., 3, heads, head_dim)
}

FUSED_NAME = {"falcon": "query_key_value", "gpt_neox": "query_key_value", "bloom": "query_key_value"}
FUSED_NAME |= {"falcon_mq": "query_key_value", "falcon_gqa": "query_key_value", "mpt": "Wqkv"}
FUSED_NAME |= {"gpt2": "c_attn", "codegen": "qkv_proj", "persimmon": "query_key_value"}
FUSED_NAME |= {"gpt_neox_japanese": "query_key_value", "gpt_bigcode": "c_attn", "gpt_bigcode_mha": "c_attn"}
FUSED_NAME |= {"openai": "c_attn", "modernbert": "Wqkv"}
