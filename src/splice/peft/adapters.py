"""`get_peft_model`, `save_adapter` and `load_adapter`: LoRA by original names on fused or split models.

``get_peft_model`` adapts the config (`splice.peft.config`) and hands it to PEFT; PEFT then builds an
ordinary `PeftModel`, whose LoRA parameters have vanilla names (``...q_proj.lora_A.default.weight``).
``save_adapter`` maps the LoRAs of the original model (`splice.peft.lora_map`), writes them in PEFT's own
format and records in the file's metadata what it stacked or split, so that ``load_adapter`` onto the
same layout gives back the same LoRAs; any other vanilla adapter loads as it is, on its original names.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.peft.addresses import AddressBook, base_model
from splice.peft.algebra import LoraSpec, LoraWeights
from splice.peft.config import (
    _check_lora,
    _refuse_inexact,
    adapt_peft_config,
    blocks_of,
    describe_config,
    lora_spec,
    mark_runtime,
    original_config,
    translate_modules_to_save,
)
from splice.peft.errors import AdapterError
from splice.peft.layer import refuse_bypassing_kernels
from splice.peft.lora_map import (
    Block,
    LoraMap,
    Same,
    describe_stacks,
    map_to_original,
    map_to_runtime,
    materialize,
)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."  # PEFT's key prefix for LoRA models in adapter files
METADATA_KEY = "splice.peft"
FACTORS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "bias"}


# --------------------------------------------------------------------------------------------------
# get_peft_model


def get_peft_model(
    model: nn.Module, lora_config: Any, adapter_name: str = "default", **kwargs: Any
) -> nn.Module:
    """``peft.get_peft_model`` for a model fused or split by splice, with ``lora_config`` in original names.

    Given a PeftModel, adds the adapter to it instead (like ``peft_model.add_adapter``). Keyword
    arguments go to PEFT. The returned PeftModel's ``add_adapter`` and ``load_adapter`` translate
    original names too, so code written for vanilla PEFT keeps working on it.
    """
    import peft

    from splice.peft import tensor_parallel

    tensor_parallel.refuse_unsupported_sharding(model)
    config = adapt_peft_config(model, lora_config)
    refuse_bypassing_kernels(base_model(model), config)
    tensor_parallel.prepare(model, config)
    if isinstance(model, peft.PeftModel):
        type(model).add_adapter(model, adapter_name, config, **kwargs)
        return model
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
    _install(peft_model)
    return peft_model


def _install(peft_model: nn.Module) -> None:
    """Per instance, never on the class: the PeftModel's add_adapter/load_adapter read original names."""
    for name in ("add_adapter", "load_adapter"):
        peft_model.__dict__[name] = _OriginalNames(peft_model, name)


class _OriginalNames:
    """A PeftModel method taking configs and adapter files written for the original model.

    A plain object holding the model (not a bound function), so deepcopy and pickle carry it over.
    """

    def __init__(self, peft_model: nn.Module, method: str):
        self.peft_model, self.method = peft_model, method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _METHODS[self.method](self.peft_model, *args, **kwargs)


def _add_adapter(self: Any, adapter_name: str, peft_config: Any, *args: Any, **kwargs: Any) -> None:
    from peft import LoraConfig

    from splice.peft import tensor_parallel

    if isinstance(peft_config, LoraConfig):
        peft_config = adapt_peft_config(self, peft_config)
        refuse_bypassing_kernels(base_model(self), peft_config)
        tensor_parallel.prepare(self, peft_config)
    return type(self).add_adapter(self, adapter_name, peft_config, *args, **kwargs)


_LOAD_DEFAULTS = {
    "torch_device": None,
    "autocast_adapter_dtype": True,
    "ephemeral_gpu_offload": False,
    "key_mapping": None,
}


def _load_adapter(
    self: Any, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **kwargs: Any
) -> None:
    kwargs.pop("low_cpu_mem_usage", None)  # a speed hint; loading is the same either way
    unsupported = sorted(k for k, v in kwargs.items() if k not in _LOAD_DEFAULTS or _LOAD_DEFAULTS[k] != v)
    if unsupported or not Path(model_id).is_dir():
        raise AdapterError(
            f"load_adapter on a splice model reads a local adapter directory with default options; got "
            f"{str(model_id)!r}{f' and {unsupported}' if unsupported else ''} (use splice.peft.load_adapter)"
        )
    load_adapter(self, model_id, adapter_name, is_trainable=is_trainable)


_METHODS = {"add_adapter": _add_adapter, "load_adapter": _load_adapter}


# --------------------------------------------------------------------------------------------------
# save_adapter


def save_adapter(
    peft_model: nn.Module, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None
) -> None:
    """Write adapters in vanilla PEFT format for the *unmodified* model (original module names).

    Like ``PeftModel.save_pretrained``: the adapter ``"default"`` goes to ``save_directory``, others to
    ``save_directory/<name>``; each gets ``adapter_config.json`` and ``adapter_model.safetensors``.
    ``peft.PeftModel.from_pretrained(unmodified_model, save_directory)`` then reproduces the outputs.
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    from splice.peft import tensor_parallel

    if not isinstance(peft_model, PeftModel):
        raise AdapterError(f"save_adapter takes a PeftModel, got {type(peft_model).__name__}")
    book = AddressBook.of(peft_model)
    names = list(selected_adapters) if selected_adapters is not None else list(peft_model.peft_config)
    for adapter in names:
        if adapter not in peft_model.peft_config:
            raise AdapterError(
                f"save_adapter: no adapter {adapter!r}; adapters: {sorted(peft_model.peft_config)}"
            )
        config = peft_model.peft_config[adapter]
        _check_lora(config)
        specs = _layer_specs(book, adapter)
        lora_map = map_to_original(book, specs, blocks_of(peft_model, adapter))
        state = get_peft_model_state_dict(peft_model, adapter_name=adapter)
        state = tensor_parallel.gather(peft_model, state)  # collective under TP
        tensors, cols = _original_tensors(state, lora_map, book)
        metadata = describe_stacks(lora_map, book, specs, cols)
        original = original_config(config, lora_map, book)
        original.inference_mode = True
        if any(getattr(book.named(name).module, "transposed", False) for name in lora_map):
            original.fan_in_fan_out = True  # the original Linear there is a Conv1D (GPT-2's c_attn)
        if original.base_model_name_or_path is None:
            original.base_model_name_or_path = book.model.__dict__.get("name_or_path") or None
        auto_mapping = None
        if original.task_type is None:
            cls = type(book.model)
            auto_mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
        out = Path(save_directory) if adapter == "default" else Path(save_directory) / adapter
        tensor_parallel.write_once(peft_model, _write, out, original, tensors, metadata, auto_mapping)


def _layer_specs(book: AddressBook, adapter: str) -> dict[str, LoraSpec]:
    """The runtime LoRAs of one adapter, read from the LoRA layers themselves."""
    from peft.tuners.lora import LoraLayer

    specs = {}
    for address in book.addresses:
        layer = book.model.get_submodule(address.runtime)
        if isinstance(layer, LoraLayer) and adapter in layer.r:
            specs[address.runtime] = LoraSpec(
                layer.r[adapter], layer.lora_alpha[adapter], layer.use_rslora.get(adapter, False)
            )
    return specs


def _original_tensors(
    state: dict[str, torch.Tensor], lora_map: LoraMap, book: AddressBook
) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    loras: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        address, rest = book.owner(_strip(key))
        if rest.startswith("lora_"):
            loras.setdefault(address.runtime, {})[rest] = tensor
        elif address.kind == "module":
            # modules_to_save and other trainable copies: same tensors, original path
            out[f"{PREFIX}{address.name}.{rest}"] = tensor
        else:  # get_peft_model and load_adapter refuse configs that train these; something else set them
            raise AdapterError(
                f"{key}: the adapter holds {rest!r} of {address.runtime}, a Linear that splice fused or split; "
                "the original model has no such tensor, so a vanilla adapter cannot hold it"
            )
    cols = {}
    for name, (spec, source) in lora_map.items():
        if isinstance(source, Same):  # moved whole: every tensor of the layer (DoRA magnitudes too)
            out.update({f"{PREFIX}{name}.{rest}": t for rest, t in loras[source.path].items()})
            continue
        weights, cols[name] = materialize(
            spec, source, lambda path, name=name: _factors(loras[path], name), where=name
        )
        out.update(_factor_keys(name, weights))
    return {k: v.detach().contiguous() for k, v in out.items()}, cols


def _factors(tensors: dict[str, torch.Tensor], where: str) -> LoraWeights:
    extra = sorted(set(tensors) - set(FACTORS))
    if extra or "lora_A.weight" not in tensors:
        raise AdapterError(
            f"{where}: the LoRA has {', '.join(extra)} besides A and B (a LoRA variant such as DoRA), which "
            "cannot be split or stacked exactly"
        )
    return LoraWeights(tensors["lora_A.weight"], tensors["lora_B.weight"], tensors.get("lora_B.bias"))


def _factor_keys(name: str, weights: LoraWeights) -> dict[str, torch.Tensor]:
    out = {f"{PREFIX}{name}.lora_A.weight": weights.A, f"{PREFIX}{name}.lora_B.weight": weights.B}
    if weights.bias is not None:
        out[f"{PREFIX}{name}.lora_B.bias"] = weights.bias
    return out


def _strip(key: str) -> str:
    if not key.startswith(PREFIX):
        raise AdapterError(
            f"adapter key {key!r} does not start with {PREFIX!r} (not a LoRA adapter of a model)"
        )
    return key[len(PREFIX) :]


def _write(
    out: Path, config: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], auto_mapping: Any
) -> None:
    """Both files written aside, then each moved into place in one rename."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".splice-adapter-", dir=out))
    try:
        header = {"format": "pt"}
        if metadata:
            header[METADATA_KEY] = json.dumps(metadata, sort_keys=True)
        save_file(tensors, staging / WEIGHTS_NAME, metadata=header)
        config.save_pretrained(str(staging), auto_mapping_dict=auto_mapping)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# load_adapter


def load_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    adapter_name: str = "default",
    *,
    fuse_lora: bool = False,
    is_trainable: bool = False,
) -> nn.Module:
    """Put a vanilla PEFT adapter (original names) onto a fused or split model; returns the PeftModel.

    Each LoRA lands on the module that stands at its original path, so outputs equal vanilla PEFT on
    the unmodified model. Files written by `save_adapter` also record what it stacked or split; onto
    the layout they were saved from, those LoRAs come back as they were trained (rank-r LoRAs on the
    split ``q`` and ``v`` rather than one rank-2r LoRA on ``qkv``).

    ``fuse_lora=True`` keeps one LoRA per fused Linear instead: the LoRAs of q/k/v (gate/up) become
    one LoRA on ``qkv_proj`` (one GEMM for all A's; A stacked, B block-diagonal, rank the sum of
    theirs, alpha keeping alpha/r). It is for inference (training would let the zero blocks learn),
    so it needs ``is_trainable=False``. Given a PeftModel, the adapter is added to it, as
    ``PeftModel.load_adapter`` does.
    """
    import peft
    from peft.utils import set_peft_model_state_dict

    from splice.peft import tensor_parallel

    if fuse_lora and is_trainable:
        raise AdapterError(
            "fuse_lora=True builds block-diagonal LoRAs for inference; training them would let the zero blocks "
            "learn (k would change where the adapter only targets q and v). Load with fuse_lora=False to train"
        )
    tensor_parallel.refuse_unsupported_sharding(model)
    config = peft.PeftConfig.from_pretrained(str(adapter_dir))
    _check_lora(config)
    state, metadata = _read(Path(adapter_dir))
    book = AddressBook.of(model)
    loras, others = _by_original_name(state, book)
    if not loras:
        raise AdapterError(
            f"{adapter_dir}: {WEIGHTS_NAME} holds no LoRA tensors (keys like ...lora_A.weight)"
        )
    specs = {name: _checked_spec(config, name, tensors) for name, tensors in loras.items()}
    weights = {name: _plain_factors(tensors) for name, tensors in loras.items()}
    lora_map, blocks = map_to_runtime(book, specs, weights, metadata, fuse_lora=fuse_lora)
    _refuse_inexact(config, [book.by_runtime[p] for p in lora_map], book)

    runtime_specs = {path: spec for path, (spec, _) in lora_map.items()}
    runtime_config = describe_config(
        config,
        runtime_specs,
        universe=book.runtime_paths,
        modules_to_save=translate_modules_to_save(config.modules_to_save, book, to_runtime=True),
        keep_default=True,
    )
    mark_runtime(runtime_config)
    tensor_parallel.prepare(model, runtime_config)
    runtime_config.inference_mode = not is_trainable
    if runtime_config.fan_in_fan_out and not any(
        type(book.by_runtime[p].module).__name__ == "Conv1D" for p in lora_map
    ):  # written for GPT-2's Conv1D c_attn; here its split parts are nn.Linear
        runtime_config.fan_in_fan_out = False

    tensors = dict(others)
    for path, (spec, source) in lora_map.items():
        if isinstance(source, Same):
            tensors.update({f"{PREFIX}{path}.{rest}": t for rest, t in loras[source.path].items()})
        else:
            built, _ = materialize(spec, source, lambda n: weights[n], where=path)
            tensors.update(_factor_keys(path, built))

    if isinstance(model, peft.PeftModel):
        type(model).add_adapter(model, adapter_name, runtime_config)
        peft_model = model
    else:
        refuse_bypassing_kernels(model, runtime_config)
        peft_model = peft.get_peft_model(model, runtime_config, adapter_name=adapter_name)
        _install(peft_model)
    tensors = tensor_parallel.lay_out(peft_model, tensors)  # under TP: this rank's DTensors
    result = set_peft_model_state_dict(peft_model, tensors, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if f".{adapter_name}" in k and "lora_" in k]
    if result.unexpected_keys or missing:
        raise AdapterError(
            f"{adapter_dir}: loading left {len(missing)} LoRA tensor(s) unset ({missing[:3]}) and found "
            f"{len(result.unexpected_keys)} without a place ({result.unexpected_keys[:3]}); please report this"
        )
    _record_blocks(peft_model, blocks, adapter_name)
    if not is_trainable:
        peft_model.eval()
    return peft_model


def _read(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterError(f"{adapter_dir}: no {WEIGHTS_NAME} (splice.peft reads safetensors adapters only)")
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    try:
        metadata = json.loads(header.get(METADATA_KEY, "{}"))
    except (json.JSONDecodeError, RecursionError):
        metadata = {}  # someone else's metadata under our key: load the adapter as a vanilla one
    return load_file(str(path)), metadata


def _by_original_name(state: dict[str, torch.Tensor], book: AddressBook):
    """LoRA tensors by original module name, and the other tensors (modules_to_save) under runtime keys."""
    loras: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = _strip(key)
        if ".lora_" in name:
            module, _, rest = name.partition(".lora_")
            loras.setdefault(book.named(module, where=f"adapter key {key}").name, {})["lora_" + rest] = tensor
            continue
        address, rest = book.owner_by_name(name)
        if address.kind != "module":
            raise AdapterError(
                f"adapter key {key}: the adapter holds its own {rest!r} for {address.name} (a trained bias, "
                f"modules_to_save or trainable tokens), but in this model {address.name} is {address.describe()} "
                "and has no tensors of its own to put it in; load the adapter onto the unfused model"
            )
        # anything else PEFT keeps beside the LoRA (modules_to_save copies, an embedding's base_layer.weight,
        # trainable-token deltas): PEFT places it, and refuses what has no place (unexpected keys, below)
        others[f"{PREFIX}{address.runtime}.{rest}"] = tensor
    return loras, others


def _checked_spec(config: Any, name: str, tensors: dict[str, torch.Tensor]) -> LoraSpec:
    spec = lora_spec(config, name)
    A = tensors.get("lora_A.weight", tensors.get("lora_embedding_A"))
    if A is not None and A.shape[0] != spec.r:
        raise AdapterError(
            f"{name}: the adapter's config gives rank {spec.r}, but its lora_A has {A.shape[0]} rows"
        )
    return spec


def _plain_factors(tensors: dict[str, torch.Tensor]) -> LoraWeights | None:
    if set(tensors) - set(FACTORS) or "lora_A.weight" not in tensors:
        return None
    return LoraWeights(tensors["lora_A.weight"], tensors["lora_B.weight"], tensors.get("lora_B.bias"))


def _record_blocks(peft_model: nn.Module, blocks: dict[str, dict[str, Block]], adapter: str) -> None:
    model = base_model(peft_model)
    for path, layout in blocks.items():
        layer = model.get_submodule(path)
        layer.__dict__.setdefault("splice_blocks", {})[adapter] = (layout, layer.lora_A[adapter])
