"""Keep a fused model's tensor-parallel plan (transformers' ``model.tp_plan``) true to its modules.

Transformers gives every ``PreTrainedModel`` instance its own plan dict (``_tp_plan``, copied from the
class and the config's ``base_model_tp_plan`` when the model is built), keyed by module paths with
``*`` for layer numbers: ``{"layers.*.self_attn.q_proj": "colwise", ...}``. Fusing moves and replaces
modules, so those keys would name parameterless slices (``q_proj``) or paths that no longer exist
(``mlp.gate_proj`` after ``norm_mlp``). Each entry follows the module objects it named:

- a Linear replaced by a slice of a fused Linear gives its style to the fused Linear
  (``qkv_proj: colwise``, which is also how transformers reads a fused projection), when all its
  siblings agree; when they do not, the entry is dropped;
- a module that moved (the MLP into a norm+MLP chain, with any Linear fused inside it) or is gone
  takes its entry with it: it is not sharded, as splice's tensor parallelism leaves moved modules
  replicated (docs/parallel.md), and a plan naming the new path would shard a chain it cannot cut.

Only the instances' plans change: never a class attribute, and never the config, which describes
the architecture a fresh (unfused) model is built from and may be shared with other models.
``unfuse`` puts back the original plan objects once nothing is fused.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

PLAN_ATTR = "_tp_plan"


@functools.lru_cache(maxsize=4096)  # every module path is asked about once per plan entry
def _generic(path: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", path)


@dataclass
class OwnerPlan:
    """One plan-holding module of the model, its plan before fusing, and the modules each entry named."""

    owner: nn.Module
    original: dict[str, Any]
    named: dict[str, list[nn.Module]] = field(default_factory=dict)


def capture(model: nn.Module) -> list[OwnerPlan]:
    """The plans of ``model`` and its submodules as they are now (call before the first fusion)."""
    owners = []
    for _, owner in model.named_modules():
        plan = owner.__dict__.get(PLAN_ATTR)
        if not isinstance(plan, dict) or not plan:
            continue
        paths = {p: (m, _generic(p)) for p, m in owner.named_modules() if p}
        named = {key: [m for p, (m, generic) in paths.items() if key in (p, generic)] for key in plan}
        owners.append(OwnerPlan(owner, plan, named))
    return owners


def sync(model: nn.Module, owners: list[OwnerPlan], records: list[Any]) -> None:
    """Rewrite each owner's plan for the modules it holds now; put the original back when nothing is fused."""
    in_place = {id(r.parent) for r in records if _module_at(model, r.path) is r.parent}
    for entry in owners:
        plan = (
            _rewrite(entry, [r for r in records if id(r.parent) in in_place]) if records else entry.original
        )
        entry.owner.__dict__[PLAN_ATTR] = entry.original if plan == entry.original else plan


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _rewrite(entry: OwnerPlan, records: list[Any]) -> dict[str, Any]:
    """``records``: the fusions whose parent module is still where it was fused."""
    paths = {id(m): p for p, m in entry.owner.named_modules() if p}
    owner_path = {id(m): p for p, m in entry.owner.named_modules()}
    replaced = {}  # id of an original module -> path of the fused module that now holds its weights
    for record in records:
        fused = None if record.layout is None else record.layout.fused_name
        parent = owner_path.get(id(record.parent))
        if fused is None or parent is None:
            continue
        for original in record.originals.values():
            replaced[id(original)] = f"{parent}.{fused}" if parent else fused
    out: dict[str, Any] = {}
    conflicts: set[str] = set()
    for key, style in entry.original.items():
        modules = entry.named[key]
        if not modules:  # names a parameter (MoE experts.gate_up_proj), which no fusion moves: keep it
            out[key] = style
            continue
        now = [paths.get(id(m)) for m in modules]
        if modules and all(p is not None and (p == key or _generic(p) == key) for p in now):
            targets = [key]  # every module it named is still where the key says
        else:  # unmoved modules keep the style, replaced ones give it to their fused Linear, others drop it
            kept = {p for p in now if p is not None and (p == key or _generic(p) == key)}
            targets = sorted(kept | {replaced[id(m)] for m in modules if id(m) in replaced})
        for target in targets:
            if out.get(target, style) != style:
                conflicts.add(target)
            out[target] = style
    for target in conflicts:  # siblings with different styles cannot share one fused Linear's style
        del out[target]
    return _generalize(out, paths)


def _generalize(plan: dict[str, Any], paths: dict[int, str]) -> dict[str, Any]:
    """Concrete paths back to ``*`` keys wherever the ``*`` key names exactly those paths (same style)."""
    existing = list(paths.values())
    out: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for key, style in plan.items():
        groups.setdefault(_generic(key), {})[key] = style
    for generic, members in groups.items():
        matched = {p for p in existing if _generic(p) == generic}
        styles = set(map(str, members.values()))
        if generic not in members and len(styles) == 1 and matched and matched <= set(members):
            out[generic] = next(iter(members.values()))
        else:
            out.update(members)
    return out
