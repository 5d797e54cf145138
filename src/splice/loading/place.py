"""Getting a plan step's tensors out of the checkpoint and into the model, for every loader.

`load_step` reads one step's targets with as few copies as its ops allow (a mapped file, adjacent
sources mapped as one, sources read straight into the views of one fused tensor); `set_tensor` makes a
tensor the model's parameter or buffer; `remember_source` records which file held which key, so that
saving in the original layout writes the same split (`source_shards`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splice.checkpoint import CheckpointReader
from splice.errors import LoadError
from splice.transforms import Concat, TensorMeta
from splice.weightmap import Step

SOURCE_ATTR = "_splice_source_layout"


def load_step(reader: CheckpointReader, step: Step, dtypes: dict[str, torch.dtype]) -> list[torch.Tensor]:
    """The step's targets, read from the checkpoint with as few copies as the ops allow."""
    ops = step.ops
    metas = step.target_metas
    direct = (
        ops is not None
        and len(ops) <= 1
        and all(
            reader.meta(k).dtype == dtypes.get(t, m.dtype)
            for k in step.sources
            for t, m in zip(step.targets, metas)
        )
    )
    if direct and not ops:  # a rename: map the file, as transformers does (no copy; pages load on first use)
        return [reader.map(key) for key in step.sources]
    if direct and len(metas) == 1 and isinstance(ops[0], Concat) and ops[0].dim in (0, -len(metas[0].shape)):
        # sources stored back to back (gate_proj then up_proj, as safetensors sorts them): map, no copy
        mapped = reader.map_adjacent(step.sources)
        if mapped is not None and TensorMeta.of(mapped) == metas[0]:
            return [mapped]
    if direct and len(metas) == 1 and hasattr(ops[0], "input_views"):
        out = torch.empty(metas[0].shape, dtype=metas[0].dtype)
        for key, view in zip(step.sources, ops[0].input_views(out)):
            reader.read_into(key, view)
        return [out]
    results = step.run([reader.get(k) for k in step.sources])
    return [r.to(dtypes.get(t, r.dtype)).contiguous() for t, r in zip(step.targets, results)]


def set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Make ``tensor`` the model's parameter (keeping its ``requires_grad``) or buffer ``key``."""
    path, _, leaf = key.rpartition(".")
    try:
        owner = model.get_submodule(path) if path else model
    except AttributeError:
        raise LoadError(f"the model has no parameter or buffer {key!r} (no submodule {path!r})") from None
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        param = nn.Parameter(
            tensor, requires_grad=tensor.is_floating_point() and (old is None or old.requires_grad)
        )
        param._is_hf_initialized = True
        owner._parameters[leaf] = param
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        raise LoadError(f"the model has no parameter or buffer {key!r}")


def remember_source(model: nn.Module, reader: Any) -> None:
    """Which file held which tensor, so a save in the original layout can use the same split."""
    files: dict[str, list[str]] = {}
    for key in reader.keys():
        files.setdefault(reader.file_of(key).name, []).append(key)
    model.__dict__[SOURCE_ATTR] = {"files": files, "metas": reader.metas()}


def source_shards(model: nn.Module, metas: dict[str, TensorMeta]) -> list[list[str]] | None:
    """The recorded file split, if the tensors to write are exactly those the model was loaded from."""
    source = model.__dict__.get(SOURCE_ATTR)
    if source is None or source["metas"] != metas:
        return None
    return [keys for _, keys in sorted(source["files"].items())]
