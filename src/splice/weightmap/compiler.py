"""Compiling a weight map's stages against concrete keys into a `CompiledMap`; composing stages; resolving op sizes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from splice.errors import TransformError, WeightMapError
from splice.tensors import TensorMeta
from splice.transforms import Op, resolve_ops
from splice.weightmap.patterns import compact
from splice.weightmap.program import CompiledMap, Instr, Step
from splice.weightmap.rules import Rule

__all__ = ["compile_map", "compile_stage", "resolve_stages", "resolve_step_ops"]

Stages = Sequence[Sequence[Rule]]


def resolve_step_ops(
    ops: Sequence[Op], metas: Sequence[TensorMeta], where: str | Callable[[], str]
) -> tuple[tuple[Op, ...], list[TensorMeta]]:
    try:
        return resolve_ops(ops, metas)
    except (TransformError, RuntimeError, OverflowError, TypeError) as exc:  # torch's own, on absurd sizes
        shapes = ", ".join(str(m) for m in metas)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = where if isinstance(where, str) else where()
        raise WeightMapError(f"{where}: {reason} (inputs: {shapes})") from None


def compile_map(stages: Stages, keys: list[str], metas: Mapping[str, TensorMeta] | None) -> CompiledMap:
    """The stages of a map, one after the other, over ``keys`` (with shapes when ``metas`` is given)."""
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise WeightMapError(f"duplicate keys: {dupes[:5]}")
    compiled: CompiledMap | None = None
    for index, stage in enumerate(stages):
        this = compile_stage(stage, keys, metas)
        compiled = this if compiled is None else _compose(compiled, this, index)
        keys = this.target_keys
        if metas is not None:
            metas = this.target_metas
    assert compiled is not None
    return compiled


def compile_stage(
    rules: Sequence[Rule], keys: Sequence[str], metas: Mapping[str, TensorMeta] | None
) -> CompiledMap:
    """One stage: each key claimed by at most one rule, rule groups complete, no target produced twice."""
    literal: dict[str, tuple[int, int]] = {}
    wild: list[tuple[int, int]] = []
    for ri, rule in enumerate(rules):
        for si, pattern in enumerate(rule.sources):
            if pattern.literal:
                if pattern.text in literal:
                    other = rules[literal[pattern.text][0]]
                    raise WeightMapError(f"key {pattern.text!r} is claimed by two rules: {other} and {rule}")
                literal[pattern.text] = (ri, si)
            else:
                wild.append((ri, si))

    groups: dict[tuple[int, tuple[str, ...]], list[dict[int | None, str]]] = {}
    order: list[tuple[str, object]] = []
    for key in keys:
        claims = []
        if key in literal:
            claims.append((*literal[key], (), None))
        for ri, si in wild:
            m = rules[ri].sources[si].match(key)
            if m is not None:
                claims.append((ri, si, *m))
        if len(claims) > 1:
            a, b = rules[claims[0][0]], rules[claims[1][0]]
            if a is b:
                raise WeightMapError(f"key {key!r} matches two sources of one rule: {a}")
            raise WeightMapError(f"key {key!r} is claimed by two rules: {a} and {b}")
        if not claims:
            order.append(("pass", key))
            continue
        ri, si, captures, index = claims[0]
        group = groups.get((ri, captures))
        if group is None:
            group = groups[(ri, captures)] = [{} for _ in rules[ri].sources]
            order.append(("group", (ri, captures)))
        group[si][index] = key

    steps: list[Step] = []
    unclaimed: list[str] = []
    for kind, item in order:
        if kind == "pass":
            key = item  # type: ignore[assignment]
            meta = None if metas is None else (_meta(metas, key),)
            steps.append(Step((key,), (key,), (Instr((key,), (), (key,)),), None, meta, meta))
            unclaimed.append(key)
        else:
            ri, captures = item  # type: ignore[misc]
            steps.append(_group_step(rules[ri], captures, groups[item], metas))  # type: ignore[index]

    produced: dict[str, Step] = {}
    for step in steps:
        for target in step.targets:
            if target in produced:
                first, second = produced[target], step
                raise WeightMapError(
                    f"target {target!r} is produced twice: by {_describe(first)} and by {_describe(second)}"
                )
            produced[target] = step
    used = {ri for ri, _ in groups}
    unused = [rule for ri, rule in enumerate(rules) if ri not in used]
    return CompiledMap(steps, unclaimed, unused)


def _describe(step: Step) -> str:
    return f"rule {step.rule}" if step.rule else f"the unclaimed key {step.sources[0]!r}"


def _meta(metas: Mapping[str, TensorMeta], key: str) -> TensorMeta:
    try:
        return metas[key]
    except KeyError:
        raise WeightMapError(f"no shape known for key {key!r}") from None


def _group_step(
    rule: Rule,
    captures: tuple[str, ...],
    slots: list[dict[int | None, str]],
    metas: Mapping[str, TensorMeta] | None,
) -> Step:
    sources: list[str] = []
    for pattern, slot in zip(rule.sources, slots):
        if not slot:
            found = [k for s in slots for k in s.values()]
            missing = pattern.fill(captures, 0) if pattern.collects else pattern.fill(captures)
            raise WeightMapError(f"rule {rule}: found {', '.join(found)} but not {missing}")
        if pattern.collects:
            indices = sorted(slot)
            gaps = sorted(set(range(indices[-1] + 1)) - set(indices))
            if gaps:
                raise WeightMapError(
                    f"rule {rule}: indices {gaps} are missing among {pattern.fill(captures, gaps[0])} and its siblings"
                )
            sources.extend(slot[i] for i in indices)
        else:
            sources.append(slot[None])

    ops: tuple[Op, ...] = rule.ops
    source_metas = target_metas = None

    def where() -> str:  # for messages only: most maps compile hundreds of steps without one
        return f"rule {rule} on {compact(sources)}"

    if metas is not None:
        source_metas = tuple(_meta(metas, k) for k in sources)
        ops, outs = resolve_step_ops(rule.ops, source_metas, where)
        target_metas = tuple(outs)
    if any(p.collects for p in rule.targets):
        if len(rule.targets) != 1:
            raise WeightMapError(f"rule {rule}: a '#' target must be the only target")
        if target_metas is None:
            raise WeightMapError(f"{where()}: a '#' target needs shapes to know how many outputs there are")
        targets = [rule.targets[0].fill(captures, i) for i in range(len(target_metas))]
    else:
        targets = [p.fill(captures) for p in rule.targets]
    if target_metas is not None and len(targets) != len(target_metas):
        raise WeightMapError(
            f"{where()}: the ops produce {len(target_metas)} tensor(s) but {len(targets)} target(s) are named"
        )
    program = (Instr(tuple(sources), ops, tuple(targets)),)
    return Step(tuple(sources), tuple(targets), program, str(rule), source_metas, target_metas)


# --------------------------------------------------------------------------------------------------
# composing two compiled stages into one


def _compose(first: CompiledMap, second: CompiledMap, stage: int) -> CompiledMap:
    producer: dict[str, int] = {}
    for i, step in enumerate(first.steps):
        for target in step.targets:
            producer[target] = i
    n = len(first.steps)
    parent = list(range(n + len(second.steps)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for j, step in enumerate(second.steps):
        for source in step.sources:
            a, b = find(n + j), find(producer[source])
            parent[max(a, b)] = min(a, b)

    components: dict[int, tuple[list[Step], list[Step]]] = {}
    for i, step in enumerate(first.steps):
        components.setdefault(find(i), ([], []))[0].append(step)
    for j, step in enumerate(second.steps):
        components.setdefault(find(n + j), ([], []))[1].append(step)

    steps = [_merge(a, b, stage) for _, (a, b) in sorted(components.items())]
    return CompiledMap(steps, first.unclaimed + second.unclaimed, first.unused_rules + second.unused_rules)


def _merge(firsts: list[Step], seconds: list[Step], stage: int) -> Step:
    internal = {t for s in firsts for t in s.targets}

    def inner(name: str) -> str:
        return f"{name}@{stage}" if name in internal else name

    program: list[Instr] = []
    for step in firsts:
        program += [Instr(i.inputs, i.ops, tuple(inner(o) for o in i.outputs)) for i in step.program]
    for step in seconds:
        program += [Instr(tuple(inner(x) for x in i.inputs), i.ops, i.outputs) for i in step.program]
    sources = tuple(k for s in firsts for k in s.sources)
    targets = tuple(k for s in seconds for k in s.targets)
    program, sources = _simplify(program, sources, targets)
    source_metas = _joined([s.source_metas for s in firsts])
    if source_metas is not None:
        by_key = dict(zip((k for s in firsts for k in s.sources), source_metas))
        source_metas = tuple(by_key[k] for k in sources)
    rules = [s.rule for s in firsts + seconds if s.rule]
    return Step(
        sources,
        targets,
        tuple(program),
        "; ".join(rules) or None,
        source_metas,
        _joined([s.target_metas for s in seconds]),
    )


def _joined(parts: list[tuple[TensorMeta, ...] | None]) -> tuple[TensorMeta, ...] | None:
    if any(p is None for p in parts):
        return None
    return tuple(m for p in parts for m in p)  # type: ignore[union-attr]


def _simplify(
    program: list[Instr], sources: tuple[str, ...], targets: tuple[str, ...]
) -> tuple[list[Instr], tuple[str, ...]]:
    """Drop pure renames by aliasing, so a rename stage composed with a rule stays one instruction."""
    alias: dict[str, str] = {}

    def real(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    kept: list[Instr] = []
    for instr in program:
        if not instr.ops:
            for i, o in zip(instr.inputs, instr.outputs):
                if real(i) != o:  # a key passed through every stage unchanged aliases nothing
                    alias[o] = real(i)
            continue
        kept.append(Instr(tuple(real(i) for i in instr.inputs), instr.ops, instr.outputs))

    produced_by_instr = {o for i in kept for o in i.outputs}
    renamed: dict[str, str] = {}
    leftovers: list[tuple[str, str]] = []
    for target in targets:
        name = real(target)
        if name in produced_by_instr and name not in renamed:
            if name != target:
                renamed[name] = target
        else:  # a source handed on unchanged: keep it explicit, so the step composes again
            leftovers.append((name, target))
    kept = [
        Instr(
            tuple(renamed.get(i, i) for i in instr.inputs),
            instr.ops,
            tuple(renamed.get(o, o) for o in instr.outputs),
        )
        for instr in kept
    ]
    if leftovers:
        kept.append(Instr(tuple(a for a, _ in leftovers), (), tuple(b for _, b in leftovers)))

    used: list[str] = []
    for instr in kept:
        used += [i for i in instr.inputs if i in sources and i not in used]
    ordered = tuple(used) + tuple(s for s in sources if s not in used)
    return kept, ordered


# --------------------------------------------------------------------------------------------------
# resolving a map's op sizes against shapes


def resolve_stages(stages: Stages, metas: Mapping[str, TensorMeta]) -> tuple[tuple[Rule, ...], ...]:
    """The stages with every op's sizes learned from ``metas``; a rule whose groups resolve differently
    becomes one literal rule per group."""
    resolved: list[tuple[Rule, ...]] = []
    keys = list(metas)
    current: Mapping[str, TensorMeta] = metas
    for stage in stages:
        compiled = compile_stage(stage, keys, current)
        by_rule: dict[str, list[Step]] = {}
        for step in compiled.steps:
            if step.rule is not None:
                by_rule.setdefault(step.rule, []).append(step)
        rules: list[Rule] = []
        for rule in stage:
            found = by_rule.get(str(rule), [])
            variants = {s.program[0].ops for s in found}
            if len(variants) <= 1:
                rules.append(Rule(rule.sources, rule.targets, variants.pop() if variants else rule.ops))
            else:
                rules += [Rule(s.sources, s.targets, s.program[0].ops) for s in found]
        resolved.append(tuple(rules))
        keys = compiled.target_keys
        current = compiled.target_metas
    return tuple(resolved)
