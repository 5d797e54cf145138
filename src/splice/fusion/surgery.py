"""Per-model surgery: `fuse`, `unfuse` and `original_state_dict`, the same way for every family.

A family builds the fused children of one module and says, as WeightMap rules, how tensors move.
This module does the rest:
- it checks every target before touching the model (so a refused request changes nothing);
- it runs each rule step on the original tensors and frees them before the next step, so the extra
  memory is about one group of weights;
- it records what it did on the model instance (``model._splice_state``), never on a class, so that
  ``unfuse`` and ``original_state_dict`` can run the recorded plan backwards, bit for bit.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from splice.errors import FusionError, WeightMapError
from splice.fusion import forwards, tp_plan
from splice.fusion.spec import FusionOptions, ModuleFusionSpec, registered_families, resolve_config
from splice.transforms import TensorMeta
from splice.weightmap import CompiledMap as Plan
from splice.weightmap import Rule, Step, WeightMap

STATE_ATTR = "_splice_state"


@dataclass
class FusionRecord:
    """One fused module: where, by which family, what it replaced, and the exact plan between layouts."""

    family: str
    path: str  # dotted path of the module whose children were replaced ("" for the root)
    parent: nn.Module
    options: FusionOptions
    plan: Plan  # over keys relative to `parent`, original -> runtime, ops resolved
    originals: dict[str, nn.Module]  # the replaced children, holding no tensors while fused
    child_order: list[str]  # the parent's children before fusing, to restore them in order
    requires_grad: dict[str, bool]
    layout: dict[str, Any] = field(default_factory=dict)
    call: int = 0  # which fuse() call made it; one call and family make one WeightMap stage
    installed: dict[str, nn.Module] = field(default_factory=dict)  # the children splice put in place
    forward: Any = None  # the fused forward swapped onto `parent` (splice.fusion.forwards), if any

    def rules(self) -> list[Rule]:
        """The plan as literal rules over model-level keys."""
        prefix = f"{self.path}." if self.path else ""
        return [
            Rule(tuple(prefix + k for k in s.sources), tuple(prefix + k for k in s.targets), s.ops or ())
            for s in self.plan.steps
            if s.rule is not None
        ]

    @property
    def runtime_keys(self) -> list[str]:
        prefix = f"{self.path}." if self.path else ""
        return [prefix + k for s in self.plan.steps if s.rule is not None for k in s.targets]


@dataclass
class SpliceState:
    """What splice did to one model instance. Lives in the instance's ``__dict__``, nowhere else."""

    records: list[FusionRecord] = field(default_factory=list)
    # JSON form, for config.json: one entry per family fused by its registered name, so that the name
    # and options reproduce exactly these records (fuse_modules chains and specs passed per call have none)
    config: dict[str, Any] = field(default_factory=dict)
    original_keys: list[str] = field(default_factory=list)
    calls: int = 0
    gather_state_dict: Any = (
        None  # set by splice.parallel for a sharded model: (model, original) -> dict | None
    )
    tp_plans: list[tp_plan.OwnerPlan] = field(default_factory=list)  # the TP plans before fusing

    def weight_map(self, kinds: Iterable[str] | None = None) -> WeightMap:
        """Original layout -> runtime layout, one stage per (fuse call, family), in the order applied."""
        stages: dict[tuple[int, str], list[Rule]] = {}
        for record in self.records:
            stages.setdefault((record.call, record.family), []).extend(record.rules())
        return WeightMap(tuple(tuple(rules) for rules in stages.values()))

    def check_reloadable(self) -> None:
        """Refuse a runtime-layout save whose fusion_config could not load it back."""
        unnamed = sorted({r.family for r in self.records} - set(self.config))
        if unnamed:
            raise FusionError(
                f"cannot save the runtime layout: fusion_config can only name registered families, and "
                f"{', '.join(map(repr, unnamed))} came from fuse_modules or a spec passed per call; save in the "
                "original layout (the default) or unfuse them first"
            )


def get_state(model: nn.Module) -> SpliceState | None:
    return model.__dict__.get(STATE_ATTR)


def _ensure_state(model: nn.Module) -> SpliceState:
    state = get_state(model)
    if state is None:
        state = SpliceState(original_keys=list(model.state_dict(keep_vars=True)))
        model.__dict__[STATE_ATTR] = state
    return state


# --------------------------------------------------------------------------------------------------
# the report


@dataclass
class FusionReport:
    """What a call fused: per family, how many modules, and the parameters they now have."""

    records: list[FusionRecord]

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(r.family for r in self.records))

    def __getitem__(self, family: str) -> int:
        return self.counts.get(family, 0)

    def weight_map(self) -> WeightMap:
        state = SpliceState(records=self.records)
        return state.weight_map()

    def rows(self) -> list[tuple[str, int, str, str]]:
        """``(family, modules, example module, runtime parameter names)`` with layer indices as ``*``."""
        rows = []
        for family, count in self.counts.items():
            records = [r for r in self.records if r.family == family]
            paths = _generalize(r.path for r in records)
            keys = _generalize(k for r in records for k in r.runtime_keys)
            rows.append((family, count, ", ".join(paths), ", ".join(keys)))
        return rows

    def __str__(self) -> str:
        lines = [
            f"{family}: {count} module(s) at {paths}\n    -> {keys}"
            for family, count, paths, keys in self.rows()
        ]
        return "\n".join(lines) or "nothing fused"


def _generalize(names: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for name in names:
        seen[re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)] = None
    return list(seen)


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
    state = _ensure_state(model)
    if fresh:
        state.tp_plans = tp_plan.capture(model)
    state.calls += 1
    records: list[FusionRecord] = []
    try:
        for family, spec, options in triples:
            targets = _discover_again(model, family, spec, options, state)
            shared = Counter(id(t) for t in _all_tensors(model))
            prepared = [_prepare(family, spec, options, path, module, shared) for path, module in targets]
            for _, _, _, path, module, children, *_ in prepared:
                _check_not_carried_over(model, family, path, module, children)
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
            del model.__dict__[STATE_ATTR]
        raise
    return FusionReport(records)


def require_module(model: Any, function: str) -> None:
    """A `FusionError` when ``model`` is not an ``nn.Module`` (a path or a name, passed where the model goes)."""
    if not isinstance(model, nn.Module):
        shown = repr(model) if len(repr(model)) <= 60 else repr(model)[:57] + "..."
        raise FusionError(
            f"{function}: expected the model, a torch.nn.Module, got {type(model).__name__} {shown}"
            + (
                "; load it first (splice.from_pretrained loads a path fused)"
                if isinstance(model, str)
                else ""
            )
        )


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


def discover(
    model: nn.Module, family: str, spec: ModuleFusionSpec, options: FusionOptions
) -> list[tuple[str, nn.Module]]:
    """The modules ``spec`` will fuse, or a FusionError saying what was looked for and where."""
    modules = [
        (path, m)
        for path, m in model.named_modules()
        if any(fnmatchcase(path, glob) for glob in spec.target_modules_patterns)
    ]
    if options.modules is not None:
        selected = [(p, m) for p, m in modules if re.search(options.modules, p)]
        if not selected:
            near = [p for p, m in modules if spec.is_fusable(m, options)][:5]
            raise FusionError(
                f"{family!r}: option modules={options.modules!r} matched no module; "
                f"fusable modules include {near or 'none'}"
            )
        modules = selected
    found = [(p, m) for p, m in modules if _is_fusable(spec, p, m, options)]
    if not found:
        scope = f" among modules matching {options.modules!r}" if options.modules else ""
        raise FusionError(
            f"{family!r}: found no {spec.describe_candidates(options)}{scope}{_why(spec, modules, options)}"
            f"{_blocks(model) if not options.modules else ''}"
        )
    _refuse_partial(family, spec, options, modules, found)
    return found


def _is_fusable(spec: ModuleFusionSpec, path: str, module: nn.Module, options: FusionOptions) -> bool:
    """``spec.is_fusable``; a refusal it raises names the module's path."""
    try:
        return spec.is_fusable(module, options)
    except FusionError as exc:
        raise FusionError(f"{exc} (at {path or '<root>'})") from None


def _refuse_partial(
    family: str,
    spec: ModuleFusionSpec,
    options: FusionOptions,
    modules: list[tuple[str, nn.Module]],
    found: list[tuple[str, nn.Module]],
) -> None:
    """A family fuses all the modules it claims (among those ``modules=`` selects) or none."""
    refused = [(p, why) for p, m in modules if (why := spec.refusal(m, options)) is not None]
    if refused:
        shown = "; ".join(f"{p or '<root>'}: {why}" for p, why in refused[:3])
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise FusionError(
            f"{family!r}: {len(refused)} of the {len(found) + len(refused)} modules it would fuse cannot be fused, "
            f"so none is: {shown}{more}; make them agree, or pass the option modules=<regex> to fuse only the others"
        )


def _why(spec: ModuleFusionSpec, modules: list[tuple[str, nn.Module]], options: FusionOptions) -> str:
    why_not = getattr(spec, "why_not", None)
    names = getattr(options, "names", None) or getattr(spec, "candidate_names", [None])[0]
    if why_not is None or names is None:
        return ""
    for path, module in modules:
        if all(n in module._modules for n in names):
            return f"; e.g. {path or '<root>'} is not fusable: {why_not(module, tuple(names), options)}"
    return ""


def _check_not_carried_over(
    model: nn.Module, family: str, path: str, module: nn.Module, children: dict
) -> None:
    """Refuse when the model's own code moves a replaced child to another module (it would strand the fused one)."""
    from splice.fusion.adjacency import why_carried_over

    replaced = [n for n in children if module._modules.get(n) is not None]
    parts = path.split(".") if path else []
    lineage = [model] + [model.get_submodule(".".join(parts[: i + 1])) for i in range(len(parts))]
    why = why_carried_over([type(m) for m in lineage], replaced)
    if why is not None:
        raise FusionError(f"{family!r} at {path or '<root>'}: {why}")


def _blocks(model: nn.Module) -> str:
    """What the model's repeated blocks hold, so "nothing to fuse" can be checked at a glance (Mamba, RWKV, ...)."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and not isinstance(module[0], nn.ModuleList):
            block = module[0]
            children = ", ".join(f"{n}: {type(c).__name__}" for n, c in list(block.named_children())[:6])
            return f"; {type(model).__name__}'s blocks ({path}.*) are {type(block).__name__}({children}), so there is nothing for it to fuse"
    return ""


def _all_tensors(model: nn.Module) -> list[torch.Tensor]:
    tensors = [p for _, p in model.named_parameters(remove_duplicate=False)]
    return tensors + [b for _, b in model.named_buffers(remove_duplicate=False)]


def _prepare(
    family: str, spec: ModuleFusionSpec, options: FusionOptions, path: str, module: nn.Module, shared: Counter
) -> tuple:
    where = f"{family!r} at {path or '<root>'}"
    try:
        children = spec.make_fused_module(module, options)
    except FusionError as exc:  # a spec that refuses one module: say which one
        raise FusionError(f"{where}: {exc}") from None
    rules = spec.make_transforms(module, options)
    tensors = _named_tensors(module)
    try:
        plan = WeightMap.of(rules).compile(tensors, {k: TensorMeta.of(t) for k, t in tensors.items()})
    except WeightMapError as exc:
        raise FusionError(f"{where}: {exc}") from None
    steps = [s for s in plan.steps if s.rule is not None]
    if not steps and spec.requires_tensors:
        raise FusionError(
            f"{where}: the family's rules match none of the module's tensors {sorted(tensors)[:5]}"
        )
    sharded = [k for k, t in tensors.items() if _is_dtensor(t)]
    if sharded:
        raise FusionError(
            f"{where}: {sharded[0]} {_SHARDED}; fuse before fully_shard (or tensor parallelism)"
        )
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
    return family, spec, options, path, module, children, Plan(steps), requires_grad


def _apply(
    family: str,
    spec: ModuleFusionSpec,
    options: FusionOptions,
    path: str,
    module: nn.Module,
    children: dict[str, nn.Module],
    plan: Plan,
    requires_grad: dict[str, bool],
    *,
    call: int,
) -> FusionRecord:
    layout = spec.layout(module, options)
    child_order = list(module._modules)
    originals = {n: module._modules[n] for n in children if module._modules.get(n) is not None}
    outputs = _run_steps(module, plan.steps)
    _set_children(module, children)
    for key, (tensor, source_key) in outputs.items():
        _assign(module, key, tensor, requires_grad[source_key], where=f"{family!r} at {path or '<root>'}")
    record = FusionRecord(
        family,
        path,
        module,
        options,
        plan,
        originals,
        child_order,
        requires_grad,
        layout,
        call,
        dict(children),
    )
    record.forward = forwards.install(module)
    return record


def _run_steps(module: nn.Module, steps: list[Step]) -> dict[str, tuple[torch.Tensor, str]]:
    """Run each step on the module's current tensors, then detach those tensors from the module.

    A pure rename moves the Parameter object itself, so optimizers and hooks holding it stay valid.
    """
    outputs: dict[str, tuple[torch.Tensor, str]] = {}
    with torch.no_grad():
        for step in steps:
            originals = [_get_tensor(module, k) for k in step.sources]
            if step.is_rename:
                results = originals
            else:
                sources = [t.detach() for t in originals]
                results = [_own_memory(t, sources) for t in step.run(sources)]
                del sources
            for key in step.sources:
                _strip(module, key)
            for key, tensor in zip(step.targets, results):
                outputs[key] = (tensor, step.sources[0])
            del originals, results
    return outputs


def _own_memory(tensor: torch.Tensor, sources: list[torch.Tensor]) -> torch.Tensor:
    """A view into a source would keep the whole source alive (and shared storage breaks saving)."""
    if tensor.is_meta:
        return tensor
    ptr = tensor.untyped_storage().data_ptr()
    if any(ptr == s.untyped_storage().data_ptr() for s in sources) or not tensor.is_contiguous():
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor


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
        del model.__dict__[STATE_ATTR]
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
    sharded = [k for k, t in _named_tensors(record.parent).items() if _is_dtensor(t)]
    if sharded:
        raise FusionError(
            f"{where}: {prefix}{sharded[0]} {_SHARDED}; unfuse before fully_shard (fusing goes before "
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
    if _get_module(model, record.path) is not record.parent:
        raise FusionError(f"{where}: the module there was replaced after fusing; undo that change first")
    module = record.parent
    forwards.remove(module, record.forward)
    inverse = record.plan.inverse()
    outputs = _run_steps(module, inverse.steps)
    module._modules = OrderedDict(
        (name, record.originals.get(name, module._modules.get(name))) for name in record.child_order
    )
    for key, (tensor, _) in outputs.items():
        _assign(module, key, tensor, record.requires_grad[key], where=where)


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
        plan = inverse.compile(runtime, {k: TensorMeta.of(t) for k, t in runtime.items()})
    except WeightMapError as exc:
        raise FusionError(
            f"the model's tensors no longer fit its fusion record ({exc}); if an adapter wraps fused modules, "
            "use splice.peft.save_adapter for the adapter and merge or unload it for the base weights"
        ) from None
    out = dict(plan.run(runtime.__getitem__))
    order = {k: i for i, k in enumerate(state.original_keys)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


# --------------------------------------------------------------------------------------------------
# tensor and module plumbing


_SHARDED = "is sharded (a DTensor: fully_shard or tensor parallelism), and surgery needs whole tensors"


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict(keep_vars=True))


def _owner(module: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, leaf = key.rpartition(".")
    owner = module.get_submodule(path) if path else module
    return owner, leaf


def _get_tensor(module: nn.Module, key: str) -> torch.Tensor:
    owner, leaf = _owner(module, key)
    tensor = owner._parameters.get(leaf)
    if tensor is None:
        tensor = owner._buffers.get(leaf)
    if tensor is None:
        raise FusionError(f"no tensor {key!r} in {type(module).__name__}")
    return tensor


def _strip(module: nn.Module, key: str) -> None:
    owner, leaf = _owner(module, key)
    if leaf in owner._parameters:
        owner._parameters[leaf] = None
    else:
        owner._buffers[leaf] = None


def _assign(module: nn.Module, key: str, tensor: torch.Tensor, requires_grad: bool, *, where: str) -> None:
    try:
        owner, leaf = _owner(module, key)
    except AttributeError:
        raise FusionError(f"{where}: the fused module has no submodule for {key!r}") from None
    if leaf in owner._parameters:
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=requires_grad)
        owner._parameters[leaf] = tensor
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        raise FusionError(f"{where}: the fused module has no parameter or buffer slot for {key!r}")


def _set_children(module: nn.Module, children: dict[str, nn.Module]) -> None:
    """Set children, putting new ones where the first replaced child stood (keeps state_dict order natural)."""
    new = [n for n in children if n not in module._modules]
    ordered: OrderedDict[str, nn.Module | None] = OrderedDict()
    for name, child in module._modules.items():
        if name in children and new:
            for n in new:
                ordered[n] = children[n]
            new = []
        ordered[name] = children.get(name, child)
    for n in new:
        ordered[n] = children[n]
    module._modules = ordered


def _get_module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None
