"""`qkv`: the query, key and value projections of an attention block become one `qkv_proj` (GQA-aware).

Sizes come from the modules themselves, so GQA (fewer k/v heads than q heads), non-square
projections and q/k/v biases need nothing special. See `splice.fusion.linear` for how the three
original call sites share one GEMM without touching the model's attention forward.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from splice.fusion.linear import SiblingLinearsOptions, SiblingLinearsSpec


class QKVSpec(SiblingLinearsSpec):
    name: ClassVar[str] = "qkv"
    candidate_names: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("q_proj", "k_proj", "v_proj"),
        ("query", "key", "value"),
        ("q", "k", "v"),
        ("query_proj", "key_proj", "value_proj"),  # prophetnet
        ("q_lin", "k_lin", "v_lin"),  # xlm, flaubert
        ("project_q", "project_k", "project_v"),  # cpmant
        ("Wq", "Wk", "Wv"),  # ctrl
    )
    fused_name: ClassVar[str] = "qkv_proj"

    def layout(self, module: nn.Module, options: SiblingLinearsOptions) -> dict[str, Any]:  # type: ignore[override]
        layout = super().layout(module, options)
        head_dim = _head_dim(module)
        if head_dim and all(size % head_dim == 0 for size in layout["sizes"]):
            layout["head_dim"] = head_dim
            layout["heads"] = [size // head_dim for size in layout["sizes"]]
        return layout


def _head_dim(module: nn.Module) -> int | None:
    """The head size, from the attention module or its config (config-aware discovery for HF models)."""
    value = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    config = getattr(module, "config", None)
    if value is None and config is not None:
        value = getattr(config, "head_dim", None)
        heads = getattr(config, "num_attention_heads", None)
        if value is None and heads:
            value = config.hidden_size // heads
    return int(value) if isinstance(value, int) and value > 0 else None
