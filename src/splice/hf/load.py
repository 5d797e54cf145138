"""``splice.from_pretrained``: a Transformers checkpoint straight into a fused layout.

Loading builds the model on the meta device (thread-local: nothing global changes), fuses it there
(cheap: no weights exist yet), then compiles one `WeightMap` from the checkpoint's keys to the fused
model's keys: transformers' own checkpoint renames for this model (`splice.hf.conversions`), then the
fusion rules. Each runtime tensor is allocated once and filled straight from the file
(`CheckpointReader.read_into`), so there is never an unfused copy in memory. Loading is strict
(`splice.loading.strict`): a weight the checkpoint lacks or whose shape does not fit is a `LoadError`
naming it, never a random init.

`prepare` (resolve, build, fuse, map) is shared with the tensor-parallel loader, which this module
calls with the `Prepared` model when ``tp_plan=`` or ``distributed_config=`` is given.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torch import nn

from splice.checkpoint import CheckpointReader
from splice.fusion.surgery import fuse, get_state, unfuse
from splice.hf.buffers import materialize_computed_buffers
from splice.hf.conversions import checkpoint_renames
from splice.hf.options import StateDictReader, loading_info
from splice.loading.place import load_step, remember_source, set_tensor
from splice.loading.prepared import Prepared
from splice.loading.request import LoadRequest
from splice.loading.resolve import (
    build_on_meta,
    load_config,
    model_class,
    pop_fusion_config,
    resolve_device,
    resolve_dtype,
    resolve_path,
)
from splice.weightmap import WeightMap


def from_pretrained(
    cls: Any,
    pretrained_model_name_or_path: str | os.PathLike | None,
    *,
    fusion_config: Any = None,
    config: Any = None,
    dtype: Any = None,
    torch_dtype: Any = None,
    attn_implementation: str | dict | None = None,
    device_map: Any = None,
    tp_plan: Any = None,
    distributed_config: Any = None,
    key_mapping: dict[str, str] | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Load a Transformers model straight into the layout ``fusion_config`` asks for.

    ``cls`` is a model class (``LlamaForCausalLM``) or an Auto class (``AutoModelForCausalLM``); the
    other keywords mean what they mean to ``cls.from_pretrained``. ``fusion_config`` is a fusion
    config as ``splice.fuse`` takes it; when omitted, the one stored in ``config.json`` by a runtime
    layout save is used, and ``fusion_config={}`` loads unfused. ``state_dict=`` (with ``config=`` and
    no path) and ``output_loading_info=True`` work as in transformers (see `splice.hf.options`).
    ``tp_plan=`` / ``distributed_config=`` load tensor-parallel (see `splice.parallel.load`).
    """
    import transformers  # noqa: F401  (fail early with a clear ImportError when the extra is missing)

    request = LoadRequest.of(
        cls, pretrained_model_name_or_path, fusion_config=fusion_config, config=config, dtype=dtype,
        torch_dtype=torch_dtype, attn_implementation=attn_implementation, device_map=device_map,
        tp_plan=tp_plan, distributed_config=distributed_config, key_mapping=key_mapping,
        trust_remote_code=trust_remote_code, **kwargs,
    )  # fmt: skip
    if request.tensor_parallel:
        from splice.parallel.load import from_pretrained_tp  # hf builds on parallel, never the reverse

        return from_pretrained_tp(request, prepare)
    prepared = prepare(request)
    with prepared.open() as reader:
        plan = prepared.compile(reader)
        # pread releases the GIL and page-faulting fresh memory is per core: reading fused tensors on
        # a few threads halves the copy on 2 cores; results become parameters in order, here.
        workers = max(1, min(4, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers, thread_name_prefix="splice-load") as pool:
            loaded = pool.map(lambda step: load_step(reader, step, prepared.dtypes), plan.steps)
            for step, tensors in zip(plan.steps, loaded):
                for key, tensor in zip(step.targets, tensors):
                    set_tensor(prepared.model, key, tensor)
        if prepared.source is None:
            remember_source(prepared.model, reader)
    model = prepared.finish()
    if prepared.device is not None:
        model.to(prepared.device)
    return (model, loading_info(prepared.unexpected)) if request.output_loading_info else model


def prepare(request: LoadRequest) -> Prepared:
    """Resolve files, config and class; build the model on meta; fuse it; build the checkpoint map."""
    source = None if request.state_dict is None else StateDictReader(request.state_dict)
    local = resolve_path(request.path, request.hub) if source is None else source.path
    config = load_config(request.cls, local, request.config, request.options)
    model_cls = model_class(request.cls, config)
    stored = pop_fusion_config(config)
    requested = stored if request.fusion_config is None else request.fusion_config

    with CheckpointReader(local) if source is None else source as reader:
        keys = reader.keys()
        checkpoint_metas = reader.metas()
        target_dtype = resolve_dtype(request.dtype, config, reader)
    model = build_on_meta(model_cls, config, request.attn_implementation, target_dtype)
    # before anything is loaded, so no weight init can touch a loaded tensor
    materialize_computed_buffers(model)
    original_keys = list(model.state_dict(keep_vars=True))
    layout_map = WeightMap()
    if stored and stored != requested:
        fuse(model, stored)  # the checkpoint is in this runtime layout; undo it, then apply the requested one
        layout_map = get_state(model).weight_map().invert()
        unfuse(model)
    if requested:
        fuse(model, requested)
        state = get_state(model)
        state.config = json.loads(json.dumps(state.config))
        layout_map = layout_map.then(state.weight_map())
    same_layout = bool(stored) and stored == requested  # the checkpoint is already in the requested layout
    checkpoint_keys_space = list(model.state_dict(keep_vars=True)) if same_layout else original_keys
    renames, transforms = checkpoint_renames(
        model, keys, checkpoint_keys_space, request.key_mapping, checkpoint_metas
    )
    weight_map = renames if same_layout else renames.then(layout_map)
    missing_ok = set(getattr(model, "all_tied_weights_keys", {}) or {})
    dtype_plan = model._get_dtype_plan(target_dtype) if target_dtype is not None else {}
    device = resolve_device(request.device_map)
    return Prepared(
        model, local, weight_map, target_dtype, dtype_plan, transforms, missing_ok, device, source
    )
