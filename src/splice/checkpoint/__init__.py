"""Streaming, lazy, atomic safetensors I/O.

Reading parses and validates the safetensors headers itself, then reads each tensor, or just the bytes
of a slice of it, straight into its destination with positional reads: no memory map, no intermediate
copy. Writing lays out every file from the declared names, shapes and dtypes, accepts tensors one at a
time in any order, and swaps the finished checkpoint into place atomically. Files are byte-for-byte
what ``safetensors.torch.save_file`` writes, shards and index what transformers' ``save_pretrained``
writes.

>>> with CheckpointReader(path) as ckpt:                        # doctest: +SKIP
...     rows = ckpt.get_slice("model.embed_tokens.weight")[rank * n : (rank + 1) * n]
...     ckpt.read_into("model.norm.weight", model.model.norm.weight.data)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from splice.errors import CheckpointError
from splice.tensors import TensorMeta

from .format import DTYPE_OF_TAG, TAG_OF_DTYPE
from .reader import DEFAULT_WEIGHTS_NAME, CheckpointReader, TensorSlice
from .writer import _DEFAULT_METADATA, DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, parse_size, plan_shards

__all__ = [
    "DTYPE_OF_TAG",
    "TAG_OF_DTYPE",
    "CheckpointReader",
    "CheckpointWriter",
    "TensorSlice",
    "load_state_dict",
    "parse_size",
    "plan_shards",
    "save_state_dict",
]


def load_state_dict(
    path: str | os.PathLike, *, weights_name: str = DEFAULT_WEIGHTS_NAME
) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (file, index or directory), in the reader's key order."""
    with CheckpointReader(path, weights_name=weights_name) as reader:
        return {key: reader.get(key) for key in reader.keys()}


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    metadata: Mapping[str, str] | None = _DEFAULT_METADATA,
    weights_name: str = DEFAULT_WEIGHTS_NAME,
    index_metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write ``state_dict`` as a (possibly sharded) checkpoint directory that atomically replaces ``out_dir``.

    Tensors sharing memory are written once per name, as plain copies. Returns the directory.
    """
    metas = {}
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{out_dir}: state_dict[{key!r}] must be a torch.Tensor, found {type(tensor).__name__}"
            )
        metas[key] = TensorMeta.of(tensor)
    with CheckpointWriter(
        out_dir,
        metas,
        max_shard_size=max_shard_size,
        metadata=metadata,
        weights_name=weights_name,
        index_metadata=index_metadata,
    ) as writer:
        for key in metas:
            writer.write(key, state_dict[key])
    return writer.out_dir
