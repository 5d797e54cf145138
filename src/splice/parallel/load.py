"""``splice.from_pretrained(..., tp_plan="auto")``: each rank reads its own slices of the original checkpoint.

The model is built on the meta device and fused there (`splice.hf.load.prepare`, passed in). The model's TP
plan is rewritten for the fused layout (`splice.parallel.sharding`), and one WeightMap is compiled from the
checkpoint's keys to the *TP-global* keys: transformers' renames, the fusion undone, then the TP layout
(parts made divisible, fused parts interleaved per rank). For each sharded weight the rank runs that
step's ops on row numbers (`splice.parallel.layout.local_reads`) to learn which rows of which
checkpoint tensors make up its shard, and reads exactly those with `CheckpointReader.read_into`,
straight into the local tensor. Nothing else of the checkpoint is read; no full tensor is built.

The local tensors become DTensor parameters (``Shard(0)`` column-parallel, ``Shard(1)`` row-parallel),
and `torch.distributed.tensor.parallel.parallelize_module` installs the standard ``ColwiseParallel`` /
``RowwiseParallel`` styles, so DTensor does every forward and backward collective.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from splice.checkpoint import CheckpointReader
from splice.errors import LoadError, WeightMapError
from splice.loading.place import load_step, remember_source, set_tensor
from splice.loading.prepared import Prepared
from splice.loading.request import LoadRequest
from splice.loading.strict import check_plan, needed_steps
from splice.parallel.block_reads import block_reads, fill_blocks
from splice.parallel.experts import expert_request, install, split_plan
from splice.parallel.layout import chunk_bounds, local_reads
from splice.parallel.sharding import (
    COLUMN,
    EMBEDDING,
    ROW,
    TPLayout,
    build_layout,
    localize,
    model_plan,
    resolve_styles,
)
from splice.parallel.state import ParallelState, source_layout
from splice.parallel.styles import torch_style
from splice.transforms import TensorMeta
from splice.weightmap import Step

logger = logging.getLogger("splice")

__all__ = ["from_pretrained_tp"]


def from_pretrained_tp(request: LoadRequest, prepare: Callable[[LoadRequest], Prepared]) -> nn.Module:
    """Load a model tensor-parallel over the current process group, in the layout the request's fusion asks for.

    ``splice.from_pretrained`` calls this with its request and its ``prepare`` (which resolves, builds on
    meta, fuses and maps; called once the mesh exists). The request reads as in transformers:
    ``distributed_config=DistributedConfig(tp_size=..., tp_plan=...)`` (or its dict), or the older standalone
    ``tp_plan`` / ``tp_size``, not both (see `_request`). ``tp_plan`` is ``"auto"`` (the model's own plan) or
    a dict of overrides on it, keyed by the original module names (``{"model.layers.*.mlp.down_proj":
    "rowwise"}``). ``device_mesh`` is a 1-D ``DeviceMesh``, or a mesh with a ``"tp"`` dimension (its
    sub-mesh is used). Every rank of the process group must call this.
    """
    overrides, tp_size = _request(request.tp_plan, request.distributed_config, request.tp_size)
    device_mesh = request.device_mesh
    mesh = make_mesh(tp_size) if device_mesh is None else _tp_dimension(device_mesh, tp_size)
    tp, rank = mesh.size(), mesh.get_local_rank()

    prepared = prepare(request)
    model = prepared.model
    num_parameters = sum(p.numel() for p in model.parameters())  # before sharding adds replicas and padding
    plan, experts = split_plan(
        model, {**model_plan(model), **overrides}, expert_request(request.distributed_config), tp
    )
    styles = resolve_styles(model, plan)
    layout = build_layout(model, styles, tp)
    layout.rules, layout.dims = layout.rules.then(experts.rules(tp)), {**layout.dims, **experts.dims()}
    device = torch.device(mesh.device_type) if mesh.device_type == "cpu" else _local_device(mesh)

    with CheckpointReader(prepared.path) as reader:
        prepared.compile(reader)  # strict checks against the runtime layout; fills prepared.dtypes
        metas = reader.metas()
        checkpoint_map = prepared.weight_map.then(layout.runtime_map(model))
        try:
            plan = checkpoint_map.compile(list(metas), metas)
        except WeightMapError as exc:
            raise LoadError(
                f"{prepared.path}: the checkpoint does not fit the tensor-parallel layout: {exc}"
            ) from None
        expected = _expected_metas(model, layout)
        check_plan(plan, expected, prepared.missing_ok, prepared.path, "the tensor-parallel plan")
        steps = needed_steps(plan, expected)
        stats = {"sharded": 0, "replicated": 0, "mapped": 0}
        for step in steps:
            for key, local in _load_local(
                reader, step, expected, layout.dims, tp, rank, prepared.dtypes, stats
            ):
                dim = layout.dims.get(key)
                if local.device != device:
                    local = local.to(device)
                set_tensor(model, key, _distributed(local, dim, expected[key].shape, mesh))
        bytes_read = reader.bytes_read + stats["mapped"]  # mapped pieces are read on first touch
        source = source_layout(reader)
        remember_source(model, reader)  # save_pretrained then writes the source's own split

    model = prepared.finish()
    localize(model, layout)
    parallelize(model, mesh, styles)
    install(model, experts, mesh)
    replica_hooks = sync_replicated_grads(model, layout, mesh)
    state = ParallelState(
        mesh=mesh,
        layout=layout,
        checkpoint_map=checkpoint_map.resolve(metas),
        tensors={k: expected[k] for s in steps for k in s.targets if k in expected},
        source=source,
        num_parameters=num_parameters,
        bytes_read=bytes_read,
        sharded_bytes_read=stats["sharded"],
        replicated_bytes_read=stats["replicated"],
        bytes_mapped=stats["mapped"],
        replica_hooks=replica_hooks,
    )
    state.install(model)
    return model


# --------------------------------------------------------------------------------------------------
# the request and the mesh


def _request(tp_plan: Any, distributed_config: Any, tp_size: int | None) -> tuple[dict[str, str], int | None]:
    """The plan overrides and the TP size, read the way transformers reads them.

    ``distributed_config`` (a ``DistributedConfig`` or its dict) excludes the standalone ``tp_plan`` and
    ``tp_size``. In it, ``tp_plan=None`` with a ``tp_size`` means the model's own plan, and a plan
    without ``tp_size`` spans the world; neither asks for no tensor parallelism at all. ``None`` as
    the size means "the world" (or the given ``device_mesh``).
    """
    if distributed_config is not None:
        if tp_plan is not None or tp_size is not None:
            raise LoadError(
                "pass either distributed_config or the standalone tp_plan / tp_size, not both "
                "(as transformers requires): set tp_plan and tp_size on the DistributedConfig"
            )
        get = distributed_config.get if isinstance(distributed_config, dict) else (
            lambda name, default=None: getattr(distributed_config, name, default)
        )  # fmt: skip
        for name in (
            "fsdp_size",
            "pp_size",
            "dp_replicate_size",
        ):  # ep_size, enable_expert_parallel: parallel.experts
            if (get(name) or 1) != 1:
                raise LoadError(
                    f"distributed_config.{name}={get(name)}: splice's loader does tensor parallelism only"
                )
        tp_plan, tp_size = get("tp_plan"), get("tp_size")
        if tp_plan is None and tp_size is None or tp_size == 1:
            raise LoadError(
                f"distributed_config asks for no tensor parallelism (tp_plan={tp_plan!r}, tp_size={tp_size!r}); "
                "set tp_size (or tp_plan), or call splice.from_pretrained without it for a single-process load"
            )
    if tp_size is not None and (not isinstance(tp_size, int) or tp_size < 1):
        raise LoadError(f"tp_size must be a positive int, got {tp_size!r}")
    if tp_plan is None or tp_plan == "auto":
        return {}, tp_size
    if isinstance(tp_plan, dict):
        return dict(tp_plan), tp_size
    raise LoadError(f'tp_plan must be "auto" or a dict of module pattern -> style, got {tp_plan!r}')


def _tp_dimension(device_mesh, tp_size: int | None):
    """The tensor-parallel ranks of a user's ``device_mesh``: the mesh itself (1-D), or its ``"tp"`` dimension."""
    if device_mesh.ndim > 1:
        names = device_mesh.mesh_dim_names or ()
        if "tp" not in names:
            raise LoadError(
                f"device_mesh is {device_mesh.ndim}-D with dimensions {names}; a mesh of more than one "
                'dimension must name its tensor-parallel dimension "tp"'
            )
        device_mesh = device_mesh["tp"]
    if tp_size is not None and tp_size != device_mesh.size():
        raise LoadError(
            f"tp_size={tp_size} disagrees with the device_mesh's tensor-parallel size {device_mesh.size()}"
        )
    return device_mesh


def make_mesh(tp_size: int | None = None):
    """A 1-D device mesh of ``tp_size`` ranks (default: the whole world), starting the process group if needed.

    With ``tp_size`` smaller than the world, the world is a (data-parallel x tensor-parallel) grid and
    this rank's row is returned.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available():
        raise LoadError("tensor parallelism needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise LoadError(
                "tp_plan needs a torch.distributed process group: launch with torchrun, or call "
                "torch.distributed.init_process_group() first"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    world = dist.get_world_size()
    tp_size = tp_size or world
    if world % tp_size:
        raise LoadError(f"tp_size={tp_size} does not divide the world size {world}")
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    if tp_size == world:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("tp",))
    return init_device_mesh(device_type, (world // tp_size, tp_size), mesh_dim_names=("dp", "tp"))["tp"]


def _local_device(mesh) -> torch.device:
    index = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(torch.cuda.device_count(), 1)))
    return torch.device(mesh.device_type, index)


# --------------------------------------------------------------------------------------------------
# planning the reads


def _expected_metas(model: nn.Module, layout: TPLayout) -> dict[str, TensorMeta]:
    """Shapes of the TP-global tensors (the runtime tensors with padding and replicas)."""
    runtime = {k: TensorMeta.of(t) for k, t in model.state_dict(keep_vars=True).items()}
    return layout.runtime_map(model).compile(list(runtime), runtime).target_metas


def _load_local(
    reader: CheckpointReader,
    step: Step,
    expected: dict[str, TensorMeta],
    dims: dict[str, int],
    tp: int,
    rank: int,
    dtypes: dict[str, torch.dtype],
    stats: dict[str, int],
) -> list[tuple[str, torch.Tensor]]:
    """This rank's piece of each of the step's targets, reading only the rows it needs where the ops allow."""
    targets = [t for t in step.targets if t in expected]
    if all(dims.get(t) is None for t in targets):
        before = reader.bytes_read
        if step.is_rename and all(
            reader.meta(k).dtype == dtypes.get(t) for k, t in zip(step.sources, step.targets)
        ):
            # read rather than mapped (hf's choice): they are small, and bytes_read then counts all a rank takes
            tensors = {t: reader.read_into(k, torch.empty(reader.meta(k).shape, dtype=reader.meta(k).dtype))
                       for k, t in zip(step.sources, step.targets)}  # fmt: skip
        else:
            tensors = dict(zip(step.targets, load_step(reader, step, dtypes)))
        stats["replicated"] += reader.bytes_read - before
        return [(t, tensors[t]) for t in targets]
    out: list[tuple[str, torch.Tensor]] = []
    full: dict[str, torch.Tensor] | None = None
    for target in targets:
        dim = dims.get(target)
        meta = expected[target]
        dtype = dtypes.get(target, meta.dtype)
        before = reader.bytes_read
        reads = None
        if dim is not None:
            bounds = chunk_bounds(meta.shape[dim], tp)[rank]
            reads = local_reads(step, target, dim, bounds)
        blocks = block_reads(step, target, dim, bounds) if reads is None and dim is not None else None
        if blocks is not None:  # boxes of several dims (MoE experts: stacked, then cut along dim 1 or 0)
            shape = list(meta.shape)
            shape[dim] = bounds[1] - bounds[0]
            local = torch.zeros(shape, dtype=dtype)  # what no block covers is padding
            fill_blocks(reader, blocks, local)
            out.append((target, local))
        elif reads is not None:
            shape = list(meta.shape)
            shape[dim] = bounds[1] - bounds[0]
            if _one_mappable_read(reader, reads, dim, shape, dtype):
                # a run of whole rows of one tensor (an embedding's or lm_head's vocab slice): map it, as the
                # single-process loader does; an embedding then pages in only the rows its tokens look up
                read = reads[0]
                local = reader.map(read.source)[read.start : read.stop]
                stats["sharded"] += local.nbytes
                stats["mapped"] += local.nbytes
                out.append((target, local))
                continue
            mapped = reader.bytes_mapped
            local = reader.map_rows([(r.source, r.start, r.stop) for r in reads], dtype) if dim == 0 else None
            if local is not None:
                # rows of several tensors (a fused qkv's q, k and v rows): mapped where the pages line up
                stats["sharded"] += reader.bytes_mapped - mapped + reader.bytes_read - before
                stats["mapped"] += reader.bytes_mapped - mapped
                out.append((target, local))
                continue
            local = torch.empty(shape, dtype=dtype)
            for read in reads:
                view = local.narrow(dim, read.at, read.rows)
                if read.source is None:
                    view.zero_()
                    continue
                index = (slice(None),) * dim + (slice(read.start, read.stop),)
                if reader.meta(read.source).dtype == dtype:
                    reader.read_into(read.source, view, index)
                else:
                    view.copy_(reader.get_slice(read.source)[index])
            out.append((target, local))
        else:  # ops that are not pure row moves (a scale absorbed, a transpose): build the whole, then cut
            if full is None:
                full = dict(zip(step.targets, step.run([reader.get(k) for k in step.sources])))
            tensor = full[target].to(dtype)
            if dim is not None:
                a, b = chunk_bounds(meta.shape[dim], tp)[rank]
                tensor = tensor.narrow(dim, a, b - a)
            out.append((target, tensor.contiguous().clone()))
        stats["sharded" if dim is not None else "replicated"] += reader.bytes_read - before
    return out


def _one_mappable_read(
    reader: CheckpointReader, reads: list[Any], dim: int, shape: list[int], dtype: torch.dtype
) -> bool:
    if dim != 0 or len(reads) != 1 or reads[0].source is None or reads[0].rows != shape[0]:
        return False
    return reader.meta(reads[0].source).dtype == dtype and reader.meta(reads[0].source).numel > 0


def _distributed(local: torch.Tensor, dim: int | None, shape: tuple[int, ...], mesh) -> torch.Tensor:
    if dim is None:
        return local
    from torch.distributed.tensor import DTensor, Shard

    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local, mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape), stride=stride
    )


# --------------------------------------------------------------------------------------------------
# the styles and the replicas


def parallelize(model: nn.Module, mesh, styles: dict[str, str]) -> None:
    """Install ``ColwiseParallel`` / ``RowwiseParallel`` on every sharded module (its weights already are DTensors)."""
    from torch.distributed.tensor.parallel import parallelize_module

    plan = {path: torch_style(s) for path, s in styles.items() if s in COLUMN | ROW | EMBEDDING}
    tied: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    if plan:
        parallelize_module(model, mesh, plan)
    # the styles wrap each module's parameters anew, which would untie shared ones (embeddings and lm_head)
    for first, *others in (names for names in tied.values() if len(names) > 1):
        shared = model.get_parameter(first)
        for name in others:
            path, _, leaf = name.rpartition(".")
            model.get_submodule(path)._parameters[leaf] = shared


def sync_replicated_grads(model: nn.Module, layout: TPLayout, mesh) -> list[Any]:
    """Sum the gradient of every replicated kv head over its replicas, so the replicas stay identical.

    A replica of kv head ``h`` on rank ``r`` only sees the queries of rank ``r``; the true gradient is
    the sum over the replicas. DTensor cannot know the rows are copies, so a gradient hook on the
    parameter all-reduces those rows within each replica group (before accumulation, so gradient
    accumulation stays right). Returns the hook handles.
    """
    modules = dict(model.named_modules())
    handles: list[Any] = []
    groups: dict[tuple[int, int], Any] = {}
    for group in layout.groups:
        replicated = [(i, p) for i, p in enumerate(group.parts) if p.replicas > 1]
        if not replicated:
            continue
        parent = modules[group.path]
        for _, part in replicated:
            key = (part.blocks, part.replicas)
            if key not in groups:
                groups[key] = replica_group(mesh, part.blocks, part.replicas)
        if group.fused_name is not None:
            sizes = group.local_sizes
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            rows = [(starts[i], starts[i] + sizes[i], groups[(p.blocks, p.replicas)]) for i, p in replicated]
            targets = [parent._modules[group.fused_name]]
            row_sets = [rows]
        else:
            targets = [parent._modules[p.part.name] for _, p in replicated]
            row_sets = [[(0, p.local_rows, groups[(p.blocks, p.replicas)])] for _, p in replicated]
        for linear, rows in zip(targets, row_sets):
            for param in (linear.weight, linear.bias):
                if param is not None and param.requires_grad:
                    handles.append(param.register_hook(summing(rows, param)))
    return handles


def replica_group(mesh, blocks: int, times: int):
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if mesh.size() != world:
        raise LoadError(
            f"kv heads replicated {times} times need replica groups; splice builds them only when the "
            f"tensor-parallel mesh spans the whole world (tp {mesh.size()}, world {world})"
        )
    grid = init_device_mesh(mesh.device_type, (blocks, times), mesh_dim_names=("kv", "replica"))
    return grid["replica"].get_group()


def summing(rows: list[tuple[int, int, Any]], param: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        if not isinstance(grad, DTensor):
            raise LoadError("a replicated kv weight got a plain-tensor gradient; expected a DTensor")
        if grad.placements != param.placements:
            grad = grad.redistribute(placements=param.placements)
        local = grad.to_local().clone()
        for start, stop, group in rows:
            piece = local.narrow(0, start, stop - start).contiguous()
            dist.all_reduce(piece, group=group)
            local.narrow(0, start, stop - start).copy_(piece)
        return DTensor.from_local(
            local, grad.device_mesh, grad.placements, run_check=False, shape=grad.shape, stride=grad.stride()
        )

    return hook
