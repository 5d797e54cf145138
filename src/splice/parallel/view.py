"""The original layout of a sharded fused model, as DTensors that alias the fused parameters (FSDP2, DCP).

Under FSDP2 (``fully_shard``) a fused ``qkv_proj.weight`` is a DTensor cut along rows: rank ``r`` holds
rows ``[a, b)`` of ``[q | k | v]``. Those rows are, piece by piece, row ranges of ``q_proj``, ``k_proj`` and
``v_proj``, so the original layout needs no data moved at all: rank ``r``'s part of ``k_proj.weight`` is a
view of its local rows of ``qkv_proj.weight``, at an offset into ``k_proj`` that no ``Shard(0)`` placement
of ``k_proj`` would give. torch.distributed.checkpoint plans reads and writes from chunk lists, which a
tensor may describe itself (``__create_chunk_list__``, ``__create_write_items__``,
``__get_tensor_shard__``); :class:`RowPieces` is the local tensor that does, so

- ``dcp.save(view, ...)`` writes each rank's rows once, from the parameters' own memory, and
- ``dcp.load(view, ...)`` reads into those views, filling the fused, sharded parameters in place, each
  rank reading only its rows of the original tensors.

Which original rows a rank's rows are is :func:`splice.parallel.layout.local_reads`: the fusion's own
ops run on row numbers. A family whose ops are neither renames nor row moves (``patch_embeddings``
reshapes) is refused by name: ``splice.save_pretrained`` still saves such a model (it gathers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splice.checkpoint import DTYPE_OF_TAG
from splice.errors import FusionError
from splice.fusion.surgery import get_state, require_module
from splice.fusion.surgery import original_state_dict as _plain_original_state_dict
from splice.parallel.block_reads import block_reads
from splice.parallel.layout import local_reads, traceable
from splice.parallel.state import STATE_ATTR
from splice.transforms import TensorMeta

__all__ = ["RowPieces", "is_sharded", "original_state_dict"]


def is_sharded(state_dict: dict[str, Any]) -> bool:
    """Whether any value is a DTensor (FSDP2, TP, or both)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(v, DTensor) for v in state_dict.values())


def original_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's state dict in the layout it had before fusing (the checkpoint's layout).

    On a model whose parameters are DTensors (``fully_shard``, splice's tensor parallelism, or both), the
    result holds DTensors in the original layout with only this rank's rows, as views of the fused
    parameters: ``dcp.save`` / ``dcp.load`` it (with ``HuggingFaceStorageWriter`` /
    ``HuggingFaceStorageReader`` for the Hugging Face format). No collective runs and nothing is
    gathered. Otherwise it is :func:`splice.fusion.original_state_dict`.
    """
    require_module(model, "splice.original_state_dict")
    runtime = model.state_dict(keep_vars=True) if state_dict is None else state_dict
    if not is_sharded(runtime):
        return _plain_original_state_dict(model, state_dict)
    runtime = {k: v.detach() for k, v in runtime.items()}
    parallel = model.__dict__.get(STATE_ATTR)
    if parallel is not None:  # loaded tensor-parallel by splice: checkpoint keys -> TP-global layout
        metas = {
            k: TensorMeta(tuple(shape), DTYPE_OF_TAG[tag])
            for k, (tag, shape) in parallel.source["tensors"].items()
        }
        plan = parallel.checkpoint_map.compile(list(metas), metas)
        out = {k: v for k, v in runtime.items() if k not in plan.target_metas}
        for step in plan.steps:
            _view_step(step, "", runtime, out, "tensor-parallel layout")
        return out
    state = get_state(model)
    if state is None or not state.records:
        return runtime
    out = dict(runtime)
    for record in state.records:
        prefix = f"{record.path}." if record.path else ""
        for step in record.program.steps:
            if step.rule is not None:
                _view_step(step, prefix, runtime, out, f"{record.family!r} at {record.path or '<root>'}")
    order = {k: i for i, k in enumerate(state.original_keys)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


def _view_step(step: Any, prefix: str, runtime: dict[str, Any], out: dict[str, Any], where: str) -> None:
    """Replace ``step``'s runtime tensors in ``out`` by views of its source tensors (this rank's pieces)."""
    missing = [prefix + k for k in step.targets if prefix + k not in runtime]
    if missing:
        raise FusionError(f"{where}: the state dict has no {missing[0]}")
    for key in step.targets:
        out.pop(prefix + key, None)
    if step.is_rename:
        out[prefix + step.sources[0]] = runtime[prefix + step.targets[0]]
        return
    pieces: dict[str, list[tuple[torch.Tensor, tuple[int, ...]]]] = {k: [] for k in step.sources}
    for key in step.targets:
        for source, piece, offsets in _rows(step, key, runtime[prefix + key], where):
            pieces[source].append((piece, offsets))
    like = runtime[prefix + step.targets[0]]
    for source, meta in zip(step.sources, step.source_metas):
        out[prefix + source] = _dtensor(pieces[source], meta.shape, like)


def _rows(step: Any, key: str, tensor: torch.Tensor, where: str) -> list[tuple[str, torch.Tensor, tuple]]:
    """``(source, view of local rows, offsets into source)`` for every piece of this rank's part of ``key``.

    The pieces run along the one dim the step's ops move slices of (rows for fused q/k/v, columns for a
    row-parallel weight padded under TP); every other dim keeps this rank's offsets.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        raise FusionError(f"{where}: {key} is not sharded while other tensors are; shard every fused module")
    (chunk,) = tensor.__create_chunk_list__()
    offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
    dims = [d for d in range(len(sizes)) if traceable(step, d)]
    boxes = None if dims else _boxes(step, key, tensor, offsets, sizes)
    if boxes is not None:
        return boxes
    if not dims:
        raise FusionError(
            f"{where}: its tensors are not row ranges of the fused ones, so a sharded original-layout view "
            "cannot alias them; splice.save_pretrained(model, out) still saves the model (it gathers)"
        )
    dim = dims[0]
    reads = local_reads(step, key, dim, (offsets[dim], offsets[dim] + sizes[dim]))
    local = tensor.to_local()
    return [
        (
            r.source,
            local.narrow(dim, r.at, r.rows),
            tuple(r.start if d == dim else o for d, o in enumerate(offsets)),
        )
        for r in reads
        if r.source is not None  # padding belongs to no original tensor
    ]


def _boxes(step: Any, key: str, tensor: Any, offsets: tuple, sizes: tuple) -> list[tuple] | None:
    """MoE experts: this rank's boxes of per-expert tensors (`block_reads`), each a view of its local piece."""
    cut = [d for d in range(len(sizes)) if sizes[d] != tensor.shape[d]]
    if len(cut) != 1 or any(offsets[d] for d in range(len(sizes)) if d != cut[0]):
        return None
    [dim] = cut
    blocks = block_reads(step, key, dim, (offsets[dim], offsets[dim] + sizes[dim]))
    if blocks is None:
        return None
    local = tensor.to_local()
    return [
        (
            b.source,
            local[b.at].view([s.stop - s.start for s in b.source_index]),
            tuple(s.start for s in b.source_index),
        )
        for b in blocks
    ]


def _dtensor(pieces: list[tuple[torch.Tensor, tuple]], shape: tuple[int, ...], like: torch.Tensor) -> Any:
    from torch.distributed.tensor import DTensor

    local = RowPieces(pieces, like.to_local())
    shape = torch.Size(shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=shape, stride=stride
    )


class RowPieces(torch.Tensor):
    """A rank's pieces of one original tensor, each a view at its own offset; what DCP plans reads and writes by.

    Only checkpointing reads it: any other op raises (the pieces are not one contiguous shard).
    """

    _pieces: list[torch.Tensor]
    _chunks: list[Any]

    @staticmethod
    def __new__(cls, pieces: list[tuple[torch.Tensor, tuple]], like: torch.Tensor) -> RowPieces:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        rows = sum(p.shape[0] for p, _ in pieces)
        size = (rows, *like.shape[1:]) if like.dim() else like.shape
        r = torch.Tensor._make_wrapper_subclass(cls, torch.Size(size), dtype=like.dtype, device=like.device)
        r._pieces = [p for p, _ in pieces]
        r._chunks = [
            ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(p.shape)) for p, o in pieces
        ]
        return r

    @property
    def pieces(self) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """``(view, offsets)`` of each piece: views of the fused parameter, offsets into the original tensor."""
        return [(p, tuple(c.offsets)) for p, c in zip(self._pieces, self._chunks)]

    @property
    def nbytes_local(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._pieces)

    def __repr__(self) -> str:  # type: ignore[override]
        return f"RowPieces({[(tuple(c.offsets), tuple(c.sizes)) for c in self._chunks]})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default, torch.ops.aten.view.default):
            self = args[0]
            new = RowPieces.__new__(RowPieces, [], self)
            new._pieces, new._chunks = list(self._pieces), list(self._chunks)
            return new
        raise NotImplementedError(
            f"{func} on a piece of splice's original-layout view: it is for torch.distributed.checkpoint only"
        )

    # torch.distributed.checkpoint's hooks (see torch/distributed/checkpoint/planner_helpers.py)

    def __create_write_items__(self, fqn: str, object: Any) -> list[Any]:
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        properties = TensorProperties(dtype=self.dtype)
        return [
            WriteItem(
                index=MetadataIndex(fqn, chunk.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=chunk, properties=properties, size=object.size()),
            )
            for chunk in self._chunks
        ]

    def __create_chunk_list__(self) -> list[Any]:
        return list(self._chunks)

    def __get_tensor_shard__(self, index: Any) -> torch.Tensor:
        for piece, chunk in zip(self._pieces, self._chunks):
            if tuple(chunk.offsets) == tuple(index.offset):
                return piece
        raise ValueError(f"no piece of {index.fqn} at offset {index.offset} on this rank")
