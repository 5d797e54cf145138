"""LoRA configs in the original namespace and in the runtime one.

A user writes a `peft.LoraConfig` against the *original* model: ``target_modules=["q_proj", "v_proj"]``,
a regex, or ``"all-linear"``; ``rank_pattern``, ``alpha_pattern`` and ``modules_to_save`` by original
names too. `adapt_peft_config` resolves it the way PEFT would on the original model (PEFT's own
matching function, run over original paths), then writes a config that selects exactly the same
modules in the runtime tree, with the same rank and alpha each. `to_original_peft_config` goes back:
LoRAs on modules the original model lacks become LoRAs on the modules it has (`splice.peft.lora_map`).

Each rewritten field keeps the user's spelling when it still selects the same thing at runtime, else
the leaf names, else full paths, so configs stay readable and always exact.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND, SEQ_CLS_HEAD_NAMES
from peft.utils.other import get_pattern_key

from splice.peft.addresses import Address, AddressBook, close_names
from splice.peft.algebra import LoraSpec
from splice.peft.errors import AdapterError
from splice.peft.layer import active_variants, register
from splice.peft.lora_map import Block, LoraMap, map_to_original

RUNTIME_MARK = "_splice_runtime"  # set on configs written for the runtime tree (not serialized by PEFT)
_UNSUPPORTED_FIELDS = {
    "target_parameters": "it names parameters, whose names fusion changes",
    "layer_replication": "it rebuilds the layer stack, which would copy fused modules",
}


# --------------------------------------------------------------------------------------------------
# which modules a config targets


def lora_spec(config: Any, path: str) -> LoraSpec:
    """The rank and alpha PEFT gives the module at ``path`` (LoraModel._create_and_replace's rule)."""
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), path), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), path), config.lora_alpha)
    return LoraSpec(r, alpha, bool(config.use_rslora))


def select(config: Any, book: AddressBook, *, where: str = "LoraConfig") -> list[Address]:
    """The modules ``config`` targets when read against the original model (its names, PEFT's matching)."""
    for field, why in _UNSUPPORTED_FIELDS.items():
        if getattr(config, field, None):
            raise AdapterError(
                f"{where}: {field} is not supported on a model fused or split by splice: {why}"
            )
    if config.target_modules is None:
        raise AdapterError(f"{where}: target_modules is None; name the modules to adapt")
    if _is_all_linear(config.target_modules):
        config = _replace(config, target_modules=_original_linears(config, book))
    chosen = [a for a in book.addresses if check_target_module_exists(config, a.name)]
    if isinstance(config.target_modules, str):
        # a regex is written against the original model: a Linear splice added (qkv_proj, gate_up_proj, a
        # split q) counts only where none of the original modules it stands for matched too
        originals = {a.name for a in chosen if not a.derived}
        chosen = [a for a in chosen if not (a.derived and originals & {*a.members, a.group})]
    if not chosen:
        linears = [a.name for a in book.addresses if a.linear or a.derived]
        close = close_names(_first(config.target_modules), linears)
        raise AdapterError(
            f"{where}: target_modules={_show(config.target_modules)} matched no module of the model (names are "
            f"read in its original layout, plus the Linears splice split out); its Linear layers are named "
            f"{sorted({n.rpartition('.')[2] for n in linears})}, e.g. {close}"
        )
    _refuse_overlaps(chosen, where)
    return chosen


def _refuse_overlaps(chosen: list[Address], where: str) -> None:
    names = {a.name for a in chosen}
    for address in chosen:
        if address.kind in ("fused", "concat"):
            inner = [m for m in address.members if m in names]
            if inner:
                raise AdapterError(
                    f"{where}: targets both {address.name} and {inner[0]}, whose weight is rows of it; one "
                    f"weight takes one LoRA per adapter: target either {address.name.rpartition('.')[2]} or its parts"
                )


def _original_linears(config: Any, book: AddressBook) -> set[str]:
    """What "all-linear" means: the original model's Linears, minus the output head (as PEFT does)."""
    names = {a.name for a in book.addresses if a.linear}
    model = book.model
    head = None
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if get_output_embeddings is not None and _is_pretrained(model):
        head = get_output_embeddings()
        if head is None and str(config.task_type) in ("SEQ_CLS", "TaskType.SEQ_CLS"):
            head = next(
                (getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None
            )
    if head is not None:
        names -= {a.name for a in book.addresses if a.module is head}
    return names


def _is_pretrained(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def _is_all_linear(target: Any) -> bool:
    return isinstance(target, str) and target.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND


def _first(target: Any) -> str:
    return target if isinstance(target, str) else next(iter(sorted(target)), "")


def _show(target: Any) -> str:
    return repr(target) if isinstance(target, str) else repr(sorted(target))


# --------------------------------------------------------------------------------------------------
# writing configs


def adapt_peft_config(model: Any, lora_config: Any) -> Any:
    """A copy of ``lora_config`` (written against the original model) that PEFT applies to the fused/split model.

    Targets, ``rank_pattern``, ``alpha_pattern`` and ``modules_to_save`` are translated so that exactly the
    modules vanilla PEFT would adapt on the original model are adapted, with the same rank and alpha each;
    splice's LoRA layer for slices and concatenations is registered on the copy. A config this function
    already returned is returned as it is.
    """
    if getattr(lora_config, RUNTIME_MARK, False):
        return lora_config
    _check_lora(lora_config)
    book = AddressBook.of(model)
    chosen = select(lora_config, book)
    specs = {a.runtime: lora_spec(lora_config, a.name) for a in chosen}
    _refuse_inexact(lora_config, chosen, book)
    map_to_original(book, specs)  # raises now when the adapter could never be saved in the original layout
    runtime = describe_config(
        lora_config,
        specs,
        universe=book.runtime_paths,
        modules_to_save=translate_modules_to_save(lora_config.modules_to_save, book, to_runtime=True),
        keep_default=True,
    )
    return mark_runtime(runtime)


def to_original_peft_config(model: Any, lora_config: Any) -> Any:
    """The config of the vanilla adapter, on the unmodified model, that a runtime config amounts to.

    ``lora_config`` is read in the runtime tree (as `adapt_peft_config` writes it, or as PEFT stores it
    in ``peft_model.peft_config``). LoRAs on fused Linears become LoRAs on their parts, and LoRAs on
    split parts become one stacked LoRA on the original fused Linear, with rank and alpha to match.
    """
    _check_lora(lora_config)
    book = AddressBook.of(model)
    if _is_all_linear(lora_config.target_modules):
        raise AdapterError(
            "to_original_peft_config: target_modules='all-linear' is a request in the original layout; "
            "pass the runtime config (adapt_peft_config's result, or peft_model.peft_config[name])"
        )
    chosen = [a for a in book.addresses if check_target_module_exists(lora_config, a.runtime)]
    if not chosen:
        raise AdapterError(
            f"to_original_peft_config: target_modules={_show(lora_config.target_modules)} selects no module of this model"
        )
    specs = {a.runtime: lora_spec(lora_config, a.runtime) for a in chosen}
    lora_map = map_to_original(book, specs, blocks_of(model, _adapter_of(model, lora_config)))
    return original_config(lora_config, lora_map, book)


def original_config(lora_config: Any, lora_map: LoraMap, book: AddressBook) -> Any:
    return describe_config(
        lora_config,
        {name: spec for name, (spec, _) in lora_map.items()},
        universe=book.original_names,
        modules_to_save=translate_modules_to_save(lora_config.modules_to_save, book, to_runtime=False),
        keep_default=False,
        verbatim=False,
    )


def describe_config(
    base: Any,
    specs: dict[str, LoraSpec],
    *,
    universe: list[str],
    modules_to_save: list[str] | None,
    keep_default: bool,
    verbatim: bool = True,
) -> Any:
    """``base`` rewritten to target exactly ``specs`` (path -> rank/alpha) among the paths ``universe``."""
    targets = _target_fields(base, set(specs), universe, verbatim=verbatim)
    default = (base.r, base.lora_alpha)
    if not keep_default and not any((s.r, s.alpha) == default for s in specs.values()):
        default = Counter((s.r, s.alpha) for s in specs.values()).most_common(1)[0][0]
    ranks = {p: s.r for p, s in specs.items()}
    alphas = {p: s.alpha for p, s in specs.items()}
    config = _replace(
        base,
        **targets,
        r=default[0],
        lora_alpha=default[1],
        rank_pattern=_pattern(ranks, default[0], base.rank_pattern if verbatim else None),
        alpha_pattern=_pattern(alphas, default[1], base.alpha_pattern if verbatim else None),
        modules_to_save=modules_to_save,
    )
    selected = {p for p in universe if check_target_module_exists(config, p)}
    if selected != set(specs):  # the rewrite is checked with PEFT's own matching, so it cannot drift
        raise AdapterError(
            f"internal: rewritten targets select {sorted(selected ^ set(specs))[:5]} differently"
        )
    return config


def _target_fields(base: Any, wanted: set[str], universe: list[str], *, verbatim: bool) -> dict[str, Any]:
    cleared = {"exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}
    candidates = []
    if verbatim and not _is_all_linear(base.target_modules):
        candidates.append({})
    leaves = sorted({p.rpartition(".")[2] for p in wanted})
    candidates.append({**cleared, "target_modules": leaves})
    candidates.append({**cleared, "target_modules": sorted(wanted)})
    for fields in candidates:
        probe = _replace(base, **fields)
        if {p for p in universe if check_target_module_exists(probe, p)} == wanted:
            return fields
    return {**cleared, "target_modules": "|".join(re.escape(p) for p in sorted(wanted))}


def _pattern(values: dict[str, Any], default: Any, verbatim: dict[str, Any] | None) -> dict[str, Any]:
    """A rank/alpha pattern giving each path its value under PEFT's first-key-that-matches rule."""

    def exact(pattern: dict[str, Any]) -> bool:
        return all(pattern.get(get_pattern_key(pattern.keys(), p), default) == v for p, v in values.items())

    by_leaf: dict[str, set[Any]] = {}
    for path, value in values.items():
        by_leaf.setdefault(path.rpartition(".")[2], set()).add(value)
    # full paths first: PEFT takes the first key that matches, and a leaf key would also match them
    mixed = {re.escape(p): v for p, v in values.items() if v != default and len(by_leaf[_leaf(p)]) > 1}
    uniform = {re.escape(leaf): next(iter(vs)) for leaf, vs in by_leaf.items() if len(vs) == 1}
    by_leaves = {**mixed, **{k: v for k, v in uniform.items() if v != default}}
    candidates = [dict(verbatim)] if verbatim is not None else []
    candidates += [by_leaves, {re.escape(p): v for p, v in values.items() if v != default}]
    for pattern in candidates:
        if exact(pattern):
            return pattern
    raise AdapterError(f"internal: no rank/alpha pattern reproduces {values}")


def _leaf(path: str) -> str:
    return path.rpartition(".")[2]


def translate_modules_to_save(
    entries: Iterable[str] | None, book: AddressBook, *, to_runtime: bool
) -> list[str] | None:
    """``modules_to_save`` in the other tree (PEFT matches its entries as suffixes of module paths)."""
    if not entries:
        return None if entries is None else list(entries)
    entries = list(entries)
    originals = [a for a in book.addresses if not a.derived]
    source = (lambda a: a.name) if to_runtime else (lambda a: a.runtime)
    target = (lambda a: a.runtime) if to_runtime else (lambda a: a.name)
    chosen = [a for a in originals if any(source(a).endswith(e) for e in entries)]
    if to_runtime:
        _refuse_copies_of_stand_ins(entries, chosen, book)
    wanted = {target(a) for a in chosen}
    universe = book.runtime_paths if to_runtime else [a.name for a in originals]
    for candidate in (entries, sorted({_leaf(p) for p in wanted}), sorted(wanted)):
        if {p for p in universe if any(p.endswith(e) for e in candidate)} == wanted:
            return candidate
    raise AdapterError(f"modules_to_save={entries}: cannot name {sorted(wanted)} exactly in the other layout")


def _refuse_copies_of_stand_ins(entries: list[str], chosen: list[Address], book: AddressBook) -> None:
    """modules_to_save trains a full copy of each module it names: a stand-in or a derived Linear has none."""
    for address in chosen:
        if address.kind in ("slice", "concat"):
            raise AdapterError(
                f"modules_to_save={entries}: {address.name} is {address.describe()} in this model, with no "
                "weight of its own to copy and train; target it with LoRA, or train the unfused model"
            )
    for entry in entries:
        derived = [a.runtime for a in book.addresses if a.derived and a.runtime.endswith(entry)]
        if derived and not any(a.name.endswith(entry) for a in chosen):
            raise AdapterError(
                f"modules_to_save={entries}: {derived[0]} exists only in the model as splice fused or split it; "
                "modules_to_save names modules of the original model"
            )


# --------------------------------------------------------------------------------------------------
# helpers


def blocks_of(model: Any, adapter: str | None) -> dict[str, dict[str, Block]]:
    """Stacked-LoRA layouts recorded on the LoRA layers of ``model`` (by runtime path), for one adapter."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for path, module in model.named_modules():
        layouts = module.__dict__.get("splice_blocks") if isinstance(module, LoraLayer) else None
        layout, lora_A = (layouts or {}).get(adapter, (None, None))
        # a layout holds for the lora_A it was recorded with: an adapter deleted and added again under the
        # same name is a new LoRA, with no block structure
        if layout is not None and adapter in module.lora_A and lora_A is module.lora_A[adapter]:
            found[path.removeprefix("base_model.model.")] = layout
    return found


def mark_runtime(config: Any) -> Any:
    register(config)
    setattr(config, RUNTIME_MARK, True)
    return config


def _adapter_of(model: Any, config: Any) -> str | None:
    """The adapter name ``config`` belongs to, when ``model`` is a PeftModel holding it."""
    for name, held in (getattr(model, "peft_config", None) or {}).items():
        if held is config:
            return name
    return None


def _check_lora(config: Any) -> None:
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        raise AdapterError(f"splice.peft maps LoRA adapters; got a {type(config).__name__}")


def _refuse_inexact(config: Any, chosen: list[Address], book: AddressBook) -> None:
    from splice.peft.layer import EXACT_INITS, refuse_inexact

    # bias="lora_only" trains the bias of each adapted Linear, bias="all" every bias: a bias that splice
    # fused or split cannot be trained for some rows only, nor saved under the original keys
    trained = {"all": book.addresses, "lora_only": chosen}.get(config.bias, [])
    for address in trained:
        if address.kind != "module" and getattr(address.module, "bias", None) is not None:
            raise AdapterError(
                f"{address.name}: bias={config.bias!r} would train the bias of {address.describe()}, whose "
                "rows belong to Linears that splice fused or split; a vanilla adapter keeps each Linear's bias "
                "apart. Use bias='none' (lora_bias=True gives LoRA its own bias), or train the unfused model"
            )
    for address in chosen:
        if address.kind in ("slice", "concat"):
            refuse_inexact(config, address.module, address.name)
        elif address.derived and (active_variants(config) or config.init_lora_weights not in EXACT_INITS):
            what = ", ".join(active_variants(config)) or f"init_lora_weights={config.init_lora_weights!r}"
            raise AdapterError(
                f"{address.name}: {what} on a Linear that splice {'fused' if address.kind == 'fused' else 'split'} "
                "cannot be saved for the original model, whose weight there is laid out differently; target "
                "original modules, or drop it"
            )


def _replace(config: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that keeps PEFT's validation and splice's per-config registration."""
    custom = copy.copy(getattr(config, "_custom_modules", None))
    mark = getattr(config, RUNTIME_MARK, False)
    new = dataclasses.replace(config, **changes)
    if custom:
        new._register_custom_module(custom)
    if mark:
        setattr(new, RUNTIME_MARK, True)
    return new
