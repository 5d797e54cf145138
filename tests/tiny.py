"""Tiny models built from configs (never downloaded), shared by the test files.

Shapes are deliberately awkward: GQA (4 query heads, 2 kv heads), non-square MLPs (64 -> 96),
biases where the architecture has them, head_dim != hidden/heads where the config allows it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


MOE = dict(num_local_experts=5, num_experts=5, num_experts_per_tok=2)


def llama_config(**overrides) -> T.LlamaConfig:
    return T.LlamaConfig(**{**TEXT, **overrides})


def causal_lm(kind: str, seed: int = 0, **overrides):
    """A tiny causal LM: llama, mistral, qwen2, qwen3, gemma, gemma2, phi3, mixtral, qwen2_moe, qwen3_moe."""
    torch.manual_seed(seed)
    configs = {
        "llama": lambda: T.LlamaConfig(**{**TEXT, **overrides}),
        "mistral": lambda: T.MistralConfig(**{**TEXT, **overrides}),
        "qwen2": lambda: T.Qwen2Config(**{**TEXT, **overrides}),  # q/k/v have biases
        "qwen3": lambda: T.Qwen3Config(**{**TEXT, "head_dim": 24, **overrides}),  # q/k norms, head_dim 24
        "gemma": lambda: T.GemmaConfig(**{**TEXT, "head_dim": 16, **overrides}),
        "gemma2": lambda: T.Gemma2Config(**{**TEXT, "head_dim": 16, **overrides}),
        "phi3": lambda: T.Phi3Config(**{**TEXT, **overrides}),  # ships qkv_proj and gate_up_proj natively
        # MoE: checkpoints hold one tensor per expert, the models one stacked [E, ...] tensor per projection
        "mixtral": lambda: T.MixtralConfig(**{**TEXT, **MOE, **overrides}),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(
            **{**TEXT, **MOE, "moe_intermediate_size": 48, "shared_expert_intermediate_size": 80, **overrides}
        ),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**{**TEXT, **MOE, "moe_intermediate_size": 40, **overrides}),
    }
    config = configs[kind]()
    model = T.AutoModelForCausalLM.from_config(config)
    return model.eval()


def qwen2_vl_config() -> T.Qwen2VLConfig:
    return T.Qwen2VLConfig(
        text_config=dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=4,
            in_channels=3,
            patch_size=4,
            temporal_patch_size=2,
            spatial_merge_size=2,
        ),  # fmt: skip
        image_token_id=100,
        video_token_id=101,
        vision_start_token_id=102,
        vision_end_token_id=103,
    )


def qwen2_vl(seed: int = 0):
    torch.manual_seed(seed)
    return T.Qwen2VLForConditionalGeneration(qwen2_vl_config()).eval()


def qwen2_vl_inputs(seed: int = 123) -> dict[str, torch.Tensor]:
    """One image (grid 1x4x4 -> 16 patches, merged 2x2 -> 4 image tokens) inside a short prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = [1, 102] + [100] * 4 + [103] + torch.randint(3, 99, (6,), generator=g).tolist()
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "mm_token_type_ids": torch.tensor([[1 if t == 100 else 0 for t in ids]]),
        "pixel_values": torch.randn(16, 3 * 2 * 4 * 4, generator=g),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
    }


def sam_vision(seed: int = 0):
    torch.manual_seed(seed)
    config = T.SamVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_dim=48, image_size=64, patch_size=16,
        output_channels=16, global_attn_indexes=[1], window_size=2,
    )  # fmt: skip
    return T.SamVisionModel(config).eval()


def vit(seed: int = 0):
    torch.manual_seed(seed)
    config = T.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=32,
        patch_size=8,
    )
    return T.ViTModel(config).eval()


def siglip_vision(seed: int = 0):
    torch.manual_seed(seed)
    config = T.SiglipVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=30,
        patch_size=6,
    )
    return T.SiglipVisionModel(config).eval()


def token_ids(batch: int = 2, length: int = 9, seed: int = 7, vocab: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def logits(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits on ``ids`` (default: ``token_ids()``), without autograd."""
    with torch.no_grad():
        return model(input_ids=token_ids() if ids is None else ids).logits


def save(model, path: Path, **kwargs) -> Path:
    """Save with transformers itself, so the checkpoint is exactly what users have on disk."""
    model.save_pretrained(path, **kwargs)
    return Path(path)
