"""LoRA factors on a tensor-parallel model: DTensor parameters laid out like their base weight, and back.

`splice.parallel.lora` has the maths (which factor is cut, how the base's kv replicas and zero padding
carry over); this module applies it to live parameters. For every sharded Linear a LoRA may wrap, a
`LoraSharding` says how: a column-parallel base (a q/k/v or gate/up slice of a fused Linear, or a plain
colwise Linear) gets ``A`` replicated and ``B`` laid out like the base's rows and cut ``Shard(0)``; a
row-parallel base gets ``A`` laid out like the base's columns and cut ``Shard(1)``, ``B`` replicated.

The cut factor's Linear gets the base's own ``torch.distributed.tensor.parallel`` style, so it takes
and returns what the base does (``ColwiseParallel``'s input hook sums the input gradient over the
ranks, ``RowwiseParallel`` all-reduces the partial ``A x`` before ``B``); the replicated factor is a
``Replicate()`` DTensor that computes on plain local tensors. With that, autograd gives every factor
the gradient of the single-process model, except the rows of ``B`` that hold a replicated kv head:
each copy sees only its rank's queries, so they are summed over the replicas by the same hook the
base weights use. Padding stays zero: its rows meet zero activations and zero gradients.

`gather_lora` is the inverse for saving (collective): it consolidates every rank's pieces with
`splice.parallel.lora.consolidate_lora`, refusing replicas that trained apart and padding that is no
longer zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from splice.errors import SpliceError
from splice.parallel.layout import chunk_bounds
from splice.parallel.load import replica_group, summing
from splice.parallel.lora import base_of, consolidate_lora
from splice.parallel.sharding import COLUMN, EMBEDDING, ROW
from splice.parallel.state import STATE_ATTR
from splice.parallel.styles import torch_style
from splice.transforms import Op, TensorMeta, apply_ops, infer_ops, invert_ops

__all__ = [
    "LoraSharding",
    "clip_grad_norm_",
    "TensorParallelLora",
    "gather_lora",
    "lay_out",
    "lay_out_state",
    "shard_factors",
    "tensor_parallel_lora",
]


@dataclass
class _ReplicaGroups:
    """Process groups of kv-head replicas, made once per model (making one is collective)."""

    mesh: Any
    groups: dict[tuple[int, int], Any] = field(default_factory=dict)

    def get(self, blocks: int, times: int) -> Any:
        if (blocks, times) not in self.groups:
            self.groups[(blocks, times)] = replica_group(self.mesh, blocks, times)
        return self.groups[(blocks, times)]


@dataclass(frozen=True)
class LoraSharding:
    """How the LoRA factors of one sharded base Linear are laid out and cut."""

    path: str  # the base module's runtime path (a slice of a fused Linear sits at its original name)
    kind: str  # "column" | "row"
    ops: tuple[Op, ...]  # the base weight's layout ops: kv replicas, padding (dim 0 column, dim 1 row)
    style: str  # the base's TP plan style; a slice takes its fused Linear's
    in_features: int  # the base's original sizes: what the factors are made with, as on one process
    out_features: int
    replicas: int  # column parts: copies of each kv block (1: none)
    blocks: int
    groups: _ReplicaGroups = field(repr=False, compare=False)

    @property
    def mesh(self) -> Any:
        return self.groups.mesh

    @property
    def cut(self) -> tuple[str, int]:
        """The cut factor (``lora_A`` / ``lora_B``) and its cut dim."""
        return ("lora_B", 0) if self.kind == "column" else ("lora_A", 1)


@dataclass
class TensorParallelLora:
    """The LoRA shardings of one tensor-parallel model, and the sharded modules a LoRA cannot wrap (why not)."""

    layout: Any  # splice.parallel.sharding.TPLayout
    mesh: Any
    shardings: dict[str, LoraSharding]
    unsupported: dict[str, str]


def tensor_parallel_lora(model: nn.Module) -> TensorParallelLora | None:
    """The LoRA shardings of a model loaded tensor-parallel by splice; None for any other model."""
    parallel = model.__dict__.get(STATE_ATTR)
    if parallel is None:
        return None
    cached = model.__dict__.get(_CACHE_ATTR)
    if cached is not None:
        return cached
    layout, mesh = parallel.layout, parallel.mesh
    groups = _ReplicaGroups(mesh)
    modules = dict(model.named_modules())
    shardings: dict[str, LoraSharding] = {}
    unsupported: dict[str, str] = {}
    for group in layout.groups:
        prefix = f"{group.path}." if group.path else ""
        fused = prefix + group.fused_name if group.fused_name else None
        if fused is not None:
            unsupported[fused] = (
                "a fused Linear, whose rows are interleaved per rank under tensor parallelism; target its "
                "parts by their original names (load_adapter with fuse_lora=False)"
            )
        for part in group.parts:
            path = prefix + part.part.name
            shardings[path] = LoraSharding(
                path=path,
                kind="column",
                ops=part.ops,
                style=layout.styles[fused if fused is not None else path],
                in_features=modules[path].in_features,
                out_features=part.part.rows,
                replicas=part.replicas,
                blocks=part.blocks,
                groups=groups,
            )
    for path, style in layout.styles.items():
        if path in shardings or path in unsupported:
            continue
        if style in EMBEDDING:
            unsupported[path] = "a vocabulary-parallel embedding; LoRA on it is not supported under TP"
            continue
        if style not in COLUMN | ROW:
            continue
        kind, ops = base_of(layout, path)
        weight = modules[path].weight
        [original] = infer_ops(invert_ops(ops), [TensorMeta(tuple(weight.shape), weight.dtype)])
        out_features, in_features = original.shape
        shardings[path] = LoraSharding(path, kind, ops, style, in_features, out_features, 1, 0, groups)
    found = TensorParallelLora(layout, mesh, shardings, unsupported)
    model.__dict__[_CACHE_ATTR] = found
    return found


_CACHE_ATTR = "_splice_tp_lora"


# --------------------------------------------------------------------------------------------------
# laying out factors


def lay_out(sharding: LoraSharding, factor: str, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's DTensor of one factor (``lora_A`` / ``lora_B``) given in its original, one-process shape."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = sharding.mesh
    cut, dim = sharding.cut
    tensor = tensor.detach()
    if factor != cut:
        return DTensor.from_local(tensor.contiguous().clone(), mesh, [Replicate()], run_check=False)
    laid_out = apply_ops(sharding.ops, [tensor])[0] if sharding.ops else tensor
    a, b = chunk_bounds(laid_out.shape[dim], mesh.size())[mesh.get_local_rank()]
    local = laid_out.narrow(dim, a, b - a).contiguous().clone()
    return DTensor.from_local(
        local, mesh, [Shard(dim)], run_check=False, shape=laid_out.shape, stride=laid_out.stride()
    )


def shard_factors(sharding: LoraSharding, lora_A: nn.Linear, lora_B: nn.Linear) -> None:
    """Turn one LoRA's plain factors (original shapes) into DTensors and give their Linears TP styles.

    The cut factor's Linear gets the base's parallel style; the replicated one computes on local
    tensors. Each parameter keeps its ``requires_grad``. A ``B`` whose rows are a replicated kv head
    becomes a `ReplicaRowsLinear`, whose backward sums their gradient over the replicas.
    """
    from torch.distributed.tensor import distribute_module
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = sharding.mesh
    cut, _ = sharding.cut
    modules = {"lora_A": lora_A, "lora_B": lora_B}
    trainable = {}
    for factor, module in modules.items():
        if module.bias is not None:
            raise SpliceError(
                f"{sharding.path}: a LoRA factor with a bias (lora_bias) is not supported under TP"
            )
        trainable[factor] = module.weight.requires_grad
        module.weight = nn.Parameter(lay_out(sharding, factor, module.weight))
    parallelize_module(modules[cut], mesh, torch_style(sharding.style))  # wraps its weight anew
    replicated = modules["lora_B" if cut == "lora_A" else "lora_A"]
    distribute_module(replicated, mesh, None, _replicated_input, _local_output)
    for factor, module in modules.items():
        module.weight.requires_grad_(trainable[factor])
    if sharding.replicas > 1:
        # a hook on the parameter itself would be lost: Module.to() swaps a DTensor parameter's contents
        weight = lora_B.weight
        group = sharding.groups.get(sharding.blocks, sharding.replicas)
        lora_B.__dict__["sum_replicas"] = summing([(0, weight.to_local().shape[0], group)], weight)
        lora_B.__dict__["replicas"] = sharding.replicas
        lora_B.__class__ = ReplicaRowsLinear


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) over a tensor-parallel model's trainable parameters,
    counting each replicated kv row of a LoRA ``B`` once: the norm, and the clipping, of one process.

    torch's own function sees DTensors whose global shape holds every replica, so it counts a
    replicated kv head once per copy. Collective over the tensor-parallel ranks; returns the total norm.
    """
    from torch.distributed.tensor import DTensor, Shard

    # the model splice loaded, or a wrapper around it (a PeftModel): the top-most module holding the TP state
    tp_model = next((m for m in model.modules() if STATE_ATTR in m.__dict__), None)
    if tp_model is None:
        raise SpliceError(
            f"{type(model).__name__} was not loaded tensor-parallel by splice (nor does it wrap one)"
        )
    parallel = tp_model.__dict__[STATE_ATTR]
    replicated_bases = {
        id(parallel_module.weight)
        for group in parallel.layout.groups
        if any(part.replicas > 1 for part in group.parts)
        for parallel_module in _group_linears(tp_model, group)
    }
    copies = {
        id(m.weight): m.__dict__["replicas"] for m in model.modules() if isinstance(m, ReplicaRowsLinear)
    }
    sharded = torch.zeros((), dtype=torch.float64)
    whole = torch.zeros((), dtype=torch.float64)
    grads = []
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        if id(param) in replicated_bases:
            raise SpliceError(
                f"{name} holds replicated kv heads and is trainable; clip_grad_norm_ counts replicas only for LoRA factors"
            )
        grad = param.grad
        if isinstance(grad, DTensor) and grad.placements != param.placements:
            grad = param.grad = grad.redistribute(placements=param.placements)
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        square = local.double().square().sum()
        if isinstance(grad, DTensor) and any(isinstance(p, Shard) for p in grad.placements):
            sharded += square / copies.get(id(param), 1)
        else:
            whole += square
        grads.append(grad)
    dist.all_reduce(sharded, group=parallel.mesh.get_group())
    norm = (sharded + whole).sqrt().float()
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(coefficient.item())
    return norm


def _group_linears(model: nn.Module, group: Any) -> list[nn.Module]:
    parent = model.get_submodule(group.path)
    if group.fused_name is not None:
        return [_unwrap(parent._modules[group.fused_name])]
    return [_unwrap(parent._modules[part.part.name]) for part in group.parts]


def _unwrap(module: nn.Module) -> nn.Module:
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


class ReplicaRowsLinear(nn.Linear):
    """The Linear of a LoRA ``B`` whose local rows are a replicated kv head: backward sums their gradient
    over the replicas (the sum is the one-process gradient; each copy sees only its rank's queries)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = _SumOverReplicas.apply(self.weight, self.__dict__["sum_replicas"])
        return F.linear(input, weight, self.bias)


class _SumOverReplicas(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, weight: torch.Tensor, sum_replicas: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        ctx.sum_replicas = sum_replicas
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.sum_replicas(grad), None


def _replicated_input(module: nn.Module, inputs: tuple[Any, ...], mesh: Any) -> tuple[Any, ...]:
    from torch.distributed.tensor import DTensor, Replicate

    return tuple(
        DTensor.from_local(x, mesh, [Replicate()], run_check=False) if isinstance(x, torch.Tensor) else x
        for x in inputs
    )


def _local_output(module: nn.Module, output: Any, mesh: Any) -> Any:
    return output.to_local()


# --------------------------------------------------------------------------------------------------
# saving


def gather_lora(
    tp_lora: TensorParallelLora, state: Mapping[str, torch.Tensor], prefix: str = "base_model.model."
) -> dict[str, torch.Tensor]:
    """A PEFT adapter state dict with every DTensor factor consolidated into its one-process tensor.

    Collective over the tensor-parallel ranks; every rank gets the same result, or the same error
    (replicas that differ, padding that is not zero). Keys are PEFT's (``{prefix}{path}.lora_A.weight``).
    """
    from torch.distributed.tensor import DTensor

    modules: dict[str, None] = {}
    local: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not isinstance(tensor, DTensor):
            continue
        path, _, factor = key.removeprefix(prefix).rpartition(".lora_")
        if factor not in ("A.weight", "B.weight") or path not in tp_lora.shardings:
            raise SpliceError(
                f"{key} is sharded over the tensor-parallel ranks, but only LoRA factors (lora_A / lora_B "
                "weights of a sharded Linear) can be consolidated; modules_to_save and trainable tokens "
                "on sharded modules are not supported under TP"
            )
        modules[path] = None
        local[key] = tensor.to_local().detach().cpu()
    if not modules:
        return dict(state)
    pieces: list[dict[str, torch.Tensor] | None] = [None] * tp_lora.mesh.size()
    dist.all_gather_object(pieces, local, group=tp_lora.mesh.get_group())
    vanilla = consolidate_lora(
        tp_lora.layout, pieces, list(modules), lambda module, factor: f"{prefix}{module}.{factor}.weight"
    )
    return {k: vanilla.get(k, v) for k, v in state.items()}


def lay_out_state(
    tp_lora: TensorParallelLora, state: Mapping[str, torch.Tensor], prefix: str = "base_model.model."
) -> dict[str, torch.Tensor]:
    """A one-process PEFT adapter state dict with the factors of sharded Linears as this rank's DTensors."""
    out = {}
    for key, tensor in state.items():
        path, _, factor = key.removeprefix(prefix).rpartition(".lora_")
        sharding = tp_lora.shardings.get(path) if key.startswith(prefix) else None
        if sharding is not None and factor in ("A.weight", "B.weight"):
            tensor = lay_out(sharding, f"lora_{factor[0]}", tensor)
        out[key] = tensor
    return out
