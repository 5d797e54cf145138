"""The TP styles splice installs: torch's ``ColwiseParallel`` / ``RowwiseParallel``, with a local inference path.

Training runs torch's styles unchanged: inputs become DTensors, DTensor runs every op and every
collective, forward and backward. Under ``torch.no_grad()`` / ``torch.inference_mode()`` that costs a
sharding propagation, a ``from_local`` and a ``redistribute`` per Linear for nothing, since no backward
will need the placements. There, as transformers' own TP does, a plain Linear or Embedding runs on its
local shard:

- column-parallel (input replicated): ``F.linear`` of the plain input with the rank's rows of the weight
  and bias; the output stays this rank's features (``colwise``), or one ``all_gather`` joins them
  (``colwise_rep``, an ``lm_head``);
- row-parallel (input ``Shard(-1)``, output replicated): ``F.linear`` with the rank's columns, one
  in-place ``all_reduce``, then the (replicated) bias;
- vocab-parallel Embedding (rows ``Shard(0)``): ids outside the rank's rows look up row 0 and are
  zeroed, then one ``all_reduce``, as DTensor's masked lookup does.

The results are the DTensor path's bit for bit (the same local matmuls, the same reduction), and a
DTensor input, grad mode, or a module whose class has its own ``forward`` (or got one since: a LoRA
factor of replicated kv rows) take torch's path. The parameters stay DTensors
throughout: state dicts, DCP and ``save_pretrained`` see no difference.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from splice.errors import LoadError

__all__ = ["LocalColwiseParallel", "LocalRowwiseParallel", "torch_style"]

_LOCAL = "_splice_local_tp"
"""Set on a module whose forward runs on local shards when no gradient is recorded ("column", "row", "embedding")."""


_CLASS_FORWARD = {"column": nn.Linear.forward, "row": nn.Linear.forward, "embedding": nn.Embedding.forward}


def _runs_local(module: nn.Module) -> bool:
    """Whether the module still has the forward its local path replaces (its class may have changed since)."""
    kind = getattr(module, _LOCAL, None)
    return kind is not None and type(module).forward is _CLASS_FORWARD[kind]


def _local(module: nn.Module, x: Any) -> bool:
    return not torch.is_grad_enabled() and not isinstance(x, DTensor) and _runs_local(module)


class LocalColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` that, with no gradient recorded, multiplies a plain input by the local rows."""

    @staticmethod
    def _prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh):
        if _local(mod, inputs[0]):
            return inputs
        return ColwiseParallel._prepare_input_fn(
            input_layouts, desired_input_layouts, mod, inputs, device_mesh
        )

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        if isinstance(outputs, DTensor) or not _runs_local(mod):
            return ColwiseParallel._prepare_output_fn(
                output_layouts, use_local_output, mod, outputs, device_mesh
            )
        if output_layouts == (Replicate(),):  # colwise_rep (an lm_head): every rank's output features
            return _gather_last_dim(outputs, mod.weight.shape[0], device_mesh)
        return outputs  # this rank's output features, as use_local_output asks

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        module = super()._apply(module, device_mesh)
        keeps = self.use_local_output and self.output_layouts in ((Shard(-1),), (Replicate(),))
        if keeps and self.input_layouts == (Replicate(),) and type(module).forward is nn.Linear.forward:
            _install(module, "column", _column_forward)
        return module


class LocalRowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` that, with no gradient recorded, multiplies by the local columns and all-reduces."""

    @staticmethod
    def _prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh):
        if _local(mod, inputs[0]):
            return inputs
        return RowwiseParallel._prepare_input_fn(
            input_layouts, desired_input_layouts, mod, inputs, device_mesh
        )

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        if isinstance(outputs, DTensor) or not _runs_local(mod):
            return RowwiseParallel._prepare_output_fn(
                output_layouts, use_local_output, mod, outputs, device_mesh
            )
        dist.all_reduce(outputs, group=device_mesh.get_group())  # the partial sums of every rank's columns
        bias = getattr(mod, "bias", None) if isinstance(mod, nn.Linear) else None
        return outputs if bias is None else outputs + bias.to_local()

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        module = super()._apply(module, device_mesh)
        if not self.use_local_output or self.output_layouts != (Replicate(),):
            return module
        if self.input_layouts == (Shard(-1),) and type(module).forward is nn.Linear.forward:
            _install(module, "row", _row_forward)
        elif (
            type(module).forward is nn.Embedding.forward
            and module.max_norm is None
            and module.weight.placements == (Shard(0),)
        ):
            _install(module, "embedding", _embedding_forward)
        return module


def _install(module: nn.Module, kind: str, forward) -> None:
    setattr(module, _LOCAL, kind)
    # a bound method, so a deep copy of the model binds its copy of the module
    module.forward = types.MethodType(forward, module)


def _column_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if isinstance(x, DTensor) or not _runs_local(self):
        return type(self).forward(self, x)
    bias = None if self.bias is None else self.bias.to_local()
    return F.linear(x, self.weight.to_local(), bias)


def _row_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if isinstance(x, DTensor) or not _runs_local(self):
        return type(self).forward(self, x)
    return F.linear(x, self.weight.to_local())  # the bias is added once, after the all-reduce


def _embedding_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(ids, DTensor) or not _runs_local(self):
        return type(self).forward(self, ids)
    local = self.weight.to_local()
    start = _first_row(self.weight)
    outside = (ids < start) | (ids >= start + local.shape[0])
    rows = F.embedding((ids - start).masked_fill(outside, 0), local)
    return rows.masked_fill_(outside.unsqueeze(-1), 0)  # every row is some rank's: the all-reduce fills it


def _gather_last_dim(local: torch.Tensor, size: int, mesh) -> torch.Tensor:
    """Every rank's piece of the last dim (``ceil(size / ranks)`` each, the last ones shorter), in rank order."""
    step = -(-size // mesh.size())
    padded = F.pad(local, (0, step - local.shape[-1]))
    pieces = [torch.empty_like(padded) for _ in range(mesh.size())]
    dist.all_gather(pieces, padded.contiguous(), group=mesh.get_group())
    return torch.cat(pieces, dim=-1)[..., :size]


def _first_row(weight: DTensor) -> int:
    """The first global row of this rank's ``Shard(0)`` piece (pieces of ``ceil(rows / ranks)``, as DTensor cuts)."""
    mesh = weight.device_mesh
    step = -(-weight.shape[0] // mesh.size())
    return min(mesh.get_local_rank() * step, weight.shape[0])


def torch_style(style: str):
    """The parallel style for a Transformers plan style name: torch's, with the local inference path."""
    if style == "colwise":
        return LocalColwiseParallel()
    if style in ("colwise_gather_output", "colwise_rep"):
        return LocalColwiseParallel(output_layouts=Replicate())
    if style == "rowwise":
        return LocalRowwiseParallel()
    if style in ("rowwise_rep", "rowwise_split_input", "embedding_rowwise"):
        return LocalRowwiseParallel(input_layouts=Replicate())
    raise LoadError(f"no torch parallel style for {style!r}")
