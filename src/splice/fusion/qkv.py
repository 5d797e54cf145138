"""`qkv`: the query, key and value projections of an attention block become one `qkv_proj` (GQA-aware).

Sizes come from the modules themselves, so GQA (fewer k/v heads than q heads), non-square
projections and q/k/v biases need nothing special. See `splice.fusion.linear` for how the three
original call sites share one GEMM without touching the model's attention forward.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

from torch import nn

from splice.fusion.contract import FusedLayout
from splice.fusion.linear import SiblingLinearsOptions, SiblingLinearsSpec
from splice.fusion.spec import register_fusion


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

    def layout(self, module: nn.Module, options: SiblingLinearsOptions) -> FusedLayout:  # type: ignore[override]
        fused = super().layout(module, options)
        head_dim = _head_dim(module)
        if head_dim and all(size % head_dim == 0 for size in fused.sizes):
            heads = tuple(size // head_dim for size in fused.sizes)
            return replace(fused, attention=True, head_dim=head_dim, heads=heads)
        return replace(fused, attention=True)

    def tp_group(self, module: nn.Module) -> FusedLayout | None:
        """An attention's separate q/k/v Linears (plain ``nn.Linear``): TP cuts them by heads, as if fused."""
        for names in self.candidate_names:
            if all(type(module._modules.get(n)) is nn.Linear for n in names):
                return self.layout(module, self.options_class(names=names))
        return None


register_fusion("qkv", QKVSpec())


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
