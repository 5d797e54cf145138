"""The `from_pretrained` keywords about where weights come from and what is returned, as transformers has them.

- ``state_dict=``: weights in memory, in the original (checkpoint) layout, in place of a checkpoint
  directory. They go through the same renames, fusion rules and strict checks as a checkpoint's,
  through :class:`StateDictReader`, which reads a dict the way `CheckpointReader` reads files.
- ``output_loading_info=True``: ``(model, info)`` with the dict transformers returns. Loading is
  strict, so only ``unexpected_keys`` (checkpoint keys the model has no place for, which are
  skipped with a warning, as transformers does) can be non-empty.

Both are checked, with the rest of the call, by `splice.loading.request.LoadRequest` (which also refuses
a meta device context with the error transformers raises for it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from splice.errors import LoadError
from splice.transforms import TensorMeta

STATE_DICT_WHERE = Path("state_dict=")  # how messages name weights given in memory


def loading_info(unexpected_keys: Sequence[str] = ()) -> dict[str, Any]:
    """The dict ``transformers``' ``from_pretrained(..., output_loading_info=True)`` returns (same keys, types)."""
    return {
        "missing_keys": set(),
        "unexpected_keys": set(unexpected_keys),
        "mismatched_keys": set(),
        "error_msgs": [],
    }


class StateDictReader:
    """The reading side of `CheckpointReader` over a state dict in memory.

    Every read returns a fresh CPU tensor (a copy), so the loaded model never shares memory with the
    dict it was given, as a model loaded from files never shares memory with the caller's tensors.
    """

    path = STATE_DICT_WHERE

    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        tensors = {}
        for key, value in state_dict.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise LoadError(
                    f"state_dict= must map names to tensors; {key!r} holds a {type(value).__name__}"
                )
            if value.is_meta:
                raise LoadError(f"state_dict=: {key} is on the meta device and holds no data to load")
            tensors[key] = value.detach()
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def metas(self) -> dict[str, TensorMeta]:
        return {k: TensorMeta.of(t) for k, t in self._tensors.items()}

    def meta(self, key: str) -> TensorMeta:
        return TensorMeta.of(self._tensors[key])

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key].to("cpu", copy=True, memory_format=torch.contiguous_format)

    map = get  # nothing to map: a copy, so the model does not alias the caller's tensors

    def map_adjacent(self, keys: Sequence[str]) -> None:
        return None

    def read_into(self, key: str, out: torch.Tensor, index: object = None) -> torch.Tensor:
        tensor = self._tensors[key]
        with torch.no_grad():
            out.copy_(tensor if index is None else tensor[index])
        return out

    def close(self) -> None:
        pass

    def __enter__(self) -> StateDictReader:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        pass
