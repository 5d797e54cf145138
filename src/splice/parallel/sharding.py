"""A model's tensor-parallel plan, read from Transformers and rewritten for splice's fused layouts.

Transformers describes TP per module: ``{"model.layers.*.self_attn.q_proj": "colwise", ...}`` (the
config's ``base_model_tp_plan`` plus the class's ``_tp_plan``). On a fused model the q/k/v entries name
parameterless `LinearSlice` modules; :func:`resolve_styles` moves them onto the fused Linear
(``qkv_proj: colwise``). :func:`build_layout` then decides, per weight, the cut and the layout:

============================  =====================  =========================================
style                         weight (bias)          layout
============================  =====================  =========================================
colwise                       Shard(0) (Shard(0))    fused parts interleaved per rank; kv heads
                                                     replicated, plain rows padded to divide
rowwise                       Shard(1) (replicated)  input columns padded like its colwise partner
colwise_gather_output         Shard(0) (Shard(0))    uneven cut, no padding (logits stay whole)
embedding_rowwise             Shard(0)               uneven cut (vocabulary-parallel)
rowwise_rep                   Shard(1) (replicated)  uneven cut (the input comes whole)
replicate / anything unnamed  replicated             as is
============================  =====================  =========================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from splice.errors import LoadError, TransformError
from splice.fusion.contract import FusedLayout, LinearStandIn, StandIn
from splice.fusion.spec import registered_families
from splice.fusion.state import get_state
from splice.parallel.layout import (
    Part,
    PartLayout,
    column_parts,
    fused_column_rules,
    layout_map,
    part_rules,
    row_rules,
)
from splice.weightmap import Rule, WeightMap

COLUMN = {"colwise", "colwise_gather_output", "colwise_rep"}
ROW = {"rowwise", "rowwise_rep", "rowwise_split_input"}
EMBEDDING = {"embedding_rowwise"}
REPLICATE = {"replicate"}
SUPPORTED = COLUMN | ROW | EMBEDDING | REPLICATE
PADDED = {"colwise", "rowwise"}  # the pairs whose activations stay sharded between them
"""Styles whose cut dim is padded to divide; the others are cut unevenly, as DTensor allows."""


@dataclass
class Group:
    """Column parts that feed one attention or MLP: a fused Linear's slices, or an attention's q/k/v."""

    path: str  # the parent module
    parts: list[PartLayout]
    fused_name: str | None = None  # None: the parts are separate Linears
    heads: bool = False  # the parts are attention heads (queries first)

    @property
    def local_sizes(self) -> tuple[int, ...]:
        return tuple(p.local_rows for p in self.parts)


@dataclass
class TPLayout:
    """Everything decided about one model at one TP size, before any weight is read."""

    tp: int
    styles: dict[str, str]  # runtime module path -> style
    rules: WeightMap  # original model keys -> TP-global keys
    dims: dict[str, int]  # TP-global key -> cut dim (keys absent are replicated)
    groups: list[Group] = field(default_factory=list)
    padded_linears: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> global (out, in)

    def runtime_map(self, model: nn.Module) -> WeightMap:
        """Runtime keys -> TP-global keys: undo the fusion, then lay the originals out for TP."""
        state = get_state(model)
        undo = state.weight_map().invert() if state is not None and state.records else WeightMap()
        return undo.then(self.rules)

    def describe(self) -> dict[str, Any]:
        """The layout as JSON-able facts: per column group the parts, local sizes, replicas and padding."""
        return {
            "tp": self.tp,
            "styles": dict(self.styles),
            "groups": [
                {
                    "path": g.path,
                    "fused_name": g.fused_name,
                    "parts": [
                        {
                            "name": p.part.name,
                            "rows": p.part.rows,
                            "unit": p.part.unit,
                            "global_rows": p.global_rows,
                            "local_rows": p.local_rows,
                            "replicas": p.replicas,
                            "padding": p.padding,
                        }
                        for p in g.parts
                    ],
                }
                for g in self.groups
            ],
            "padded_linears": {k: list(v) for k, v in self.padded_linears.items()},
        }


# --------------------------------------------------------------------------------------------------
# styles


def generic(name: str) -> str:
    """Layer numbers as ``*``, the way Transformers writes plan keys: ``layers.3.mlp`` -> ``layers.*.mlp``."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def model_plan(model: nn.Module) -> dict[str, str]:
    """The model's own TP plan (Transformers' ``tp_plan``), with ``*`` for layer numbers."""
    plan = getattr(model, "tp_plan", None)
    if plan is None:
        plan = getattr(model, "_tp_plan", None)
    return dict(plan or {})


def resolve_styles(model: nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """Concrete module path -> style, with the styles of fused slices moved onto their fused Linear."""
    unknown = {style for style in plan.values() if style not in SUPPORTED}
    if unknown:
        names = sorted(k for k, v in plan.items() if v in unknown)
        raise LoadError(
            f"tensor-parallel style(s) {sorted(unknown)} (for {names[:3]}) are not supported by splice; "
            f"supported: {sorted(SUPPORTED)}"
        )
    modules = dict(model.named_modules())
    params = {name for name, _ in model.named_parameters()}
    styles: dict[str, str] = {}
    used: set[str] = set()
    for path in modules:
        style = plan.get(generic(path)) if path else None
        if style is not None:
            styles[path] = style
            used.add(generic(path))
    for key in plan:
        if key not in used and any(generic(p) == key for p in params):
            raise LoadError(
                f"tp plan entry {key!r} names a parameter; splice shards whole modules (Linear, Embedding)"
            )
    state = get_state(model)
    for record in state.records if state is not None else []:
        if record.layout is None or record.layout.split:
            continue
        names, fused = record.layout.names, record.layout.fused_name
        prefix = _prefix(record.path)
        found = {styles.pop(prefix + n, None) for n in names}
        if found == {None}:
            continue
        if len(found) != 1:
            raise LoadError(
                f"{record.path}: the tp plan gives {', '.join(names)} different styles ({sorted(map(str, found))}); "
                f"fused into {fused} they need one"
            )
        styles[prefix + fused] = found.pop()
    for path, style in styles.items():
        module = modules[path]
        if isinstance(module, StandIn):
            raise LoadError(
                f"{path} is {module.describe()}, which holds no weight; the tp plan must shard the module that does"
            )
        expected = nn.Embedding if style in EMBEDDING else nn.Linear
        if style not in REPLICATE and not isinstance(module, expected):
            raise LoadError(
                f"tp plan: {path} is a {type(module).__name__}, but style {style!r} shards an nn.{expected.__name__}"
            )
    return styles


# --------------------------------------------------------------------------------------------------
# layout


def build_layout(model: nn.Module, styles: dict[str, str], tp: int) -> TPLayout:
    """Cut dims and the original -> TP-global rules for every sharded weight of ``model``."""
    modules = dict(model.named_modules())
    layout = TPLayout(tp, styles, WeightMap(), {})
    prepare: list[Rule] = []
    fuse: list[Rule] = []
    grouped: set[str] = set()

    state = get_state(model)
    for record in state.records if state is not None else []:
        if record.layout is None or record.layout.split:
            continue
        fused = record.layout.fused_name
        prefix = _prefix(record.path)
        style = styles.get(prefix + fused)
        if style is None or style in REPLICATE:
            continue
        if style not in COLUMN:
            raise LoadError(
                f"{prefix}{fused}: a fused Linear can only be column-parallel, the plan says {style!r}"
            )
        group = _column_group(record.layout, record.path, tp, padded=style in PADDED)
        params = ["weight"] + (["bias"] if modules[prefix + fused].bias is not None else [])
        fuse += fused_column_rules(prefix, group.parts, fused, tp, params)
        layout.groups.append(group)
        grouped.add(prefix + fused)

    for path, module in modules.items():
        if path in grouped or not isinstance(module, nn.Module):
            continue
        found = _unfused_group(module, styles, path)
        if found is None:
            continue
        group = _column_group(found, path, tp, padded=True, fused=False)
        for part in group.parts:
            linear = module._modules[part.part.name]
            params = ["weight"] + (["bias"] if linear.bias is not None else [])
            prepare += part_rules(_prefix(path), part, params)
            grouped.add(_prefix(path) + part.part.name)
        layout.groups.append(group)

    for path, style in styles.items():
        module = modules[path]
        if style in REPLICATE:
            continue
        if style in COLUMN:
            layout.dims[f"{path}.weight"] = 0
            if module.bias is not None:
                layout.dims[f"{path}.bias"] = 0
            if path in grouped or style not in PADDED:
                continue
            parent, _, name = path.rpartition(".")
            [part] = column_parts([Part(name, module.out_features)], tp, where=path)
            params = ["weight"] + (["bias"] if module.bias is not None else [])
            prepare += part_rules(_prefix(parent), part, params)
            if part.padding:
                layout.padded_linears[path] = (part.global_rows, module.in_features)
        elif style in ROW:
            layout.dims[f"{path}.weight"] = 1
            if style in PADDED:
                rules = row_rules(f"{path}.weight", module.in_features, tp)
                prepare += rules
                if rules:
                    global_in = rules[0].ops[0].size
                    layout.padded_linears[path] = (module.out_features, global_in)
        elif style in EMBEDDING:
            layout.dims[f"{path}.weight"] = 0
    layout.rules = layout_map(prepare + fuse)
    return layout


def _column_group(layout: FusedLayout, path: str, tp: int, *, padded: bool, fused: bool = True) -> Group:
    """The parts of one fused Linear (``fused``) or of separate Linears, laid out for ``tp`` ranks."""
    names, sizes = layout.names, layout.sizes
    where = f"{_prefix(path)}{layout.fused_name}" if fused else path
    if layout.heads is not None:
        parts = [Part(n, s, layout.head_dim, i > 0) for i, (n, s) in enumerate(zip(names, sizes))]
    elif layout.attention:
        raise LoadError(f"{where}: the head size of this attention is unknown, so its heads cannot be cut")
    else:
        parts = [Part(n, s) for n, s in zip(names, sizes)]
    if not padded and any(s % tp for s in sizes):
        raise LoadError(
            f"{where}: sizes {list(sizes)} do not divide by tp={tp} and its style does not allow padding"
        )
    try:
        layouts = column_parts(parts, tp, where=where)
    except TransformError as exc:
        raise LoadError(str(exc)) from None
    return Group(path, layouts, layout.fused_name if fused else None, heads=layout.heads is not None)


def _prefix(path: str) -> str:
    return f"{path}." if path else ""


def _unfused_group(module: nn.Module, styles: dict[str, str], path: str) -> FusedLayout | None:
    """Separate column-parallel children that a registered family says TP must cut together (`tp_group`)."""
    for spec in registered_families().values():
        found = spec.tp_group(module)
        if found is None:
            continue
        given = {styles.get(_prefix(path) + n) for n in found.names}
        if given & COLUMN:
            if len(given) != 1:
                raise LoadError(f"{path}: the tp plan gives {', '.join(found.names)} different styles")
            return found
    return None


# --------------------------------------------------------------------------------------------------
# making the model's own attributes say what each rank holds


_HEAD_ATTRS = {
    "num_heads": "q",
    "num_attention_heads": "q",
    "num_key_value_heads": "kv",
    "num_kv_heads": "kv",
    "num_key_value_groups": "groups",
}


def localize(model: nn.Module, layout: TPLayout) -> None:
    """Per instance: fused slices read local bounds, attention modules count local heads, Linears state global sizes."""
    modules = dict(model.named_modules())
    for group in layout.groups:
        parent = modules[group.path]
        if group.fused_name is not None:
            sizes = group.local_sizes
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            for part, start, size in zip(group.parts, starts, sizes):
                piece = parent._modules[part.part.name]
                if not isinstance(piece, LinearStandIn):
                    raise LoadError(
                        f"{group.path}.{part.part.name}: expected a stand-in of the fused {group.fused_name}"
                    )
                piece.read_rows(start, start + size)
            fused = parent._modules[group.fused_name]
            fused.out_features = sum(p.global_rows for p in group.parts)
        else:
            for part in group.parts:
                parent._modules[part.part.name].out_features = part.global_rows
        if group.heads:
            q, kv = group.parts[0], group.parts[1]
            local = {"q": q.local_rows // q.part.unit, "kv": kv.local_rows // kv.part.unit}
            local["groups"] = local["q"] // local["kv"]
            for attr, which in _HEAD_ATTRS.items():
                if isinstance(parent.__dict__.get(attr), int) and not isinstance(parent.__dict__[attr], bool):
                    parent.__dict__[attr] = local[which]
    for path, (out_features, in_features) in layout.padded_linears.items():
        module = modules[path]
        module.out_features, module.in_features = out_features, in_features
