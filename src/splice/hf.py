"""Transformers integration: `from_pretrained` straight into a fused layout, `save_pretrained` back out.

Loading builds the model on the meta device (thread-local: nothing global changes), fuses it there
(cheap: no weights exist yet), then compiles one `WeightMap` from the checkpoint's keys to the fused
model's keys: transformers' own checkpoint renames for this model, then the fusion rules. Each
runtime tensor is allocated once and filled straight from the file (`CheckpointReader.read_into`),
so there is never an unfused copy in memory. Loading is strict: a weight the checkpoint lacks or
whose shape does not fit is a `LoadError` naming it, never a random init.

Saving runs the recorded fusion plan backwards, applies transformers' reverse renames, and writes
through `CheckpointWriter` into a staging directory that replaces the target atomically; by default
the result is the original checkpoint layout, byte for byte.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.checkpoint import CheckpointReader, CheckpointWriter
from splice.converters import translate
from splice.errors import CheckpointError, LoadError, WeightMapError, WeightsMismatchError
from splice.fusion.surgery import SpliceState, fuse, get_state, original_state_dict, unfuse
from splice.hf_buffers import materialize_computed_buffers
from splice.hf_options import LoadCall, loading_info
from splice.hf_save_checks import check_runtime_layout_reloads, model_to_save
from splice.transforms import Concat, Reshape, Stack, TensorMeta, Transpose
from splice.weightmap import Plan, Rule, Step, WeightMap

logger = logging.getLogger("splice")

CONFIG_KEY = "fusion_config"
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
_HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "proxies", "subfolder")


# --------------------------------------------------------------------------------------------------
# loading


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
    no path) and ``output_loading_info=True`` work as in transformers (see `splice.hf_options`).
    """
    import transformers  # noqa: F401  (fail early with a clear ImportError when the extra is missing)

    call = LoadCall.parse(pretrained_model_name_or_path, config, kwargs)
    if tp_plan is not None or distributed_config is not None or kwargs.get("tp_size") is not None:
        if call.state_dict is not None or call.output_loading_info:
            raise LoadError("state_dict= and output_loading_info= are not supported with tensor parallelism")
        from splice.parallel.load import (
            from_pretrained_tp,  # a call-time plugin: parallel builds on this module
        )

        return from_pretrained_tp(
            cls, pretrained_model_name_or_path, fusion_config=fusion_config, config=config, dtype=dtype,
            torch_dtype=torch_dtype, attn_implementation=attn_implementation, tp_plan=tp_plan,
            distributed_config=distributed_config, key_mapping=key_mapping, **kwargs,
        )  # fmt: skip
    prepared = prepare(
        cls, pretrained_model_name_or_path, fusion_config=fusion_config, config=config, dtype=dtype,
        torch_dtype=torch_dtype, attn_implementation=attn_implementation, device_map=device_map,
        key_mapping=key_mapping, trust_remote_code=trust_remote_code, source=call.reader(), **kwargs,
    )  # fmt: skip
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
    return (model, loading_info(prepared.unexpected)) if call.output_loading_info else model


class Prepared:
    """A model built on meta and fused, with everything needed to compile and run its load plan."""

    def __init__(
        self, model, path, weight_map, target_dtype, dtype_plan, transforms, missing_ok, device, source=None
    ):
        self.model, self.path, self.weight_map = model, Path(path), weight_map
        self.target_dtype, self.dtype_plan, self.transforms = target_dtype, dtype_plan, transforms
        self.missing_ok, self.device = missing_ok, device
        self.source = source  # a StateDictReader when the weights were given in memory
        self.dtypes: dict[str, torch.dtype] = {}
        self.unexpected: list[str] = []

    def open(self) -> Any:
        """The reader of the weights: the checkpoint's files, or the state dict given."""
        return CheckpointReader(self.path) if self.source is None else self.source

    def compile(self, reader: CheckpointReader) -> Plan:
        """The checkpoint -> runtime plan, checked strictly against the model's own tensors."""
        metas = reader.metas()
        try:
            plan = self.weight_map.compile(list(metas), metas)
        except WeightMapError as exc:
            raise WeightsMismatchError(
                f"{self.path}: the checkpoint does not fit the requested layout: {exc}"
            ) from None
        expected = {k: TensorMeta.of(t) for k, t in self.model.state_dict(keep_vars=True).items()}
        produced = plan.target_metas
        missing = [k for k in expected if k not in produced and k not in self.missing_ok]
        if missing:
            raise WeightsMismatchError(
                f"{self.path}: the checkpoint has no weight for {len(missing)} model key(s): {_few(missing)}; "
                "refusing to leave them randomly initialized"
            )
        for key, meta in produced.items():
            if key in expected and meta.shape != expected[key].shape:
                step = plan.step_for(key)
                raise WeightsMismatchError(
                    f"{self.path}: {key} has shape {list(meta.shape)} in the checkpoint (from {', '.join(step.sources)}) "
                    f"but the model expects {list(expected[key].shape)}"
                )
        unexpected = [k for k in produced if k not in expected and not _ignored_unexpected(self.model, k)]
        self.unexpected = unexpected
        if unexpected:
            logger.warning(
                "%s: ignoring %d checkpoint key(s) the model has no place for: %s",
                self.path,
                len(unexpected),
                _few(unexpected),
            )
        steps = [s for s in plan.steps if any(t in expected for t in s.targets)]
        for step in steps:
            for key in step.targets:
                if key in expected:
                    self.dtypes[key] = self._dtype_for(key, produced[key].dtype)
        return Plan(steps, plan.unclaimed, plan.unused_rules)

    def _dtype_for(self, key: str, stored: torch.dtype) -> torch.dtype:
        if not stored.is_floating_point or self.target_dtype is None:
            return stored
        for pattern, dtype in self.dtype_plan.items():
            if re.search(pattern, key):
                return dtype
        return self.target_dtype

    def finish(self) -> nn.Module:
        model = self.model
        model._weight_conversions = [t for t in self.transforms if t.was_used()]
        model.tie_weights(missing_keys=set(self.missing_ok) & _meta_keys(model), recompute_mapping=False)
        left = sorted(_meta_keys(model))
        if left:
            raise LoadError(f"{self.path}: no value for {_few(left)} after loading (please report this)")
        _load_generation_config(model, self.path if self.source is None else None)
        model.eval()
        return model


def prepare(
    cls: Any,
    path: str | os.PathLike,
    *,
    fusion_config: Any = None,
    config: Any = None,
    dtype: Any = None,
    torch_dtype: Any = None,
    attn_implementation: str | dict | None = None,
    device_map: Any = None,
    key_mapping: dict[str, str] | None = None,
    trust_remote_code: bool = False,
    source: Any = None,
    **kwargs: Any,
) -> Prepared:
    """Resolve files, config and class; build the model on meta; fuse it; build the checkpoint map."""
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
    hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    local = resolve_path(path, hub) if source is None else source.path
    config = _load_config(cls, local, config, kwargs)
    model_cls = _model_class(cls, config)
    stored = getattr(config, CONFIG_KEY, None)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)  # the fusion lives in splice's per-model state, never in the config
    requested = stored if fusion_config is None else fusion_config

    with CheckpointReader(local) if source is None else source as reader:
        keys = reader.keys()
        checkpoint_metas = reader.metas()
        target_dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype, config, reader)
    model = build_on_meta(model_cls, config, attn_implementation, target_dtype)
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
    checkpoint_keys_space = (
        list(model.state_dict(keep_vars=True)) if stored == requested and stored else original_keys
    )
    renames, transforms = checkpoint_renames(
        model, keys, checkpoint_keys_space, key_mapping, checkpoint_metas
    )
    weight_map = renames if stored == requested and stored else renames.then(layout_map)
    missing_ok = set(getattr(model, "all_tied_weights_keys", {}) or {})
    dtype_plan = model._get_dtype_plan(target_dtype) if target_dtype is not None else {}
    device = _device(device_map)
    return Prepared(
        model, local, weight_map, target_dtype, dtype_plan, transforms, missing_ok, device, source
    )


def resolve_path(path: str | os.PathLike, hub: dict[str, Any]) -> Path:
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


def _load_config(cls: Any, path: Path, config: Any, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoConfig, PretrainedConfig

    if config is None:
        if not (path / "config.json").is_file():
            raise LoadError(f"{path}: no config.json")
        loader = AutoConfig if hasattr(cls, "_model_mapping") else getattr(cls, "config_class", AutoConfig)
        config, unused = loader.from_pretrained(path, return_unused_kwargs=True, **kwargs)
    else:
        if not isinstance(config, PretrainedConfig):
            raise LoadError(f"config= must be a transformers PretrainedConfig, got {type(config).__name__}")
        config = copy.deepcopy(config)
        unused = {}
        for key, value in kwargs.items():
            if hasattr(config, key):
                setattr(config, key, value)
            else:
                unused[key] = value
    if unused:
        raise LoadError(
            f"unknown keyword argument(s) {sorted(unused)}: neither from_pretrained options nor config attributes"
        )
    return config


def _model_class(cls: Any, config: Any) -> Any:
    if hasattr(cls, "_model_mapping"):
        from transformers.models.auto.auto_factory import _get_model_class

        try:
            return _get_model_class(config, cls._model_mapping)
        except KeyError:
            raise LoadError(
                f"{cls.__name__} has no model class for config type {type(config).__name__}"
            ) from None
    return cls


def _resolve_dtype(dtype: Any, config: Any, reader: CheckpointReader) -> torch.dtype | None:
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


def _device(device_map: Any) -> torch.device | None:
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
    model_cls: Any, config: Any, attn_implementation: Any, dtype: torch.dtype | None
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


def checkpoint_renames(
    model: nn.Module,
    checkpoint_keys: list[str],
    model_keys: list[str],
    key_mapping: dict[str, str] | None,
    metas: Mapping[str, TensorMeta] | None = None,
) -> tuple[WeightMap, list[Any]]:
    """Transformers' own checkpoint-key -> model-key conversions for this model, as a WeightMap stage.

    Renames become renames. Of transformers' ``WeightConverter``s, the ones every MoE model of the
    Mixtral and Qwen2-MoE families uses become exact ops: ``MergeModulelist(dim=0)`` (per-expert
    ``down_proj`` -> one ``[E, out, in]`` tensor) and ``MergeModulelist(dim=0), Concatenate(dim=1)``
    (per-expert gate and up -> ``[E, 2 * inter, hidden]``), and so does a plain ``Concatenate``. Other
    converters are refused by name.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model, key_mapping=key_mapping)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    present = dict.fromkeys(model_keys, True)
    rules = []
    converted: dict[tuple[int, str], dict[int, list[str]]] = {}
    for key in checkpoint_keys:
        new, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, present)
        if new not in present and key in present:
            new, pattern = rename_source_key(key, [], [], model.base_model_prefix, present)
        if pattern is not None:
            index = next(i for i, c in enumerate(converters) if pattern in c.source_patterns)
            slot = list(converters[index].source_patterns).index(pattern)
            converted.setdefault((index, new), {}).setdefault(slot, []).append(key)
        elif new != key:
            rules.append(Rule((key,), (new,)))
    after: list[Rule] = []  # per-target ops of a one-to-many converter (PermuteForRope after a Chunk)
    for (index, target), slots in converted.items():
        translated = translate(converters[index], target, slots, metas or {}, model)
        if translated is None:
            rules.append(_converter_rule(converters[index], target, slots, metas or {}))
        else:
            rules += translated[0]
            after += translated[1]
    return WeightMap.of(rules).then(WeightMap.of(after)), transforms


def _converter_rule(
    converter: Any, target: str, slots: dict[int, list[str]], metas: Mapping[str, TensorMeta]
) -> Rule:
    """One transformers ``WeightConverter`` application (all its source keys for one target) as a Rule."""
    patterns = list(converter.source_patterns)
    operations = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    described = (
        f"{type(converter).__name__}({patterns} -> {converter.target_patterns}, {converter.operations})"
    )
    some = next(iter(slots.values()))[0]
    missing = [p for i, p in enumerate(patterns) if i not in slots]
    if missing:
        raise LoadError(
            f"{target}: transformers builds it from {patterns} but the checkpoint has no key matching {missing[0]!r} "
            f"(it has {some})"
        )
    merged = operations[:1] == [("MergeModulelist", 0)]
    if merged and (operations[1:] == [] and len(patterns) == 1 or operations[1:] == [("Concatenate", 1)]):
        sources, experts = [], None
        for i, pattern in enumerate(patterns):
            found, texts = {}, set()
            for key in slots[i]:
                text, number = _collected_index(key, pattern, described)
                found[number] = key
                texts.add(text)
            if len(texts) != 1:
                raise LoadError(
                    f"{target}: the keys matching {pattern!r} differ beyond the expert index: {sorted(texts)[:2]}"
                )
            sources.append(texts.pop())
            if experts is None:
                experts = found
            elif sorted(found) != sorted(experts):
                lone = sorted(set(found) ^ set(experts))[0]
                raise LoadError(
                    f"{target}: expert {lone} has {'no' if lone not in found else 'an'} {pattern!r} tensor while the "
                    f"other source pattern(s) {'have' if lone not in found else 'do not'}; every expert needs all of {patterns}"
                )
        assert experts is not None
        count = len(experts)
        meta = metas.get(experts[min(experts)])
        if len(patterns) == 1:
            return Rule(tuple(sources), (target,), (Stack(0),))
        if meta is None:
            raise LoadError(f"{target}: the shapes of its source tensors are needed to convert them")
        shape = tuple(meta.shape)
        ops = (  # stack every source's experts, then lay them out expert-major: [E, k * out, in]
            Stack(0),
            Reshape((len(patterns), count, *shape)),
            Transpose(0, 1),
            Reshape((count, len(patterns) * shape[0], *shape[1:])),
        )
        return Rule(tuple(sources), (target,), ops)
    if len(operations) == 1 and operations[0][0] == "Concatenate" and all("*" not in p for p in patterns):
        if any(len(slots[i]) != 1 for i in range(len(patterns))):
            raise LoadError(f"{target}: several checkpoint keys match one source of {described}")
        return Rule(tuple(slots[i][0] for i in range(len(patterns))), (target,), (Concat(operations[0][1]),))
    raise LoadError(
        f"{some}: transformers converts this checkpoint key with {described}; splice translates MergeModulelist(dim=0) "
        "[+ Concatenate(dim=1)], Concatenate and the ops in splice.converters, not this conversion yet"
    )


def _collected_index(key: str, pattern: str, described: str) -> tuple[str, int]:
    """``key`` with the expert index that ``*`` stands for in transformers' ``pattern`` replaced by ``#``.

    Source patterns are regexes in which ``*.`` stands for one module-list index, as transformers
    compiles them (``mlp.experts.*.gate_proj.weight``, ``\\.experts.*.w1.weight``).
    """
    regex = pattern.replace("*.", r"(?P<splice_index>\d+)\.", 1)
    if re.search(r"[a-zA-Z0-9]$", regex):
        regex += r"(?!\w)"  # a name boundary, as transformers adds
    try:
        match = re.search(regex, key) if "splice_index" in regex else None
    except re.error:
        match = None
    if match is None:
        raise LoadError(
            f"{key}: cannot find the expert index of {pattern!r} in it (converting with {described})"
        )
    start, end = match.span("splice_index")
    return key[:start] + "#" + key[end:], int(match.group("splice_index"))


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


SOURCE_ATTR = "_splice_source_layout"


def remember_source(model: nn.Module, reader: CheckpointReader) -> None:
    """Which file held which tensor, so a save in the original layout can use the same split."""
    files: dict[str, list[str]] = {}
    for key in reader.keys():
        files.setdefault(reader.file_of(key).name, []).append(key)
    model.__dict__[SOURCE_ATTR] = {"files": files, "metas": reader.metas()}


def _source_shards(model: nn.Module, metas: dict[str, TensorMeta]) -> list[list[str]] | None:
    source = model.__dict__.get(SOURCE_ATTR)
    if source is None or source["metas"] != metas:
        return None
    return [keys for _, keys in sorted(source["files"].items())]


def set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    path, _, leaf = key.rpartition(".")
    owner = model.get_submodule(path) if path else model
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


def _meta_keys(model: nn.Module) -> set[str]:
    keys = {k for k, p in model.named_parameters(remove_duplicate=False) if p.is_meta}
    return keys | {k for k, b in model.named_buffers(remove_duplicate=False) if b.is_meta}


def _ignored_unexpected(model: nn.Module, key: str) -> bool:
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    patterns |= {r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"}
    return any(re.search(p, key) for p in patterns)


def _load_generation_config(model: nn.Module, path: Path | None) -> None:
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


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


# --------------------------------------------------------------------------------------------------
# saving

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
        check_runtime_layout_reloads(
            model, state, lambda: build_on_meta(type(model), model.config, None, None)
        )
    out = Path(save_directory)
    gather = getattr(state, "gather_state_dict", None) if state_dict is None else None
    finish = getattr(state, "finish_save", None)
    if gather is None and _has_dtensors(model, state_dict):  # FSDP2 (fully_shard): collective too
        from splice.parallel import fsdp

        gather, finish = functools.partial(fsdp.gather_state_dict, state_dict=state_dict), fsdp.finish_save
    if gather is None:
        if save_original_format:  # a given state dict is the fused model's too, as transformers assumes
            state_dict = original_state_dict(model, state_dict)
        elif state_dict is None:
            state_dict = model.state_dict()
        _write_checkpoint(model, state, state_dict, out, save_original_format, max_shard_size)
        return out
    # a model loaded sharded by splice.parallel: every rank gathers, rank 0 writes, and every rank returns
    # only once the checkpoint is in place, or raises if any rank failed
    try:
        state_dict = gather(model, original=save_original_format)
        if state_dict is not None:  # rank 0
            _write_checkpoint(model, state, state_dict, out, save_original_format, max_shard_size)
    except BaseException as exc:
        finish(exc)
        raise
    finish(None)
    return out


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
    shards = _source_shards(model, metas) if save_original_format and max_shard_size is None else None
    with CheckpointWriter(
        out,
        metas,
        max_shard_size=max_shard_size or "50GB",
        shards=shards,
        metadata={"format": "pt"},
        index_metadata={"total_parameters": _num_parameters(model)},
    ) as writer:
        _save_configs(model, writer.staging_dir, state, save_original_format, tensors)
        _carry_over(out, writer.staging_dir)
        for key, tensor in tensors.items():
            writer.write(key, tensor)


def _checkpoint_layout(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied copies and apply transformers' reverse renames, exactly as its save_pretrained does."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sd = dict(state_dict)
    sd = remove_tied_weights_from_state_dict(sd, model)
    sd = revert_weight_conversion(model, sd)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def _num_parameters(model: nn.Module) -> int:
    parallel = model.__dict__.get("_splice_parallel")
    if parallel is not None:  # sharded by splice.parallel: DTensor global sizes count kv replicas and padding
        return parallel.num_parameters
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()  # a DTensor reports its global size
    return total


def _save_configs(
    model: nn.Module, staging: Path, state: SpliceState | None, original: bool, tensors: dict
) -> None:
    config = copy.deepcopy(model.config)
    floating = [t.dtype for t in tensors.values() if t.dtype.is_floating_point]
    if floating:
        config.dtype = str(floating[0]).removeprefix("torch.")
    # fully_shard makes an FSDP<Name> subclass; transformers strips the prefix too
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    if not original and state is not None and state.records:
        setattr(config, CONFIG_KEY, state.config)
    elif hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    config.save_pretrained(staging)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(model, "can_generate", lambda: False)():
        generation_config.save_pretrained(staging)


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


__all__ = ["from_pretrained", "save_pretrained", "original_state_dict"]
