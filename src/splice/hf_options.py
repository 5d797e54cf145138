"""The `from_pretrained` keywords about where weights come from and what is returned, as transformers has them.

- ``state_dict=``: weights in memory, in the original (checkpoint) layout, in place of a checkpoint
  directory. They go through the same renames, fusion rules and strict checks as a checkpoint's,
  through :class:`StateDictReader`, which reads a dict the way `CheckpointReader` reads files.
- ``output_loading_info=True``: ``(model, info)`` with the dict transformers returns. Loading is
  strict, so only ``unexpected_keys`` (checkpoint keys the model has no place for, which are
  skipped with a warning, as transformers does) can be non-empty.
- a meta device context (``with torch.device("meta")`` or ``torch.set_default_device("meta")``) is
  refused with the error transformers raises for it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splice.errors import LoadError, MetaDeviceError
from splice.transforms import TensorMeta

STATE_DICT_WHERE = Path("state_dict=")  # how messages name weights given in memory


@dataclass
class LoadCall:
    """What a ``from_pretrained`` call asks for besides the model: the weights' source and the return shape."""

    path: str | os.PathLike | None
    state_dict: Mapping[str, torch.Tensor] | None
    output_loading_info: bool

    @classmethod
    def parse(cls, path: Any, config: Any, kwargs: dict[str, Any]) -> LoadCall:
        """Pop the keywords this module handles from ``kwargs`` and check them as transformers does."""
        refuse_meta_device()
        state_dict = kwargs.pop("state_dict", None)
        output_loading_info = bool(kwargs.pop("output_loading_info", False))
        if state_dict is not None:
            if path is not None:  # transformers 5.23's ValueError, word for word
                raise LoadError(
                    "`state_dict` cannot be passed together with a model name or a `gguf_file`. "
                    "Use one of the two loading strategies."
                )
            if config is None:
                raise LoadError(
                    "state_dict= needs config= (a PretrainedConfig): there is no directory to read config.json from"
                )
            if not isinstance(state_dict, Mapping):
                raise LoadError(
                    f"state_dict= must be a mapping of names to tensors, got {type(state_dict).__name__}"
                )
        elif path is None:
            raise LoadError(
                "pretrained_model_name_or_path is None: pass a checkpoint directory (or Hub id), or "
                "state_dict= with config="
            )
        return cls(path, state_dict, output_loading_info)

    def reader(self) -> StateDictReader | None:
        return None if self.state_dict is None else StateDictReader(self.state_dict)


def refuse_meta_device() -> None:
    """Refuse a meta device context, with transformers' own message (``check_and_set_device_map``)."""
    from transformers.modeling_utils import get_torch_context_manager_or_global_device

    if get_torch_context_manager_or_global_device() == torch.device("meta"):
        raise MetaDeviceError(
            "You are using `from_pretrained` with a meta device context manager or `torch.set_default_device('meta')`.\n"
            "This is an anti-pattern as `from_pretrained` wants to load existing weights.\nIf you want to initialize an "
            "empty model on the meta device, use the context manager or global device with `from_config`, or `ModelClass(config)`"
        )


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
