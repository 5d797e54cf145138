"""`norm_mlp`: the norm that precedes an MLP is absorbed into it.

The layer's MLP slot gets a fused module that owns the norm and the MLP (``mlp.post_attention_layernorm``,
``mlp.mlp``) and runs them as one; the norm's slot becomes a pass-through. It is chain fusion
(`splice.fusion.chain`) with the pair found per layer, so a kernel for norm + MLP can be plugged in
with `splice.kernels`. The norm's weight is moved, not folded into the MLP's weights, so the layout
change is exact and the original checkpoint keys come back bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from splice.errors import FusionError
from splice.fusion.adjacency import why_not_chain
from splice.fusion.chain import FusedChain, PassThrough, chain_children, chain_rules
from splice.fusion.spec import FusionOptions, ModuleFusionSpec, register_fusion
from splice.weightmap import Rule

PAIRS: tuple[tuple[str, str], ...] = (
    ("pre_feedforward_layernorm", "mlp"),  # Gemma 2/3: post_attention_layernorm closes the attention block
    ("post_attention_layernorm", "mlp"),  # Llama, Mistral, Qwen, Gemma, Phi-3
    ("ffn_norm", "feed_forward"),
    ("ln_2", "mlp"),
    ("layernorm_after", "mlp"),
)


@dataclass(frozen=True)
class NormMLPOptions(FusionOptions):
    norm: str | None = None
    """The norm's attribute name (default: the known spellings, e.g. post_attention_layernorm)."""
    mlp: str | None = None
    """The MLP's attribute name (default: mlp / feed_forward)."""


class NormMLPSpec(ModuleFusionSpec):
    name: ClassVar[str] = "norm_mlp"
    options_class: ClassVar[type[FusionOptions]] = NormMLPOptions

    def pair(self, module: nn.Module, options: NormMLPOptions) -> tuple[str, str] | None:
        pairs = PAIRS
        if options.norm or options.mlp:
            pairs = tuple((options.norm or n, options.mlp or m) for n, m in PAIRS)
        for norm, mlp in pairs:
            a, b = module._modules.get(norm), module._modules.get(mlp)
            if (
                a is None
                or b is None
                or isinstance(a, (PassThrough, FusedChain))
                or isinstance(b, (PassThrough, FusedChain))
            ):
                continue
            if "norm" in type(a).__name__.lower() and any(True for _ in b.parameters()):
                return norm, mlp
        return None

    def is_fusable(self, module: nn.Module, options: NormMLPOptions) -> bool:  # type: ignore[override]
        return self.pair(module, options) is not None

    def describe_candidates(self, options: NormMLPOptions) -> str:  # type: ignore[override]
        return (
            "modules with a norm child followed by an MLP child ("
            + ", ".join("+".join(p) for p in PAIRS)
            + ")"
        )

    def make_fused_module(self, module: nn.Module, options: NormMLPOptions) -> dict[str, nn.Module]:  # type: ignore[override]
        pair = self.pair(module, options)
        assert pair is not None
        why = why_not_chain(module, pair)  # decided now, from the layer's forward, not when it first runs
        if why is not None:
            raise FusionError(f"{pair[0]} cannot be absorbed into {pair[1]}: {why}")
        return chain_children(module, pair)

    def make_transforms(self, module: nn.Module, options: NormMLPOptions) -> list[Rule]:  # type: ignore[override]
        return chain_rules(self.pair(module, options))  # type: ignore[arg-type]


register_fusion("norm_mlp", NormMLPSpec())
