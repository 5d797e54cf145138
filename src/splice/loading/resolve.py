"""From a `LoadRequest` to a model on the meta device: the directory, the config, the class, the dtype, the device.

Also the two configs a checkpoint directory holds besides the weights: `save_configs` writes config.json
(with the ``fusion_config`` of a runtime-layout save) and generation_config.json, `load_generation_config`
reads the latter. Every loader and writer of a transformers checkpoint (`splice.hf`, `splice.parallel`'s
shards and DCP consolidation, `splice.inspection`) uses these, so the files are the same whoever writes them.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.checkpoint import CheckpointReader
from splice.errors import LoadError

CONFIG_KEY = "fusion_config"  # where a runtime-layout save records its fusion in config.json


def resolve_path(path: str | os.PathLike, hub: dict[str, Any]) -> Path:
    """The local directory of ``path``: itself, or its Hub snapshot (config, safetensors, tokenizer files)."""
    local = Path(path)
    if hub.get("subfolder"):
        local = local / hub["subfolder"]
    if local.is_dir():
        return local
    if local.exists():
        raise LoadError(f"{local} is a file; pass the directory that holds config.json and the weights")
    try:
        from huggingface_hub import snapshot_download

        downloaded = snapshot_download(
            str(path),
            revision=hub.get("revision"),
            cache_dir=hub.get("cache_dir"),
            local_files_only=hub.get("local_files_only", False),
            token=hub.get("token"),
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
        )
    except Exception as exc:  # hub errors come in many types; all of them mean "not found here"
        raise LoadError(
            f"{path}: not a local directory and not downloadable from the Hub ({type(exc).__name__}: {exc})"
        ) from None
    return Path(downloaded) / hub["subfolder"] if hub.get("subfolder") else Path(downloaded)


def load_config(cls: Any, path: Path, config: Any = None, overrides: dict[str, Any] | None = None) -> Any:
    """``config`` (copied) or ``path``'s config.json, with ``overrides`` set on it; unknown keys are a LoadError."""
    from transformers import AutoConfig, PretrainedConfig

    overrides = overrides or {}
    if config is None:
        if not (path / "config.json").is_file():
            raise LoadError(f"{path}: no config.json")
        loader = AutoConfig if hasattr(cls, "_model_mapping") else getattr(cls, "config_class", AutoConfig)
        config, unused = loader.from_pretrained(path, return_unused_kwargs=True, **overrides)
    else:
        if not isinstance(config, PretrainedConfig):
            raise LoadError(f"config= must be a transformers PretrainedConfig, got {type(config).__name__}")
        config = copy.deepcopy(config)
        unused = {}
        for key, value in overrides.items():
            if hasattr(config, key):
                setattr(config, key, value)
            else:
                unused[key] = value
    if unused:
        raise LoadError(
            f"unknown keyword argument(s) {sorted(unused)}: neither from_pretrained options nor config attributes"
        )
    return config


def pop_fusion_config(config: Any) -> Any:
    """The ``fusion_config`` a runtime-layout save recorded in ``config`` (None if none), removed from it.

    The fusion lives in splice's per-model state, never in the model's config.
    """
    stored = getattr(config, CONFIG_KEY, None)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    return stored


def model_class(cls: Any, config: Any) -> Any:
    """The concrete model class: ``cls`` itself, or what the Auto class ``cls`` maps ``config`` to."""
    if hasattr(cls, "_model_mapping"):
        from transformers.models.auto.auto_factory import _get_model_class

        try:
            return _get_model_class(config, cls._model_mapping)
        except KeyError:
            raise LoadError(
                f"{cls.__name__} has no model class for config type {type(config).__name__}"
            ) from None
    return cls


def resolve_dtype(dtype: Any, config: Any, reader: CheckpointReader) -> torch.dtype | None:
    """The dtype floating weights load as: ``dtype``, or ("auto"/None) the config's, or the checkpoint's."""
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise LoadError(f"unknown dtype {dtype!r}")
    if dtype is None or dtype == "auto":
        stored = getattr(config, "dtype", None)
        if isinstance(stored, str):
            stored = getattr(torch, stored, None)
        if isinstance(stored, torch.dtype):
            return stored
        floating = [m.dtype for m in reader.metas().values() if m.dtype.is_floating_point]
        return floating[0] if floating else None
    if not isinstance(dtype, torch.dtype):
        raise LoadError(f"dtype must be a torch.dtype, a string or 'auto', got {dtype!r}")
    return dtype


def resolve_device(device_map: Any) -> torch.device | None:
    """The one device a ``device_map`` names (None: stay on the CPU); splitting a model over devices is refused."""
    if device_map is None or device_map == "cpu":
        return None
    if isinstance(device_map, (str, torch.device, int)) and device_map not in (
        "auto",
        "balanced",
        "sequential",
    ):
        return torch.device(device_map)
    raise LoadError(
        f"device_map={device_map!r} is not supported by splice.from_pretrained; load, then call model.to(device)"
    )


def build_on_meta(
    model_cls: Any, config: Any, attn_implementation: Any = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """Construct on the meta device, touching no process-global state (see docs/transformers.md)."""
    from transformers import monkey_patching

    if monkey_patching.get_patch_mapping():
        warnings.warn(
            "transformers has monkey patches registered (transformers.monkey_patching); composite models built now "
            "will use the patched classes. splice itself never registers any.",
            stacklevel=3,
        )
    config = copy.deepcopy(config)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    configs = _all_configs(config)
    saved = [(c, getattr(c, "dtype", None)) for c in configs]
    for c in configs:
        c.dtype = None  # with a dtype set, composite models call torch.set_default_dtype (process-global)
    try:
        with torch.device("meta"):  # a per-thread torch function mode
            model = model_cls(config)
    finally:
        for c, value in saved:
            c.dtype = value
    for c in _all_configs(model.config):
        c.dtype = dtype
    return model


def _all_configs(config: Any) -> list[Any]:
    out, stack = [], [config]
    while stack:
        c = stack.pop()
        if any(c is o for o in out):
            continue
        out.append(c)
        for name in getattr(c, "sub_configs", {}) or {}:
            sub = getattr(c, name, None)
            if sub is not None and hasattr(sub, "to_dict"):
                stack.append(sub)
    return out


# --------------------------------------------------------------------------------------------------
# the configs beside the weights


def load_generation_config(model: nn.Module, path: Path | None) -> None:
    """Set ``model.generation_config`` from ``path`` (or, for weights given in memory, from the model's config)."""
    if not getattr(model, "can_generate", lambda: False)():
        return
    from transformers import GenerationConfig

    if path is None:  # weights given in memory: as transformers does, from the model's config
        model.generation_config = GenerationConfig.from_model_config(model.config)
        return

    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        model.generation_config = GenerationConfig.from_pretrained(
            path, config_file_name="config.json", _from_model_config=True
        )


def save_configs(
    model: nn.Module, directory: Path, tensors: dict[str, Any], fusion_config: Any = None
) -> None:
    """Write config.json (and generation_config.json for a generative model) into ``directory``.

    The dtype recorded is that of the first floating tensor of ``tensors`` (what the files hold);
    ``fusion_config`` is recorded for a runtime-layout save, and left out otherwise.
    """
    config = copy.deepcopy(model.config)
    floating = [t.dtype for t in tensors.values() if t.dtype.is_floating_point]
    if floating:
        config.dtype = str(floating[0]).removeprefix("torch.")
    # fully_shard makes an FSDP<Name> subclass; transformers strips the prefix too
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    if fusion_config:
        setattr(config, CONFIG_KEY, fusion_config)
    elif hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(model, "can_generate", lambda: False)():
        generation_config.save_pretrained(directory)
