"""Per-model surgery: `fuse`, `unfuse` and `original_state_dict`, the same way for every family.

A family builds the fused children of one module and says, as WeightMap rules, how tensors move.
This module does the rest:
- it checks every target before touching the model (so a refused request changes nothing);
- it runs each rule step on the original tensors and frees them before the next step, so the extra
  memory is about one group of weights;
- it records what it did on the model instance (`splice.fusion.state`), never on a class, so that
  ``unfuse`` and ``original_state_dict`` can run the recorded program backwards, bit for bit.

Discovery and its refusals are `splice.fusion.discovery`; reading and setting tensors by key is
`splice.fusion.tensors`.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

import torch
from torch import nn

from splice.errors import FusionError, WeightMapError
from splice.fusion import forwards, tp_plan
from splice.fusion.discovery import check_not_carried_over, discover, require_module
from splice.fusion.spec import FusionOptions, ModuleFusionSpec, registered_families, resolve_config
from splice.fusion.state import (
    FusionRecord,
    FusionReport,
    SpliceState,
    drop_state,
    ensure_state,
    get_state,
)
from splice.fusion.tensors import (
    SHARDED,
    all_tensors,
    assign,
    get_module,
    is_dtensor,
    named_tensors,
    run_steps,
    set_children,
)
from splice.transforms import TensorMeta
from splice.weightmap import CompiledMap, WeightMap

# --------------------------------------------------------------------------------------------------
# fuse


def fuse(model: nn.Module, config: Any) -> FusionReport:
    """Fuse ``model`` in place, family by family, module by module. Returns a :class:`FusionReport`.

    ``config`` is ``["qkv", "gate_up"]``, ``{"qkv": True, "gate_up": {"modules": r"layers\\.[0-3]\\."}}``
    or ``{"my_family": MySpec()}``. Everything is validated before the model is touched.
    """
    require_module(model, "splice.fuse")
    triples = resolve_config(config)
    if not triples:
        raise FusionError("the fusion config enables no family")
    entries = {family: _config_entry(family, spec, options) for family, spec, options in triples}
    state = get_state(model)
    for family, entry in entries.items():
        if state is not None and any(r.family == family for r in state.records):
            _check_same_entry(family, state.config.get(family), entry)
    fresh = get_state(model) is None
    state = ensure_state(model)
    if fresh:
        state.tp_plans = tp_plan.capture(model)
    state.calls += 1
    records: list[FusionRecord] = []
    try:
        for family, spec, options in triples:
            targets = _discover_again(model, family, spec, options, state)
            shared = Counter(id(t) for t in all_tensors(model))
            prepared = [_prepare(family, spec, options, path, module, shared) for path, module in targets]
            for _, _, _, path, module, children, *_ in prepared:
                check_not_carried_over(model, family, path, module, children)
            for item in prepared:
                record = _apply(*item, call=state.calls)
                state.records.append(record)
                records.append(record)
            if entries[family] is not None:
                state.config[family] = entries[family]
        tp_plan.sync(model, state.tp_plans, state.records)
    except BaseException:
        # a later family failed: undo this call's earlier families, so a refused request changes nothing
        for record in reversed(records):
            _restore(model, record)
            state.records.remove(record)
        for family, _, _ in triples:
            if not any(r.family == family for r in state.records):
                state.config.pop(family, None)
        if not state.records:
            drop_state(model)
        raise
    return FusionReport(records)


def _discover_again(
    model: nn.Module, family: str, spec: ModuleFusionSpec, options: FusionOptions, state: SpliceState
) -> list[tuple[str, nn.Module]]:
    """`discover`, saying so when nothing is left because the family is already fused here."""
    try:
        return discover(model, family, spec, options)
    except FusionError:
        fused = [r.path or "<root>" for r in state.records if r.family == family]
        if not fused:
            raise
        raise FusionError(
            f"{family!r} is already fused in this model ({len(fused)} module(s), e.g. {fused[0]}) and nothing is "
            f"left to fuse; unfuse(model, family={family!r}) first to fuse it again"
        ) from None


def _config_entry(family: str, spec: ModuleFusionSpec, options: FusionOptions) -> Any:
    """What config.json records for this family, or None when its name does not lead back to ``spec``."""
    return spec.options_to_json(options) if registered_families().get(family) is spec else None


def _check_same_entry(family: str, recorded: Any, entry: Any) -> None:
    """A family already fused here must be fused again the same way: config.json holds one entry per family."""
    if entry != recorded:
        described = [
            f"options {e!r}" if e is not None else "a spec passed per call" for e in (recorded, entry)
        ]
        raise FusionError(
            f"{family!r} is already fused with {described[0]}, not {described[1]}; a model records one set of "
            f"options per family: pass one config covering all its modules, or unfuse(model, family={family!r}) first"
        )


def _prepare(
    family: str, spec: ModuleFusionSpec, options: FusionOptions, path: str, module: nn.Module, shared: Counter
) -> tuple:
    where = f"{family!r} at {path or '<root>'}"
    try:
        children = spec.make_fused_module(module, options)
    except FusionError as exc:  # a spec that refuses one module: say which one
        raise FusionError(f"{where}: {exc}") from None
    rules = spec.make_transforms(module, options)
    tensors = named_tensors(module)
    try:
        compiled = WeightMap.of(rules).compile(tensors, {k: TensorMeta.of(t) for k, t in tensors.items()})
    except WeightMapError as exc:
        raise FusionError(f"{where}: {exc}") from None
    steps = [s for s in compiled.steps if s.rule is not None]
    if not steps and spec.requires_tensors:
        raise FusionError(
            f"{where}: the family's rules match none of the module's tensors {sorted(tensors)[:5]}"
        )
    sharded = [k for k, t in tensors.items() if is_dtensor(t)]
    if sharded:
        raise FusionError(f"{where}: {sharded[0]} {SHARDED}; fuse before fully_shard (or tensor parallelism)")
    requires_grad: dict[str, bool] = {}
    for step in steps:
        flags = {k: tensors[k].requires_grad for k in step.sources}
        if len(set(flags.values())) > 1:
            raise FusionError(f"{where}: {flags} disagree on requires_grad, and a fused tensor has one flag")
        requires_grad.update(flags)
        for key in step.sources:
            if shared[id(tensors[key])] > 1:
                raise FusionError(
                    f"{where}: {key} is shared with another module (tied weights); fusing would untie it"
                )
    for name, child in module._modules.items():
        if name in children and child is not None and (child._forward_hooks or child._forward_pre_hooks):
            raise FusionError(
                f"{where}: {name} has forward hooks, which would stop running once it is replaced"
            )
    return family, spec, options, path, module, children, CompiledMap(steps), requires_grad


def _apply(
    family: str,
    spec: ModuleFusionSpec,
    options: FusionOptions,
    path: str,
    module: nn.Module,
    children: dict[str, nn.Module],
    program: CompiledMap,
    requires_grad: dict[str, bool],
    *,
    call: int,
) -> FusionRecord:
    layout = spec.layout(module, options)
    child_order = list(module._modules)
    originals = {n: module._modules[n] for n in children if module._modules.get(n) is not None}
    outputs = run_steps(module, program.steps)
    set_children(module, children)
    for key, (tensor, source_key) in outputs.items():
        assign(module, key, tensor, requires_grad[source_key], where=f"{family!r} at {path or '<root>'}")
    record = FusionRecord(
        family,
        path,
        module,
        options,
        program,
        originals,
        child_order,
        requires_grad,
        layout,
        call,
        dict(children),
    )
    record.forward = forwards.install(module)
    return record


# --------------------------------------------------------------------------------------------------
# unfuse and original_state_dict


def unfuse(model: nn.Module, *, family: str | None = None) -> int:
    """Undo fusions (all of them, or one family's), newest first. Returns how many modules were restored.

    The result has the same module objects as before fusing, holding bitwise-equal tensors.
    """
    require_module(model, "splice.unfuse")
    state = get_state(model)
    if state is None or not state.records:
        raise FusionError("this model has nothing fused by splice")
    chosen = [r for r in state.records if family is None or r.family == family]
    if not chosen:
        raise FusionError(
            f"no {family!r} fusion on this model; fused families: {sorted({r.family for r in state.records})}"
        )
    later = state.records[state.records.index(chosen[0]) :]
    blocking = [r for r in later if r not in chosen and _overlaps(r, chosen)]
    if blocking:
        raise FusionError(
            f"undo {blocking[0].family!r} at {blocking[0].path} first: it was applied on top of {family!r}"
        )
    for record in chosen:
        _check_restorable(model, record)
    for record in reversed(chosen):
        _restore(model, record)
        state.records.remove(record)
    tp_plan.sync(model, state.tp_plans, state.records)
    if not state.records:
        drop_state(model)
    else:
        state.config = {k: v for k, v in state.config.items() if any(r.family == k for r in state.records)}
    return len(chosen)


def _overlaps(record: FusionRecord, chosen: list[FusionRecord]) -> bool:
    """Whether ``record`` replaced or moved a module that undoing one of ``chosen`` would put back."""
    return any(_nested(a, b) for r in chosen for a in _replaced(record) for b in _replaced(r))


def _replaced(record: FusionRecord) -> list[str]:
    """The module paths a fusion set (and its undo resets); its tensors all live under them."""
    prefix = f"{record.path}." if record.path else ""
    return [prefix + name for name in record.installed]


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def _check_restorable(model: nn.Module, record: FusionRecord) -> None:
    """Refuse before changing anything when something was put over what splice installed (e.g. LoRA)."""
    where = f"{record.family!r} at {record.path or '<root>'}"
    prefix = f"{record.path}." if record.path else ""
    sharded = [k for k, t in named_tensors(record.parent).items() if is_dtensor(t)]
    if sharded:
        raise FusionError(
            f"{where}: {prefix}{sharded[0]} {SHARDED}; unfuse before fully_shard (fusing goes before "
            "sharding), or save the original layout with splice.save_pretrained / splice.original_state_dict"
        )
    for name, child in record.installed.items():
        current = record.parent._modules.get(name)
        if current is not child:
            raise FusionError(
                f"{where}: {name} is now a {type(current).__name__}, not what splice installed; unfusing would drop it "
                "(for a PEFT adapter: merge_and_unload() or unload() first)"
            )


def _restore(model: nn.Module, record: FusionRecord) -> None:
    where = f"{record.family!r} at {record.path or '<root>'}"
    if get_module(model, record.path) is not record.parent:
        raise FusionError(f"{where}: the module there was replaced after fusing; undo that change first")
    module = record.parent
    forwards.remove(module, record.forward)
    inverse = record.program.inverse()
    outputs = run_steps(module, inverse.steps)
    module._modules = OrderedDict(
        (name, record.originals.get(name, module._modules.get(name))) for name in record.child_order
    )
    for key, (tensor, _) in outputs.items():
        assign(module, key, tensor, record.requires_grad[key], where=where)


def original_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's state dict in the layout it had before fusing (the checkpoint's layout).

    ``state_dict`` is a state dict of the fused model to convert instead of its own (one a trainer
    gathered, say), keyed as ``model.state_dict()`` is. Tensors are detached; pieces of fused tensors
    are views, so this costs no extra memory.
    """
    require_module(model, "splice.original_state_dict")
    if state_dict is None:
        state_dict = model.state_dict(keep_vars=True)
    runtime = {k: v.detach() for k, v in state_dict.items()}
    state = get_state(model)
    if state is None or not state.records:
        return runtime
    inverse = state.weight_map().invert()
    try:
        compiled = inverse.compile(runtime, {k: TensorMeta.of(t) for k, t in runtime.items()})
    except WeightMapError as exc:
        raise FusionError(
            f"the model's tensors no longer fit its fusion record ({exc}); if an adapter wraps fused modules, "
            "use splice.peft.save_adapter for the adapter and merge or unload it for the base weights"
        ) from None
    out = dict(compiled.run(runtime.__getitem__))
    order = {k: i for i, k in enumerate(state.original_keys)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))
