"""`WeightMap`: ordered stages of rules; compiling, inverting, composing, generalizing, and its JSON document."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splice.errors import WeightMapError
from splice.tensors import TensorMeta
from splice.weightmap.compiler import compile_map, resolve_stages
from splice.weightmap.patterns import numbers, wildcard_numbers
from splice.weightmap.program import CompiledMap
from splice.weightmap.rules import Rule, rules_from_json

__all__ = ["FORMAT", "WeightMap"]

FORMAT = "splice.weightmap"


@dataclass(frozen=True)
class WeightMap:
    """An ordered list of stages, each an ordered list of rules. Most maps have one stage."""

    stages: tuple[tuple[Rule, ...], ...] = ((),)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(tuple(stage) for stage in self.stages) or ((),))

    @classmethod
    def of(cls, rules: Iterable[Rule | str]) -> WeightMap:
        return cls((tuple(r if isinstance(r, Rule) else Rule.parse(r) for r in rules),))

    parse = of

    @classmethod
    def renames(cls, prefixes: Mapping[str, str]) -> WeightMap:
        """A map that only renames key prefixes, e.g. ``{"visual.": "model.visual."}``."""
        return cls.of(Rule((f"{old}**",), (f"{new}**",)) for old, new in prefixes.items())

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(r for stage in self.stages for r in stage)

    def then(self, other: WeightMap) -> WeightMap:
        """The map that applies ``self`` and then ``other`` (keys flow from one stage into the next)."""
        stages = [s for s in self.stages + other.stages if s]
        return WeightMap(tuple(stages) or ((),))

    def invert(self) -> WeightMap:
        return WeightMap(tuple(tuple(r.inverted() for r in stage) for stage in reversed(self.stages)))

    def compile(self, keys: Iterable[str], metas: Mapping[str, TensorMeta] | None = None) -> CompiledMap:
        return compile_map(self.stages, list(keys), metas)

    def resolve(self, metas: Mapping[str, TensorMeta]) -> WeightMap:
        """This map with every op's sizes learned from ``metas`` (so that it can be inverted)."""
        return WeightMap(resolve_stages(self.stages, metas))

    def generalize(self, keys: Iterable[str], metas: Mapping[str, TensorMeta] | None = None) -> WeightMap:
        """Literal per-layer rules folded into ``*`` rules, when that compiles to the same steps on ``keys``.

        A map built from a fused model lists every layer; this gives the readable form
        (``model.layers.*.self_attn.{q,k,v}_proj.weight -> ...``) without changing what it does.
        """
        keys = list(keys)
        stages = []
        for stage in self.stages:
            groups: dict[tuple, list[Rule]] = {}
            for rule in stage:
                groups.setdefault(_template(rule), []).append(rule)
            folded = []
            for template, rules in groups.items():
                if template[0] is None or len(rules) < 2:
                    folded.extend(rules)
                else:
                    sources, targets, ops = template
                    folded.append(Rule(sources, targets, ops))
            stages.append(tuple(folded))
        general = WeightMap(tuple(stages))
        try:
            same = [str(s) for s in general.compile(keys, metas).steps] == [
                str(s) for s in self.compile(keys, metas).steps
            ]
        except WeightMapError:
            same = False
        return general if same else self

    def to_runtime(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        compiled = self.compile(state_dict, {k: TensorMeta.of(t) for k, t in state_dict.items()})
        return dict(compiled.run(state_dict.__getitem__))

    def to_original(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.invert().to_runtime(state_dict)

    # -- JSON ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        if len(self.stages) == 1:
            return {"format": FORMAT, "version": 1, "rules": [r.to_dict() for r in self.stages[0]]}
        return {
            "format": FORMAT,
            "version": 1,
            "stages": [{"rules": [r.to_dict() for r in stage]} for stage in self.stages],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> WeightMap:
        if isinstance(data, list):
            return cls((rules_from_json(data),))
        if not isinstance(data, dict) or ("rules" in data) == ("stages" in data):
            raise WeightMapError("a weight map is a list of rules or a dict with 'rules' or 'stages'")
        if data.get("format", FORMAT) != FORMAT or data.get("version", 1) != 1:
            raise WeightMapError(f"not a {FORMAT} version 1 document: format={data.get('format')!r}")
        if "rules" in data:
            return cls((rules_from_json(data["rules"]),))
        stages = data["stages"]
        if not isinstance(stages, list):
            raise WeightMapError(f"field stages must be a list of {{'rules': [...]}} dicts, got {stages!r}")
        for n, stage in enumerate(stages, 1):
            if not isinstance(stage, dict) or set(stage) != {"rules"}:
                raise WeightMapError(f"stage {n}: a stage is a dict with only 'rules', got {stage!r}")
        return cls(tuple(rules_from_json(s["rules"], n) for n, s in enumerate(stages, 1)))

    @classmethod
    def from_json(cls, text: str) -> WeightMap:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WeightMapError(f"weight map is not valid JSON: {exc}") from None
        except RecursionError:
            raise WeightMapError("weight map is not valid JSON: nested too deeply") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        try:
            Path(path).write_text(self.to_json() + "\n")
        except OSError as exc:
            raise WeightMapError(f"cannot write weight map {path}: {exc.strerror or exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> WeightMap:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise WeightMapError(f"cannot read weight map {path}: {exc.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WeightMapError(
                f"{path}: a weight map is UTF-8 JSON text, and this file is not (byte 0x{raw[exc.start]:02x} at "
                f"offset {exc.start})"
            ) from None
        try:
            return cls.from_json(text)
        except WeightMapError as exc:
            raise WeightMapError(f"{path}: {exc}") from None

    def __str__(self) -> str:
        blocks = ["\n".join(str(r) for r in stage) for stage in self.stages]
        return "\nthen\n".join(blocks)


def _template(rule: Rule) -> tuple:
    """A literal rule with its numeric key components as ``*``: ``(sources, targets, ops)``, or ``(None, rule)``."""
    patterns = [p.text for p in rule.sources + rule.targets]
    if not all(p.literal for p in rule.sources + rule.targets):
        return (None, id(rule))
    indices = {numbers(p) for p in patterns}
    if len(indices) != 1 or not next(iter(indices)):
        return (None, id(rule))
    sources = tuple(wildcard_numbers(p.text) for p in rule.sources)
    targets = tuple(wildcard_numbers(p.text) for p in rule.targets)
    return (sources, targets, rule.ops)
