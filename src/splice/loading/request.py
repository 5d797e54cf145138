"""`LoadRequest`: the arguments of one ``splice.from_pretrained`` call, checked once, passed down whole.

``splice.from_pretrained`` keeps transformers' keyword signature; it builds a `LoadRequest`, and
everything below it (`splice.hf.load.prepare`, the tensor-parallel loader) takes the request instead of
repeating ten keywords. Keywords splice refuses are refused here, by name, before any file is read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from splice.errors import LoadError, MetaDeviceError

_UNSUPPORTED = {
    "quantization_config": "quantized loading",
    "load_in_8bit": "quantized loading",
    "load_in_4bit": "quantized loading",
    "gguf_file": "GGUF checkpoints",
    "from_tf": "TensorFlow checkpoints",
    "from_flax": "Flax checkpoints",
    "offload_folder": "disk offloading",
    "use_safetensors": None,  # accepted: splice only reads safetensors
    "low_cpu_mem_usage": None,  # accepted: loading always streams
}
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "proxies", "subfolder")


@dataclass
class LoadRequest:
    """What to load, from where, into which layout, and how to return it.

    ``options`` holds the keywords left over: config attributes to override (as transformers takes
    them), and, for a tensor-parallel load, nothing else (``tp_size`` and ``device_mesh`` have fields).
    """

    cls: Any  # a model class or an Auto class
    path: str | os.PathLike | None
    fusion_config: Any = None
    config: Any = None
    dtype: Any = None  # ``dtype=``, or transformers' older ``torch_dtype=``
    attn_implementation: str | dict | None = None
    device_map: Any = None
    key_mapping: dict[str, str] | None = None
    state_dict: Mapping[str, torch.Tensor] | None = None
    output_loading_info: bool = False
    tp_plan: Any = None
    distributed_config: Any = None
    tp_size: int | None = None
    device_mesh: Any = None
    hub: dict[str, Any] = field(default_factory=dict)  # revision=, cache_dir=, ... for a Hub id
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor_parallel(self) -> bool:
        return self.tp_plan is not None or self.distributed_config is not None or self.tp_size is not None

    @classmethod
    def of(
        cls,
        model_cls: Any,
        path: str | os.PathLike | None,
        *,
        torch_dtype: Any = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> LoadRequest:
        """The request of ``from_pretrained(model_cls, path, **kwargs)``, or a LoadError naming what is refused."""
        refuse_meta_device()
        fields = {name: kwargs.pop(name) for name in _FIELDS if name in kwargs}
        fields["state_dict"] = kwargs.pop("state_dict", None)
        fields["output_loading_info"] = bool(kwargs.pop("output_loading_info", False))
        if fields.get("dtype") is None:
            fields["dtype"] = torch_dtype
        request = cls(model_cls, path, **fields)
        request._check_source()
        request.tp_size = kwargs.pop(
            "tp_size", None
        )  # alone, it asks for TP with the model's plan (as transformers)
        if request.tensor_parallel:
            if request.state_dict is not None or request.output_loading_info:
                raise LoadError(
                    "state_dict= and output_loading_info= are not supported with tensor parallelism"
                )
            if request.device_map is not None:
                raise LoadError("tensor parallelism and device_map are mutually exclusive")
            request.device_mesh = kwargs.pop("device_mesh", None)
        for name in list(kwargs):
            if name in _UNSUPPORTED:
                reason = _UNSUPPORTED[name]
                value = kwargs.pop(name)
                if reason is not None and value not in (None, False):
                    raise LoadError(f"splice.from_pretrained does not support {name}= ({reason})")
        if kwargs.pop("ignore_mismatched_sizes", False):
            raise LoadError("splice.from_pretrained is strict: ignore_mismatched_sizes=True is not supported")
        if trust_remote_code:
            raise LoadError("splice.from_pretrained does not run remote code (trust_remote_code=True)")
        request.hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        request.options = kwargs
        return request

    def _check_source(self) -> None:
        """The weights come from a directory (or Hub id) or from ``state_dict=`` with ``config=``, as in transformers."""
        if self.state_dict is not None:
            if self.path is not None:  # transformers 5.23's ValueError, word for word
                raise LoadError(
                    "`state_dict` cannot be passed together with a model name or a `gguf_file`. "
                    "Use one of the two loading strategies."
                )
            if self.config is None:
                raise LoadError(
                    "state_dict= needs config= (a PretrainedConfig): there is no directory to read config.json from"
                )
            if not isinstance(self.state_dict, Mapping):
                raise LoadError(
                    f"state_dict= must be a mapping of names to tensors, got {type(self.state_dict).__name__}"
                )
        elif self.path is None:
            raise LoadError(
                "pretrained_model_name_or_path is None: pass a checkpoint directory (or Hub id), or "
                "state_dict= with config="
            )


_FIELDS = (
    "fusion_config",
    "config",
    "dtype",
    "attn_implementation",
    "device_map",
    "key_mapping",
    "tp_plan",
    "distributed_config",
)


def refuse_meta_device() -> None:
    """Refuse a meta device context, with transformers' own message (``check_and_set_device_map``)."""
    from transformers.modeling_utils import get_torch_context_manager_or_global_device

    if get_torch_context_manager_or_global_device() == torch.device("meta"):
        raise MetaDeviceError(
            "You are using `from_pretrained` with a meta device context manager or `torch.set_default_device('meta')`.\n"
            "This is an anti-pattern as `from_pretrained` wants to load existing weights.\nIf you want to initialize an "
            "empty model on the meta device, use the context manager or global device with `from_config`, or `ModelClass(config)`"
        )
