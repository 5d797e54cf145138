"""``splice.save_pretrained``: a fused model back out as a Transformers checkpoint.

Saving runs the recorded fusion plan backwards, applies transformers' reverse renames, and writes
through `CheckpointWriter` into a staging directory that replaces the target atomically; by default
the result is the original checkpoint layout, byte for byte. A model whose weights are distributed
over ranks is saved collectively through its `splice.loading.distributed.DistributedWeights`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.checkpoint import CheckpointWriter
from splice.errors import CheckpointError, LoadError
from splice.fusion.surgery import get_state, original_state_dict
from splice.hf.save_checks import check_runtime_layout_reloads, model_to_save
from splice.loading.distributed import DistributedWeights, distributed_weights, num_parameters
from splice.loading.place import source_shards
from splice.loading.resolve import build_on_meta, save_configs
from splice.transforms import TensorMeta

_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    save_original_format: bool = True,
    max_shard_size: int | str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> Path:
    """Save config, generation config and weights; atomically (a crash leaves the old directory whole).

    By default the weights are in the original checkpoint layout (``fusion_config`` is not written),
    so plain ``transformers`` loads the result. ``save_original_format=False`` writes the runtime
    layout and records the ``fusion_config`` in config.json; ``splice.from_pretrained`` loads both.
    Files in the directory that are not weights or configs (tokenizer files, ...) are kept.
    A ``state_dict`` passed in is taken to be the fused model's (as transformers takes it) and is
    converted the same way. Unless ``max_shard_size`` is given, a model loaded by splice is split into
    the files it came from (so the files come back byte for byte); otherwise shards are cut at 50GB as
    transformers does.
    """
    if kwargs.pop("safe_serialization", True) is False:
        raise LoadError(
            "splice.save_pretrained writes safetensors only (safe_serialization=False is not supported)"
        )
    if kwargs:
        raise LoadError(f"unknown keyword argument(s) for save_pretrained: {sorted(kwargs)}")
    model = model_to_save(model)
    state = get_state(model)
    if state is not None and not save_original_format:
        state.check_reloadable()  # before writing anything
        check_runtime_layout_reloads(model, state, lambda: build_on_meta(type(model), model.config))
    out = Path(save_directory)
    weights = _distributed(model, state_dict)
    if weights is None:
        if save_original_format:  # a given state dict is the fused model's too, as transformers assumes
            state_dict = original_state_dict(model, state_dict)
        elif state_dict is None:
            state_dict = model.state_dict()
        _write_checkpoint(model, state, state_dict, out, save_original_format, max_shard_size)
        return out
    # distributed weights: every rank gathers, rank 0 writes, and every rank returns only once the
    # checkpoint is in place, or raises if any rank failed
    try:
        state_dict = weights.gather_state_dict(model, original=save_original_format)
        if state_dict is not None:  # rank 0
            _write_checkpoint(model, state, state_dict, out, save_original_format, max_shard_size)
    except BaseException as exc:
        weights.finish_save(exc)
        raise
    weights.finish_save(None)
    return out


def _distributed(model: nn.Module, state_dict: dict[str, torch.Tensor] | None) -> DistributedWeights | None:
    """How to gather ``model``'s weights if they are spread over ranks: its loader's declaration, or FSDP2's."""
    weights = distributed_weights(model) if state_dict is None else None
    if weights is None and _has_dtensors(model, state_dict):  # FSDP2 (fully_shard): collective too
        from splice.parallel.fsdp import FullyShardedWeights

        weights = FullyShardedWeights(state_dict)
    return weights


def _has_dtensors(model: nn.Module, state_dict: dict[str, torch.Tensor] | None) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    tensors = model.parameters() if state_dict is None else state_dict.values()
    return any(isinstance(t, DTensor) for t in tensors)


def _write_checkpoint(
    model: nn.Module,
    state: Any,
    state_dict: dict[str, torch.Tensor],
    out: Path,
    save_original_format: bool,
    max_shard_size: int | str | None,
) -> None:
    tensors = _checkpoint_layout(model, state_dict)
    metas = {k: TensorMeta.of(t) for k, t in tensors.items()}
    shards = source_shards(model, metas) if save_original_format and max_shard_size is None else None
    runtime = not save_original_format and state is not None and state.records
    with CheckpointWriter(
        out,
        metas,
        max_shard_size=max_shard_size or "50GB",
        shards=shards,
        metadata={"format": "pt"},
        index_metadata={"total_parameters": num_parameters(model)},
    ) as writer:
        save_configs(model, writer.staging_dir, tensors, fusion_config=state.config if runtime else None)
        _carry_over(out, writer.staging_dir)
        for key, tensor in tensors.items():
            writer.write(key, tensor)


def _checkpoint_layout(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied copies and apply transformers' reverse renames, exactly as its save_pretrained does."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sd = _contiguous_views(state_dict)
    sd = remove_tied_weights_from_state_dict(sd, model)
    sd = revert_weight_conversion(model, sd)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def _contiguous_views(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with non-contiguous tensors (the rows of a column-major fused weight) made contiguous.

    Transformers' tied-weight check reads a tensor's end as ``view(-1)[-1]``, which such views cannot
    give. The same view (a tied weight) becomes the same copy, so the tie is still found.
    """
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta" and not tensor.is_contiguous():
            view = (
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tensor.shape,
                tensor.stride(),
            )
            if view not in copies:
                copies[view] = tensor.detach().contiguous()
            tensor = copies[view]
        out[key] = tensor
    return out


def _carry_over(out: Path, staging: Path) -> None:
    """Keep the target's other files (tokenizer, README, ...); drop its old weights and configs."""
    if not out.is_dir():
        return
    for item in out.iterdir():
        if item.name in ("config.json", "generation_config.json") or _WEIGHT_FILE.match(item.name):
            continue
        if (staging / item.name).exists():
            continue
        try:
            if item.is_symlink():  # kept as the link it is: its target is not read (it may be outside `out`)
                os.symlink(os.readlink(item), staging / item.name)
            elif item.is_dir():
                shutil.copytree(item, staging / item.name, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(item, staging / item.name)
        except OSError as exc:
            raise CheckpointError(f"{item}: cannot carry over into the new checkpoint: {exc}") from None


def _link_or_copy(src: Any, dst: Any) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
