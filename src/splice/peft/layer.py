"""The LoRA layer for splice's parameterless Linear stand-ins (`LinearStandIn`: `LinearSlice`, `ConcatLinears`, ...).

PEFT wraps a targeted module in a LoRA layer that keeps it as ``base_layer`` and adds
``lora_B(lora_A(dropout(x))) * scaling`` to its output. A stand-in computes the same base output as
the Linear it replaced without owning a weight (a slice of the shared fused GEMM, or the
concatenation of the split Linears), so this layer is PEFT's `lora.Linear` with two changes: it
reads the stand-in's sizes, and merging writes the delta into the rows of the real weights the
stand-in reads, with the same arithmetic as PEFT's merge. It is registered on each LoraConfig through
PEFT's per-config custom-module dispatch, so no other model or config ever sees it.

Also here: the refusals for a LoRA that could not behave exactly like vanilla LoRA on the original
model (a variant or init that rewrites a shared weight, sharded weights, a chain kernel that skips it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge, check_target_module_exists
from torch import nn

from splice.fusion.chain import FusedChain
from splice.fusion.contract import LinearStandIn
from splice.fusion.tensors import is_dtensor
from splice.peft.addresses import base_model, describe
from splice.peft.errors import AdapterError

EXACT_INITS = (True, False, "gaussian")  # inits that neither read nor rewrite the base weight


def active_variants(config: Any) -> list[str]:
    """The LoRA variants (DoRA, aLoRA, ...) a config turns on, found the way PEFT finds them."""
    found = []
    for field in dataclasses.fields(config):
        if field.name == "init_lora_weights":
            found += [v for v in field.metadata.get("lora_variants", ()) if config.init_lora_weights == v]
        elif field.metadata.get("is_lora_variant") and getattr(config, field.name):
            found.append(field.name)
    return found


def refuse_inexact(config: Any, module: nn.Module, where: str) -> None:
    """Raise when a LoRA on this stand-in could not behave exactly like vanilla LoRA on the original Linear."""
    what = describe(module)
    variants = active_variants(config)
    if variants:
        raise AdapterError(
            f"{where}: {', '.join(variants)} on {what} is not supported: the variant reads or rewrites the "
            "whole base weight of the layer it wraps, which here is shared with other modules; target the "
            "unfused model, or drop the variant"
        )
    if config.init_lora_weights not in EXACT_INITS:
        raise AdapterError(
            f"{where}: init_lora_weights={config.init_lora_weights!r} reads or rewrites the base weight, which "
            f"for {what} lives in another module; use one of {EXACT_INITS}"
        )
    if config.fan_in_fan_out and not getattr(module, "transposed", False):  # GPT-2's split c_attn is a Conv1D
        raise AdapterError(
            f"{where}: fan_in_fan_out=True is for Conv1D weights, but this is {what} of nn.Linear weights"
        )


def refuse_sharded(model: nn.Module) -> None:
    """PEFT layers on DTensor bases are not wired up: their plain factors would see local shards as whole."""
    base = base_model(model)
    sharded = next((k for k, p in base.named_parameters() if is_dtensor(p)), None)
    if sharded is not None:
        raise AdapterError(
            f"{type(base).__name__} is sharded ({sharded} is a DTensor: loaded tensor-parallel, or fully_shard ran); "
            "LoRA layers on its sharded Linears are not supported yet. Train or apply the adapter on an unsharded "
            "model (one process), or move the adapter tensors with splice.parallel.shard_lora / consolidate_lora"
        )


def refuse_bypassing_kernels(model: nn.Module, config: Any) -> None:
    """A fused chain whose kernel reads weights directly would skip a LoRA inside it."""
    for path, chain in model.named_modules():
        if not isinstance(chain, FusedChain) or chain.honours_wrappers:
            continue
        inside = [
            p
            for p, _ in chain.named_modules(prefix=path)
            if p != path and check_target_module_exists(config, p)
        ]
        if inside:
            raise AdapterError(
                f"{inside[0]} is inside the fused chain at {path}, which runs kernel {chain.kernel_name!r}; that "
                "kernel reads weights directly and would skip the LoRA. Use splice.kernels.use_kernel(model, None) "
                "(or 'compiled') first"
            )


class VirtualLinearLora(LoraLinear):
    """PEFT's `lora.Linear` around a `LinearStandIn`, under the original module's name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the real weights are nn.Linear [out, in] even where the original was a Conv1D (fan_in_fan_out)
        self.fan_in_fan_out = False

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        refuse_inexact(config, self.get_base_layer(), kwargs.get("target_name") or type(self).__name__)
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _weight_rows(self) -> list[tuple[torch.Tensor, torch.Tensor | None, slice, Any]]:
        """``(weight, bias, rows of that weight, rows of this layer's output)`` for each real weight read."""
        return [(r.weight, r.bias, r.rows, r.out) for r in self.get_base_layer().weight_rows()]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """PEFT's merge, written into the rows of the real weights (same arithmetic, so same bits)."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A.keys():
                continue
            delta = self.get_delta_weight(adapter)
            bias_delta = self._bias_delta(adapter)
            rows = self._weight_rows()
            if safe_merge:
                merged = []
                for weight, bias, own, out in rows:
                    new_weight = weight.data[own].clone()
                    new_weight += delta[out].to(new_weight.dtype)
                    new_bias = None if bias_delta is None else (bias[own] + bias_delta[out]).to(bias.dtype)
                    for tensor in (new_weight, new_bias):
                        if tensor is not None and not torch.isfinite(tensor).all():
                            raise ValueError(
                                f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken"
                            )
                    merged.append((weight, bias, own, new_weight, new_bias))
                for weight, bias, own, new_weight, new_bias in merged:
                    weight.data[own] = new_weight
                    if new_bias is not None:
                        bias.data[own] = new_bias
            else:
                for weight, bias, own, out in rows:
                    weight.data[own] += delta[out]
                    if bias_delta is not None:
                        bias.data[own] += bias_delta[out]
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A.keys():
                continue
            delta = self.get_delta_weight(adapter)
            bias_delta = self._bias_delta(adapter)
            for weight, bias, own, out in self._weight_rows():
                weight.data[own] -= delta[out].to(weight.dtype)
                if bias_delta is not None:
                    bias.data[own] -= bias_delta[out]

    def _bias_delta(self, adapter: str) -> torch.Tensor | None:
        if not self.lora_bias[adapter]:
            return None
        if any(bias is None for _, bias, _, _ in self._weight_rows()):
            raise RuntimeError(
                "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias."
            )
        return self.lora_B[adapter].bias * self.scaling[adapter]


def register(config: Any) -> Any:
    """Let PEFT wrap splice's stand-ins when it applies ``config`` (per config: nothing global changes)."""
    config._register_custom_module({LinearStandIn: VirtualLinearLora})  # PEFT dispatches by isinstance
    return config
