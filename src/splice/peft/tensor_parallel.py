"""LoRA on a model loaded tensor-parallel by splice: PEFT's layers with DTensor factors.

`prepare` runs before PEFT builds the LoRA layers of a config. It marks every sharded Linear a LoRA may
wrap with its `splice.parallel.lora_sharding.LoraSharding`, refuses targets that cannot carry one (a
fused Linear, a vocabulary-parallel embedding), and registers on the config (per config, nothing
global) the layer classes below. They are PEFT's `lora.Linear` and splice's `VirtualLinearLora` with
two changes: the factors are made at the base's *original* sizes, so that PEFT initializes them
exactly as on one process (same shapes, same random draws in the same order), and are then laid out
and cut like the base weight as DTensors whose Linears carry the base's parallel style. Forward and
backward are PEFT's own.

`gather` (saving, collective) and `lay_out` (loading) convert between those DTensors and the
one-process tensors that splice.peft's saving and loading plans work on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from splice.fusion.contract import LinearStandIn
from splice.parallel.lora_sharding import (
    TensorParallelLora,
    gather_lora,
    lay_out_state,
    shard_factors,
    tensor_parallel_lora,
)
from splice.peft.addresses import base_model
from splice.peft.errors import AdapterError
from splice.peft.layer import EXACT_INITS, VirtualLinearLora, active_variants, refuse_sharded

SHARDING_ATTR = "splice_lora_sharding"  # on a sharded base module's __dict__: its LoraSharding


def refuse_unsupported_sharding(model: nn.Module) -> None:
    """A model splice loaded tensor-parallel takes LoRA (see `prepare`); other DTensor weights do not."""
    if tensor_parallel(model) is None:
        refuse_sharded(model)


def tensor_parallel(model: nn.Module) -> TensorParallelLora | None:
    """The LoRA shardings of a (possibly PEFT-wrapped) model loaded tensor-parallel; None otherwise."""
    return tensor_parallel_lora(base_model(model))


def prepare(model: nn.Module, config: Any) -> None:
    """Before PEFT applies ``config`` (runtime names) to a tensor-parallel model: check it, register the layers."""
    from peft.tuners.tuners_utils import check_target_module_exists

    tp = tensor_parallel(model)
    if tp is None:
        return
    for path, reason in tp.unsupported.items():
        if check_target_module_exists(config, path):
            raise AdapterError(f"{path}: LoRA under tensor parallelism cannot wrap it: it is {reason}")
    variants = active_variants(config)
    if variants or config.init_lora_weights not in EXACT_INITS:
        what = ", ".join(variants) or f"init_lora_weights={config.init_lora_weights!r}"
        raise AdapterError(
            f"{what} is not supported under tensor parallelism: it reads or rewrites the base weight, of which "
            f"each rank holds a piece; use init_lora_weights in {EXACT_INITS} without variants"
        )
    if config.lora_bias:
        raise AdapterError(
            "lora_bias=True is not supported under tensor parallelism (its bias is not sharded)"
        )
    modules = dict(base_model(model).named_modules())
    for path, sharding in tp.shardings.items():
        base = modules[path]
        while hasattr(base, "base_layer"):  # a LoRA layer PEFT already put there
            base = base.base_layer
        base.__dict__[SHARDING_ATTR] = sharding
    config._register_custom_module({LinearStandIn: ShardedVirtualLora, nn.Linear: ShardedLinearLora})


def gather(peft_model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every DTensor factor as its one-process tensor (collective; a model without TP: as is)."""
    tp = tensor_parallel(peft_model)
    return state if tp is None else gather_lora(tp, state)


def lay_out(peft_model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One-process adapter tensors with the factors of sharded Linears as this rank's DTensors."""
    tp = tensor_parallel(peft_model)
    return state if tp is None else lay_out_state(tp, state)


def write_once(peft_model: nn.Module, write: Callable[..., None], *args: Any) -> None:
    """``write(*args)`` on global rank 0 only under TP (every rank calls this; all return or all raise)."""
    import torch.distributed as dist

    if tensor_parallel(peft_model) is None:
        write(*args)
        return
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            write(*args)
        except Exception as exc:  # every rank must learn of it, so none goes on as if it were written
            error = exc
    outcomes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if outcomes[0] is not None:
        raise AdapterError(f"save_adapter failed on rank 0, which writes the adapter: {outcomes[0]}")


class _Sharded:
    """Made at the base's original sizes, then laid out like the base (see the module docstring)."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        sharding = module.__dict__.get(SHARDING_ATTR)
        if sharding is None:
            return super()._get_in_out_features(module)  # type: ignore[misc]
        return sharding.in_features, sharding.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        base = self.get_base_layer()  # type: ignore[attr-defined]
        sharding = base.__dict__.get(SHARDING_ATTR)
        if sharding is None and _is_sharded(base):
            raise AdapterError(
                f"{kwargs.get('target_name') or type(base).__name__}: its weight is sharded, but splice has no "
                "LoRA layout for it (pass the model splice loaded tensor-parallel to splice.peft)"
            )
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)  # type: ignore[misc]
        if sharding is not None:
            shard_factors(sharding, self.lora_A[adapter_name], self.lora_B[adapter_name])  # type: ignore[attr-defined]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if SHARDING_ATTR in self.get_base_layer().__dict__:  # type: ignore[attr-defined]
            raise AdapterError(
                "merging a LoRA into a tensor-parallel base weight is not supported; save the adapter "
                "(splice.peft.save_adapter) and merge it on the unsharded model"
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)  # type: ignore[misc]


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


class ShardedLinearLora(_Sharded, LoraLinear):
    """PEFT's `lora.Linear`, with DTensor factors when its base Linear is sharded."""


class ShardedVirtualLora(_Sharded, VirtualLinearLora):
    """splice's `VirtualLinearLora` on a slice of a fused Linear, with DTensor factors when that is sharded."""
