"""`Rule`: ``sources -> targets | ops``, its text and JSON forms, and a stage's rules from JSON."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from splice.errors import TransformError, WeightMapError
from splice.transforms import Op, invert_ops, op_from_dict, parse_op
from splice.weightmap.patterns import Pattern, compact, expand_braces

__all__ = ["Rule", "rules_from_json"]


@dataclass(frozen=True)
class Rule:
    """``sources -> targets | ops``: the sources of one group, in order, go through ``ops`` to the targets."""

    sources: tuple[Pattern, ...]
    targets: tuple[Pattern, ...]
    ops: tuple[Op, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(_pattern(p) for p in self.sources))
        object.__setattr__(self, "targets", tuple(_pattern(p) for p in self.targets))
        object.__setattr__(self, "ops", tuple(self.ops))
        if not self.sources or not self.targets:
            raise WeightMapError(f"rule {self}: needs at least one source and one target")
        counts = {p.captures for p in self.sources}
        if len(counts) != 1:
            raise WeightMapError(f"rule {self}: every source must have the same number of '*' captures")
        for target in self.targets:
            if target.captures != self.sources[0].captures:
                raise WeightMapError(
                    f"rule {self}: target {target} has {target.captures} '*' captures, "
                    f"sources have {self.sources[0].captures}"
                )
        if not self.ops and (len(self.sources) != len(self.targets) or any(p.collects for p in self.sources)):
            raise WeightMapError(f"rule {self}: without ops, sources and targets must pair up one to one")

    @classmethod
    def parse(cls, text: str) -> Rule:
        """``"a.*.q, a.*.k -> a.*.qk | concat(dim=0)"``; braces expand (``a.*.{q,k}``)."""
        head, *op_texts = text.split("|")
        if "->" not in head:
            raise WeightMapError(f"rule {text!r}: expected 'sources -> targets [| op ...]'")
        left, right = head.split("->", 1)
        sources = [e for part in _split_patterns(left) for e in expand_braces(part)]
        targets = [e for part in _split_patterns(right) for e in expand_braces(part)]
        try:
            ops = tuple(parse_op(t) for t in op_texts)
        except TransformError as exc:
            raise WeightMapError(f"rule {text!r}: {exc}") from None
        return cls(tuple(sources), tuple(targets), ops)

    def inverted(self) -> Rule:
        try:
            return Rule(self.targets, self.sources, invert_ops(self.ops))
        except TransformError as exc:
            raise WeightMapError(f"rule {self}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": [p.text for p in self.sources],
            "targets": [p.text for p in self.targets],
            "ops": [op.to_dict() for op in self.ops],
        }

    @classmethod
    def from_json(cls, data: Any, where: str | None = None) -> Rule:
        """A rule from its text or :meth:`to_dict` form; ``where`` (e.g. ``"rule 2"``) names it in errors."""
        if isinstance(data, str):
            return cls.parse(data)
        prefix = f"{where}: " if where else ""
        if not isinstance(data, dict) or not {"sources", "targets"} <= set(data):
            raise WeightMapError(
                f"{prefix}a rule is a string or a dict with 'sources' and 'targets', got {data!r}"
            )
        label = where or f"rule {data['sources']!r} -> {data['targets']!r}"
        unknown = set(data) - {"sources", "targets", "ops"}
        if unknown:
            raise WeightMapError(f"{label}: unknown field(s) {sorted(unknown)}")
        for name in ("sources", "targets"):
            if not isinstance(data[name], list) or not all(isinstance(p, str) for p in data[name]):
                raise WeightMapError(f"{label}: field {name} must be a list of strings, got {data[name]!r}")
        if not isinstance(data.get("ops", []), list):
            raise WeightMapError(f"{label}: field ops must be a list, got {data['ops']!r}")
        try:
            ops = tuple(op if isinstance(op, Op) else op_from_dict(op) for op in data.get("ops", ()))
        except TransformError as exc:
            raise WeightMapError(f"{label}: {exc}") from None
        sources = [e for p in data["sources"] for e in expand_braces(p)]
        targets = [e for p in data["targets"] for e in expand_braces(p)]
        return cls(tuple(sources), tuple(targets), ops)

    def __str__(self) -> str:
        return self._text

    @cached_property
    def _text(self) -> str:  # steps name their rule: a map of hundreds of keys prints each rule many times
        text = f"{compact([p.text for p in self.sources])} -> {compact([p.text for p in self.targets])}"
        return text + "".join(f" | {op}" for op in self.ops)


def _pattern(p: Pattern | str) -> Pattern:
    return p if isinstance(p, Pattern) else Pattern(p.strip())


def _split_patterns(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for c in text:
        depth += {"{": 1, "}": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += c
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def rules_from_json(rules: Any, stage: int | None = None) -> tuple[Rule, ...]:
    """The rules of one stage. Errors name the stage and the rule, counting from 1."""
    if not isinstance(rules, list):
        where = "" if stage is None else f"stage {stage}: "
        raise WeightMapError(f"{where}field rules must be a list, got {rules!r}")
    where = "" if stage is None else f"stage {stage}, "
    return tuple(Rule.from_json(rule, f"{where}rule {n}") for n, rule in enumerate(rules, 1))
