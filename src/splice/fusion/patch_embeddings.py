"""`patch_embeddings`: a patch-embedding convolution whose stride equals its kernel becomes a Linear.

Such a convolution (Qwen2-VL's Conv3d, ViT/SigLIP/CLIP's Conv2d) looks at each patch exactly once,
so it is a matmul over flattened patches, and a Linear runs it much faster on most backends. The
Linear is registered beside the convolution as ``linear_proj``; the convolution's slot holds a
:class:`ConvAsLinear` that cuts its input into patches, runs ``linear_proj`` and returns the
convolution's output layout, so the parent module's forward is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from splice.fusion.contract import StandIn
from splice.fusion.linear import base_layer
from splice.fusion.spec import FusionOptions, ModuleFusionSpec, register_fusion
from splice.transforms import ConvToLinear
from splice.weightmap import Rule

CONVS = (nn.Conv2d, nn.Conv3d)


class ConvAsLinear(StandIn):
    """Stands where a stride == kernel convolution was; runs the parent's ``linear_proj`` on patches."""

    def __init__(self, parent: nn.Module, fused_name: str, conv: nn.Module):
        super().__init__()
        self.__dict__["parent"] = parent
        self.fused_name = fused_name
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.padding, self.dilation, self.groups = conv.padding, conv.dilation, conv.groups

    @property
    def linear(self) -> nn.Module:
        return getattr(self.parent, self.fused_name)

    @property
    def weight(self) -> torch.Tensor:
        """The Linear weight seen with the convolution's shape (a view; code reads its dtype/shape)."""
        weight = base_layer(self.linear).weight
        return weight.view(self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def bias(self) -> torch.Tensor | None:
        return base_layer(self.linear).bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.kernel_size)
        unbatched = x.dim() == n + 1
        if unbatched:
            x = x.unsqueeze(0)
        batch, channels, *spatial = x.shape
        counts = [size // k for size, k in zip(spatial, self.kernel_size)]
        if any(c * k != size for c, k, size in zip(counts, self.kernel_size, spatial)):
            x = x[(slice(None), slice(None), *(slice(0, c * k) for c, k in zip(counts, self.kernel_size)))]
        if all(c == 1 for c in counts):  # one patch per sample (Qwen2-VL): a plain reshape
            out = self.linear(x.reshape(batch, -1))
            out = out.reshape(batch, self.out_channels, *counts)
        else:
            split = [d for c, k in zip(counts, self.kernel_size) for d in (c, k)]
            x = x.reshape(batch, channels, *split)
            grid_axes = [2 + 2 * i for i in range(n)]
            kernel_axes = [3 + 2 * i for i in range(n)]
            patches = x.permute(0, *grid_axes, 1, *kernel_axes).reshape(batch * math.prod(counts), -1)
            out = self.linear(patches).reshape(batch, *counts, self.out_channels)
            out = out.permute(0, n + 1, *range(1, n + 1)).contiguous()
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, runs {self.fused_name}"
        )


@dataclass(frozen=True)
class PatchEmbeddingsOptions(FusionOptions):
    fused_name: str = "linear_proj"
    """Attribute name of the new Linear, beside the convolution."""


class PatchEmbeddingsSpec(ModuleFusionSpec):
    name: ClassVar[str] = "patch_embeddings"
    options_class: ClassVar[type[FusionOptions]] = PatchEmbeddingsOptions

    def conv_name(self, module: nn.Module, options: PatchEmbeddingsOptions) -> str | None:
        if options.fused_name in module._modules:
            return None
        for name, child in module._modules.items():
            if type(child) in CONVS and _non_overlapping(child):
                return name
        return None

    def is_fusable(self, module: nn.Module, options: PatchEmbeddingsOptions) -> bool:  # type: ignore[override]
        return self.conv_name(module, options) is not None

    def describe_candidates(self, options: FusionOptions) -> str:
        return "modules holding an nn.Conv2d/nn.Conv3d with stride == kernel_size, no padding, dilation 1, groups 1"

    def make_fused_module(self, module: nn.Module, options: PatchEmbeddingsOptions) -> dict[str, nn.Module]:  # type: ignore[override]
        name = self.conv_name(module, options)
        conv = module._modules[name]
        linear = nn.Linear(
            conv.in_channels * math.prod(conv.kernel_size),
            conv.out_channels,
            bias=conv.bias is not None,
            device="meta",
            dtype=conv.weight.dtype,
        )
        return {options.fused_name: linear, name: ConvAsLinear(module, options.fused_name, conv)}

    def make_transforms(self, module: nn.Module, options: PatchEmbeddingsOptions) -> list[Rule]:  # type: ignore[override]
        name = self.conv_name(module, options)
        conv = module._modules[name]
        rules = [
            Rule(
                (f"{name}.weight",),
                (f"{options.fused_name}.weight",),
                (ConvToLinear(tuple(conv.kernel_size)),),
            )
        ]
        if conv.bias is not None:
            rules.append(Rule((f"{name}.bias",), (f"{options.fused_name}.bias",)))
        return rules


def _non_overlapping(conv: nn.Module) -> bool:
    return (
        math.prod(conv.kernel_size) > 1  # a 1x1 convolution is a pointwise projection, not a patch embedding
        and tuple(conv.stride) == tuple(conv.kernel_size)
        and (
            conv.padding == "valid"
            or (not isinstance(conv.padding, str) and all(p == 0 for p in conv.padding))
        )
        and all(d == 1 for d in conv.dilation)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


register_fusion("patch_embeddings", PatchEmbeddingsSpec())
