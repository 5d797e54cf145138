"""What splice did to one model instance: `SpliceState` and its `FusionRecord`s.

The state lives in the instance's ``__dict__`` under ``_splice_state`` (never on a class), so that
``unfuse`` and ``original_state_dict`` can run each recorded program backwards, bit for bit. Other
packages read it through :func:`get_state` and create it through :func:`ensure_state`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from splice.errors import FusionError
from splice.fusion import tp_plan
from splice.fusion.contract import FusedLayout
from splice.fusion.spec import FusionOptions
from splice.weightmap import CompiledMap, Rule, WeightMap

STATE_ATTR = "_splice_state"


@dataclass
class FusionRecord:
    """One fused module: where, by which family, what it replaced, and the exact program between layouts."""

    family: str
    path: str  # dotted path of the module whose children were replaced ("" for the root)
    parent: nn.Module
    options: FusionOptions
    program: CompiledMap  # the compiled map over keys relative to `parent`, original -> runtime, ops resolved
    originals: dict[str, nn.Module]  # the replaced children, holding no tensors while fused
    child_order: list[str]  # the parent's children before fusing, to restore them in order
    requires_grad: dict[str, bool]
    layout: FusedLayout | None = None  # None: the family's parts are not rows of one whole (chains, convs)
    call: int = 0  # which fuse() call made it; one call and family make one WeightMap stage
    installed: dict[str, nn.Module] = field(default_factory=dict)  # the children splice put in place
    forward: Any = None  # the fused forward swapped onto `parent` (splice.fusion.forwards), if any

    def rules(self) -> list[Rule]:
        """The program as literal rules over model-level keys."""
        prefix = f"{self.path}." if self.path else ""
        return [
            Rule(tuple(prefix + k for k in s.sources), tuple(prefix + k for k in s.targets), s.ops or ())
            for s in self.program.steps
            if s.rule is not None
        ]

    @property
    def runtime_keys(self) -> list[str]:
        prefix = f"{self.path}." if self.path else ""
        return [prefix + k for s in self.program.steps if s.rule is not None for k in s.targets]


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

    def weight_map(self) -> WeightMap:
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
    """The model's fusion state, or None when splice has fused nothing in it."""
    return model.__dict__.get(STATE_ATTR)


def ensure_state(model: nn.Module) -> SpliceState:
    """The model's fusion state, created (recording the model's current keys as the original ones) if absent."""
    state = get_state(model)
    if state is None:
        state = SpliceState(original_keys=list(model.state_dict(keep_vars=True)))
        model.__dict__[STATE_ATTR] = state
    return state


def drop_state(model: nn.Module) -> None:
    """Forget the fusion state (once nothing is fused any more)."""
    model.__dict__.pop(STATE_ATTR, None)


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
        return SpliceState(records=self.records).weight_map()

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
