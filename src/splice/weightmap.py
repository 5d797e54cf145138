"""`WeightMap`: how the keys and tensors of one checkpoint layout become those of another.

A map is a list of rules. A rule reads like the layout change it performs::

    >>> wm = WeightMap.parse([
    ...     "layers.*.attn.{q,k,v}_proj.weight -> layers.*.attn.qkv_proj.weight | concat(dim=0)",
    ...     "layers.*.mlp.{gate,up}_proj.weight -> layers.*.mlp.gate_up_proj.weight | concat(dim=0)",
    ... ])

Patterns are globs over dotted keys:
- ``*`` matches one dotted component (or part of one) and is captured; targets reuse the captures in order.
- ``**`` matches one or more components (prefix renames: ``visual.** -> model.visual.**``).
- ``#`` matches a numeric index that is *collected*: ``experts.#.w1 -> experts_w1 | stack(dim=0)`` stacks
  all experts in index order; in a target, ``#`` enumerates the outputs 0..n-1.
- ``{a,b,c}`` expands into one pattern per choice.

``compile(keys, metas)`` turns a map into a :class:`Plan` of concrete steps, checking that every rule
group is complete, that no key is claimed twice and no target produced twice, and (given shapes) that
every op fits. Keys no rule claims pass through unchanged. ``Plan.run`` streams one step at a time, and
``Plan.inverse()`` is exact. Maps compose (``renames.then(fusion)``) and serialize to JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splice.errors import TransformError, WeightMapError
from splice.transforms import Op, TensorMeta, apply_ops, invert_ops, op_from_dict, parse_op, resolve_ops

__all__ = ["Pattern", "Rule", "WeightMap", "Plan", "Step", "Instr"]

FORMAT = "splice.weightmap"


# --------------------------------------------------------------------------------------------------
# patterns


_TOKEN = re.compile(r"\*\*|\*|#")


@dataclass(frozen=True)
class Pattern:
    """A glob over dotted keys. Captures are ``*``/``**`` (kept) and ``#`` (a collected index)."""

    text: str

    def __post_init__(self) -> None:
        if not self.text or any(c in self.text for c in "{},|") or "->" in self.text:
            raise WeightMapError(f"bad key pattern {self.text!r}")
        if self.text.count("#") > 1:
            raise WeightMapError(f"pattern {self.text!r}: at most one '#' (collected index) per pattern")
        # Two wildcards in one component (``*a*a*``), or two ``**``, make the match ambiguous, and a regex
        # engine then tries every split of a key: a map read from a file could stall for hours on one key.
        if self.text.count("**") > 1:
            raise WeightMapError(f"pattern {self.text!r}: at most one '**' per pattern")
        crowded = [part for part in self.text.split(".") if len(_TOKEN.findall(part)) > 1]
        if crowded:
            raise WeightMapError(
                f"pattern {self.text!r}: at most one wildcard ('*', '**' or '#') per dotted component, "
                f"found {crowded[0]!r}"
            )

    @property
    def tokens(self) -> list[str]:
        return _TOKEN.findall(self.text)

    @property
    def captures(self) -> int:
        """Number of kept captures (``*`` and ``**``)."""
        return sum(t != "#" for t in self.tokens)

    @property
    def collects(self) -> bool:
        return "#" in self.text

    @property
    def literal(self) -> bool:
        return not self.tokens

    @property
    def regex(self) -> re.Pattern[str]:
        parts, pos = [], 0
        for m in _TOKEN.finditer(self.text):
            parts.append(re.escape(self.text[pos : m.start()]))
            parts.append({"**": r"(.+)", "*": r"([^.]+)", "#": r"(\d+)"}[m.group()])
            pos = m.end()
        parts.append(re.escape(self.text[pos:]))
        return _compiled("".join(parts))

    def match(self, key: str) -> tuple[tuple[str, ...], int | None] | None:
        """``(kept captures, collected index or None)`` when ``key`` matches, else None."""
        m = self.regex.fullmatch(key)
        if m is None:
            return None
        kept, index = [], None
        for token, value in zip(self.tokens, m.groups()):
            if token == "#":
                index = int(value)
            else:
                kept.append(value)
        return tuple(kept), index

    def fill(self, captures: Sequence[str], index: int | None = None) -> str:
        values = iter(captures)
        out, pos = [], 0
        for m in _TOKEN.finditer(self.text):
            out.append(self.text[pos : m.start()])
            if m.group() == "#":
                if index is None:
                    raise WeightMapError(f"pattern {self.text!r} needs an index to fill '#'")
                out.append(str(index))
            else:
                out.append(next(values))
            pos = m.end()
        out.append(self.text[pos:])
        return "".join(out)

    def __str__(self) -> str:
        return self.text


_REGEX_CACHE: dict[str, re.Pattern[str]] = {}


def _compiled(regex: str) -> re.Pattern[str]:
    pattern = _REGEX_CACHE.get(regex)
    if pattern is None:
        pattern = _REGEX_CACHE[regex] = re.compile(regex)
    return pattern


MAX_EXPANSION = 4096
"""Most patterns one brace pattern may expand into. ``{a,b}`` repeated 40 times would be 2**40 of them."""

_BRACES = re.compile(r"\{([^{}]*)\}")


def _expand_braces(text: str) -> list[str]:
    """``a.{q,k}.{w,b}`` -> ``a.q.w, a.q.b, a.k.w, a.k.b``, innermost braces first; each step is counted
    before it is taken, so a brace bomb is refused after at most ``MAX_EXPANSION`` patterns of work."""
    done, pending = [], [text.strip()]
    work = 0  # characters written, so that many single-choice braces in a long text are bounded too
    while pending:
        m = _BRACES.search(pending[0])
        if m is None:
            done.append(pending.pop(0))
            continue
        choices = m.group(1).split(",")
        work += len(choices) * len(pending[0])
        if len(done) + len(pending) - 1 + len(choices) > MAX_EXPANSION or work > 1000 * MAX_EXPANSION:
            raise WeightMapError(
                f"pattern {_shown(text)} expands into more than {MAX_EXPANSION} patterns; "
                "write a '*' or '#' wildcard instead of so many braces"
            )
        first = pending.pop(0)
        pending[:0] = [(first[: m.start()] + c.strip() + first[m.end() :]).strip() for c in choices]
    return done


def _shown(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 3]) + "..."


def _compact(patterns: Sequence[str]) -> str:
    """Print several patterns as one brace pattern when they differ only in the middle of a component."""
    if len(patterns) < 2:
        return ", ".join(patterns)
    prefix = _common_prefix(patterns)
    suffix = _common_prefix([p[len(prefix) :][::-1] for p in patterns])[::-1]
    middles = [p[len(prefix) : len(p) - len(suffix)] for p in patterns]
    if all(m and "." not in m and not _TOKEN.search(m) for m in middles):
        return f"{prefix}{{{','.join(middles)}}}{suffix}"
    return ", ".join(patterns)


def _common_prefix(texts: Sequence[str]) -> str:
    first = min(texts, key=len)
    for i, c in enumerate(first):
        if any(t[i] != c for t in texts):
            return first[:i]
    return first


# --------------------------------------------------------------------------------------------------
# rules


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
        sources = [e for part in _split_patterns(left) for e in _expand_braces(part)]
        targets = [e for part in _split_patterns(right) for e in _expand_braces(part)]
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
        sources = [e for p in data["sources"] for e in _expand_braces(p)]
        targets = [e for p in data["targets"] for e in _expand_braces(p)]
        return cls(tuple(sources), tuple(targets), ops)

    def __str__(self) -> str:
        text = f"{_compact([p.text for p in self.sources])} -> {_compact([p.text for p in self.targets])}"
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


# --------------------------------------------------------------------------------------------------
# the map


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

    def compile(self, keys: Iterable[str], metas: Mapping[str, TensorMeta] | None = None) -> Plan:
        from splice._plan import compile_map

        return compile_map(self, list(keys), metas)

    def resolve(self, metas: Mapping[str, TensorMeta]) -> WeightMap:
        """This map with every op's sizes learned from ``metas`` (so that it can be inverted)."""
        from splice._plan import resolve_map

        return resolve_map(self, metas)

    def generalize(self, keys: Iterable[str], metas: Mapping[str, TensorMeta] | None = None) -> WeightMap:
        """Literal per-layer rules folded into ``*`` rules, when that compiles to the same plan on ``keys``.

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
        plan = self.compile(state_dict, {k: TensorMeta.of(t) for k, t in state_dict.items()})
        return dict(plan.run(state_dict.__getitem__))

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
            return cls((_rules_from_json(data),))
        if not isinstance(data, dict) or ("rules" in data) == ("stages" in data):
            raise WeightMapError("a weight map is a list of rules or a dict with 'rules' or 'stages'")
        if data.get("format", FORMAT) != FORMAT or data.get("version", 1) != 1:
            raise WeightMapError(f"not a {FORMAT} version 1 document: format={data.get('format')!r}")
        if "rules" in data:
            return cls((_rules_from_json(data["rules"]),))
        stages = data["stages"]
        if not isinstance(stages, list):
            raise WeightMapError(f"field stages must be a list of {{'rules': [...]}} dicts, got {stages!r}")
        for n, stage in enumerate(stages, 1):
            if not isinstance(stage, dict) or set(stage) != {"rules"}:
                raise WeightMapError(f"stage {n}: a stage is a dict with only 'rules', got {stage!r}")
        return cls(tuple(_rules_from_json(s["rules"], n) for n, s in enumerate(stages, 1)))

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


def _rules_from_json(rules: Any, stage: int | None = None) -> tuple[Rule, ...]:
    """The rules of one stage. Errors name the stage and the rule, counting from 1."""
    if not isinstance(rules, list):
        where = "" if stage is None else f"stage {stage}: "
        raise WeightMapError(f"{where}field rules must be a list, got {rules!r}")
    where = "" if stage is None else f"stage {stage}, "
    return tuple(Rule.from_json(rule, f"{where}rule {n}") for n, rule in enumerate(rules, 1))


# --------------------------------------------------------------------------------------------------
# compiled plans


@dataclass(frozen=True)
class Instr:
    """One rule applied to concrete keys: ``inputs -> ops -> outputs`` (names are plan variables)."""

    inputs: tuple[str, ...]
    ops: tuple[Op, ...]
    outputs: tuple[str, ...]

    def inverted(self) -> Instr:
        return Instr(self.outputs, invert_ops(self.ops), self.inputs)


@dataclass(frozen=True)
class Step:
    """A self-contained unit of work: read ``sources``, run ``program``, produce ``targets``."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    program: tuple[Instr, ...]
    rule: str | None = None  # the rule(s) it came from, for messages; None for keys passed through
    source_metas: tuple[TensorMeta, ...] | None = None
    target_metas: tuple[TensorMeta, ...] | None = None

    @property
    def ops(self) -> tuple[Op, ...] | None:
        """The ops when the step is one instruction from sources to targets in order, else None."""
        if not self.program:
            return ()
        if (
            len(self.program) == 1
            and self.program[0].inputs == self.sources
            and self.program[0].outputs == self.targets
        ):
            return self.program[0].ops
        return None

    @property
    def is_rename(self) -> bool:
        return self.ops == ()

    def run(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        env = dict(zip(self.sources, tensors))
        for instr in self.program:
            try:
                results = apply_ops(instr.ops, [env[k] for k in instr.inputs])
            except TransformError as exc:
                raise WeightMapError(
                    f"{', '.join(self.sources)} -> {', '.join(self.targets)}: {exc}"
                ) from None
            env.update(zip(instr.outputs, results))
        return [env[k] for k in self.targets]

    def inverted(self) -> Step:
        try:
            program = tuple(i.inverted() for i in reversed(self.program))
        except TransformError as exc:
            raise WeightMapError(f"{', '.join(self.sources)} -> {', '.join(self.targets)}: {exc}") from None
        return Step(self.targets, self.sources, program, self.rule, self.target_metas, self.source_metas)

    def __str__(self) -> str:
        ops = self.ops
        body = (
            " | ".join(str(o) for o in ops)
            if ops
            else ("rename" if ops == () else f"{len(self.program)} instrs")
        )
        return f"{_compact(self.sources)} -> {_compact(self.targets)} : {body}"


@dataclass
class Plan:
    """A compiled map: concrete steps over concrete keys, plus what nothing claimed and what matched nothing."""

    steps: list[Step]
    unclaimed: list[str] = field(default_factory=list)
    unused_rules: list[Rule] = field(default_factory=list)

    @property
    def source_keys(self) -> list[str]:
        return [k for s in self.steps for k in s.sources]

    @property
    def target_keys(self) -> list[str]:
        return [k for s in self.steps for k in s.targets]

    @property
    def target_metas(self) -> dict[str, TensorMeta]:
        out: dict[str, TensorMeta] = {}
        for s in self.steps:
            if s.target_metas is None:
                raise WeightMapError("this plan was compiled without shapes; pass metas to compile()")
            out.update(zip(s.targets, s.target_metas))
        return out

    def step_for(self, target: str) -> Step:
        for s in self.steps:
            if target in s.targets:
                return s
        raise WeightMapError(f"no step produces {target!r}")

    def run(self, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream ``(target key, tensor)`` pairs, fetching each step's sources with ``get`` when it runs."""
        for step in self.steps:
            yield from zip(step.targets, step.run([get(k) for k in step.sources]))

    def inverse(self) -> Plan:
        return Plan([s.inverted() for s in self.steps])

    def __str__(self) -> str:
        return "\n".join(str(s) for s in self.steps if not (s.is_rename and s.sources == s.targets))


def _resolve_step_ops(
    ops: Sequence[Op], metas: Sequence[TensorMeta], where: str
) -> tuple[tuple[Op, ...], list[TensorMeta]]:
    try:
        return resolve_ops(ops, metas)
    except (TransformError, RuntimeError, OverflowError, TypeError) as exc:  # torch's own, on absurd sizes
        shapes = ", ".join(str(m) for m in metas)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightMapError(f"{where}: {reason} (inputs: {shapes})") from None


_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _template(rule: Rule) -> tuple:
    """A literal rule with its numeric key components as ``*``: ``(sources, targets, ops)``, or ``(None, rule)``."""
    patterns = [p.text for p in rule.sources + rule.targets]
    if not all(p.literal for p in rule.sources + rule.targets):
        return (None, id(rule))
    numbers = {tuple(_INDEX.findall(p)) for p in patterns}
    if len(numbers) != 1 or not next(iter(numbers)):
        return (None, id(rule))
    sources = tuple(_INDEX.sub("*", p.text) for p in rule.sources)
    targets = tuple(_INDEX.sub("*", p.text) for p in rule.targets)
    return (sources, targets, rule.ops)
