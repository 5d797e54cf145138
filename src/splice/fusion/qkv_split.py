"""`qkv_split`: a fused ``qkv`` Linear (SAM, ViT-style, Phi-3's ``qkv_proj``) becomes separate q, k, v.

The inverse of `qkv`, for when separate projections are what you want: LoRA on q and v only, or a
per-projection quantization. The three Linears are real ``nn.Linear`` children; the fused slot holds
a :class:`ConcatLinears` that calls them and concatenates, so the model's forward is unchanged.

Sizes: the ``sizes`` option, else the attention module's head counts (GQA, e.g. Phi-3), else three
equal parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from splice.errors import FusionError
from splice.fusion.linear import base_layer
from splice.fusion.spec import FusionOptions, ModuleFusionSpec
from splice.transforms import Split
from splice.weightmap import Rule

CANDIDATES: dict[str, tuple[str, str, str]] = {
    "qkv": ("q", "k", "v"),
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
}


class ConcatLinears(nn.Module):
    """Stands where the fused qkv Linear was; calls the separate Linears and concatenates their outputs."""

    def __init__(self, parent: nn.Module, names: tuple[str, ...], in_features: int, out_features: int):
        super().__init__()
        self.__dict__["parent"] = parent  # the Linears are the parent's children (so LoRA can wrap them)
        self.names = tuple(names)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self.parent, n)(x) for n in self.names], dim=-1)

    @property
    def weight(self) -> torch.Tensor:
        """The fused weight (a concatenation, computed on access)."""
        return torch.cat([base_layer(getattr(self.parent, n)).weight for n in self.names])

    @property
    def bias(self) -> torch.Tensor | None:
        biases = [base_layer(getattr(self.parent, n)).bias for n in self.names]
        return None if biases[0] is None else torch.cat(biases)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, concatenates {', '.join(self.names)}"


@dataclass(frozen=True)
class QKVSplitOptions(FusionOptions):
    name: str | None = None
    """The fused Linear to split (default: ``qkv`` or ``qkv_proj``)."""
    names: tuple[str, ...] | None = None
    """Names of the new Linears (default: q/k/v for ``qkv``, q_proj/k_proj/v_proj for ``qkv_proj``)."""
    sizes: tuple[int, ...] | None = None
    """Output sizes of the parts (default: from the module's head counts, else equal thirds)."""


class QKVSplitSpec(ModuleFusionSpec):
    name: ClassVar[str] = "qkv_split"
    options_class: ClassVar[type[FusionOptions]] = QKVSplitOptions

    def check_options(self, family: str, options: QKVSplitOptions) -> None:  # type: ignore[override]
        if (
            options.names is not None
            and options.sizes is not None
            and len(options.names) != len(options.sizes)
        ):
            raise FusionError(
                f"{family!r}: options names {options.names} and sizes {options.sizes} differ in length"
            )
        if options.names is not None and options.name is None:
            raise FusionError(f"{family!r}: option names needs option name (the fused Linear to split)")

    def _target(
        self, module: nn.Module, options: QKVSplitOptions
    ) -> tuple[str, tuple[str, ...], tuple[int, ...]] | None:
        spellings = (
            {options.name: options.names or CANDIDATES.get(options.name, ("q", "k", "v"))}
            if options.name
            else CANDIDATES
        )
        for name, names in spellings.items():
            linear = module._modules.get(name)
            if type(linear) is not nn.Linear or any(n in module._modules for n in names):
                continue
            sizes = (
                options.sizes
                or _sizes_from_heads(module, linear.out_features)
                or _thirds(linear.out_features, len(names))
            )
            if sizes and sum(sizes) == linear.out_features and len(sizes) == len(names):
                return name, tuple(names), tuple(sizes)
        return None

    def is_fusable(self, module: nn.Module, options: QKVSplitOptions) -> bool:  # type: ignore[override]
        return self._target(module, options) is not None

    def describe_candidates(self, options: QKVSplitOptions) -> str:  # type: ignore[override]
        names = [options.name] if options.name else list(CANDIDATES)
        return f"nn.Linear children named {' or '.join(names)} whose output splits into {options.sizes or 'q/k/v sizes'}"

    def make_fused_module(self, module: nn.Module, options: QKVSplitOptions) -> dict[str, nn.Module]:  # type: ignore[override]
        name, names, sizes = self._target(module, options)  # type: ignore[misc]
        fused = module._modules[name]
        bias = fused.bias is not None
        parts = {
            n: nn.Linear(fused.in_features, size, bias=bias, device="meta", dtype=fused.weight.dtype)
            for n, size in zip(names, sizes)
        }
        return {**parts, name: ConcatLinears(module, names, fused.in_features, fused.out_features)}

    def make_transforms(self, module: nn.Module, options: QKVSplitOptions) -> list[Rule]:  # type: ignore[override]
        name, names, sizes = self._target(module, options)  # type: ignore[misc]
        params = ["weight"] + (["bias"] if module._modules[name].bias is not None else [])
        return [Rule((f"{name}.{p}",), tuple(f"{n}.{p}" for n in names), (Split(0, sizes),)) for p in params]

    def layout(self, module: nn.Module, options: QKVSplitOptions) -> dict[str, Any]:  # type: ignore[override]
        name, names, sizes = self._target(module, options)  # type: ignore[misc]
        return {"fused_name": name, "names": list(names), "sizes": list(sizes)}


def _sizes_from_heads(module: nn.Module, total: int) -> tuple[int, int, int] | None:
    config = getattr(module, "config", None)
    head_dim = getattr(module, "head_dim", None) or getattr(config, "head_dim", None)
    heads = getattr(module, "num_heads", None) or getattr(config, "num_attention_heads", None)
    kv_heads = getattr(module, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None)
    if not all(isinstance(v, int) and v > 0 for v in (head_dim, heads, kv_heads)):
        return None
    sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    return sizes if sum(sizes) == total else None


def _thirds(total: int, parts: int) -> tuple[int, ...] | None:
    return (total // parts,) * parts if total % parts == 0 else None
