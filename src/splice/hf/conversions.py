"""Transformers' per-tensor weight converters as exact splice ops.

transformers describes some checkpoint conversions as a chain of ``ConversionOps`` on one source key
(`transformers.core_model_loading`). Each one used that way has an exact counterpart here, so the
checkpoint loads through a WeightMap and saves back bit for bit:

======================================  ===================================================  ====================
transformers op                         splice ops                                           used by
======================================  ===================================================  ====================
``Chunk(dim)`` (one key -> N targets)   ``split(dim, sizes)`` with ``torch.chunk``'s sizes   hrm_text, qianfan_ocr, unlimited_ocr, kimi_k25
``PermuteForRope`` (after a Chunk)      ``permute_blocks(0, (heads, half, 2), (0, 2, 1))``   kimi_k25
                                        on the targets it names (a second stage)
``Interleave(dim)``                     ``permute_blocks(dim, (n / 2, 2), (1, 0))``          inkling2(_text)
``Transpose(d0, d1, check_dims)``       ``transpose(d0, d1)``, or a rename when the          qwen3_vl_moe, ernie4_5_vl_moe
                                        checkpoint already has the model's shape
``ErnieFuseAndSplitTextVisionExperts``  stack, reshape and transpose the experts into the     ernie4_5_vl_moe
                                        text and vision halves
======================================  ===================================================  ====================

`translate` returns the rules (first stage, then per-target rules for a second stage) or None for a
converter it does not handle, which `_converter_rule` then handles or refuses by name.

`checkpoint_renames` puts them together: transformers' renames and converters for one model, as the
first stage of the WeightMap from the checkpoint to the model (`splice.hf.load.prepare`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from splice.errors import LoadError
from splice.transforms import Concat, Op, PermuteBlocks, Reshape, Split, Stack, TensorMeta, Transpose, Unstack
from splice.weightmap import Rule, WeightMap

PER_TENSOR = {"Chunk", "PermuteForRope", "Interleave", "Transpose"}
ERNIE = "ErnieFuseAndSplitTextVisionExperts"


def translate(
    converter: Any,
    target: str,
    slots: dict[int, list[str]],
    metas: Mapping[str, TensorMeta],
    model: nn.Module,
) -> tuple[list[Rule], list[Rule]] | None:
    """``(rules, second-stage rules)`` doing what ``converter`` does for one target, or None if not handled."""
    kinds = [type(op).__name__ for op in converter.operations]
    if kinds == [ERNIE]:
        return _ernie(converter, target, slots, metas)
    if not kinds or not set(kinds) <= PER_TENSOR or len(converter.source_patterns) != 1:
        return None
    [keys] = slots.values()
    if len(keys) != 1:
        raise LoadError(
            f"{target}: several checkpoint keys ({keys[:2]}) match the source of one {kinds} conversion"
        )
    source = keys[0]
    meta = metas.get(source)
    if meta is None:
        raise LoadError(f"{target}: the shape of {source} is needed to convert it")
    patterns = list(converter.target_patterns)
    targets = [target]  # one target until a Chunk makes several
    shapes = [tuple(meta.shape)]
    ops: list[Op] = []
    second: list[Rule] = []
    config = model.config
    for op in converter.operations:
        kind = type(op).__name__
        if kind == "Chunk":
            if len(targets) != 1:
                raise LoadError(f"{target}: a Chunk after another Chunk ({kinds}) is not translated")
            names = _chunk_targets(op, patterns, config)
            shape = shapes[0]
            size = shape[op.dim]
            piece = math.ceil(size / len(names))  # torch.chunk's sizes (the last one may be smaller)
            sizes = [min(piece, size - i * piece) for i in range(len(names))]
            if any(s <= 0 for s in sizes):
                raise LoadError(f"{source}: {size} rows cannot be chunked into {len(names)} non-empty parts")
            ops.append(Split(op.dim, tuple(sizes)))
            targets = [target.replace(patterns[0], name, 1) for name in names]
            shapes = [shape[: op.dim % len(shape)] + (s,) + shape[op.dim % len(shape) + 1 :] for s in sizes]
        elif kind == "PermuteForRope":
            sub = getattr(config, op.subconfig_key, config) if op.subconfig_key else config
            heads = getattr(sub, "num_attention_heads", 1)
            for name, shape in zip(targets, shapes):
                if op.permute_layer_names is not None and not any(p in name for p in op.permute_layer_names):
                    continue
                if shape[0] % (2 * heads):
                    raise LoadError(
                        f"{name}: {shape[0]} rows do not split into {heads} heads of rotary pairs"
                    )
                half = shape[0] // heads // 2
                blocks = (heads, 2, half) if op.inverse else (heads, half, 2)
                permute = PermuteBlocks(0, blocks, (0, 2, 1))
                if len(targets) == 1:
                    ops.append(permute)
                else:
                    second.append(Rule((name,), (name,), (permute,)))
        elif kind == "Interleave":
            if len(targets) != 1:
                return None
            dim, n = op.dim, shapes[0][op.dim]
            ops.append(PermuteBlocks(dim, (2, n // 2) if op.inverse else (n // 2, 2), (1, 0)))
        elif kind == "Transpose":
            if len(targets) != 1:
                return None
            shape = shapes[0]
            expected = _model_shape(model, targets[0]) if op.check_dims else None
            if expected is None or tuple(expected) != shape:  # check_dims: already in the model's shape
                ops.append(Transpose(op.dim0, op.dim1))
                shape = list(shape)
                shape[op.dim0], shape[op.dim1] = shape[op.dim1], shape[op.dim0]
                shapes = [tuple(shape)]
    if not ops and targets == [target]:
        return [Rule((source,), (target,))], second
    return [Rule((source,), tuple(targets), tuple(ops))], second


def _chunk_targets(op: Any, patterns: list[str], config: Any) -> list[str]:
    if op.num_shards_attribute is None:
        return patterns
    count = getattr(config.get_text_config(), op.num_shards_attribute)
    return [patterns[0].replace("*", str(i)) for i in range(count)]


def _model_shape(model: nn.Module, key: str) -> tuple[int, ...] | None:
    try:
        return tuple(model.get_parameter(key).shape)
    except AttributeError:
        return None


def _ernie(
    converter: Any, target: str, slots: dict[int, list[str]], metas: Mapping[str, TensorMeta]
) -> tuple[list[Rule], list[Rule]]:
    """Every expert of every source pattern -> ``len(targets)`` halves, each ``[E / n, P * out, in]``.

    transformers stacks each pattern's experts, cuts the stack into ``n`` equal groups (text, vision)
    and concatenates the patterns' groups along dim 1.
    """
    op = converter.operations[0]
    patterns, names = list(converter.source_patterns), list(converter.target_patterns)
    sources, experts = [], None
    for i, pattern in enumerate(patterns):
        found = dict(_expert_index(key, pattern) for key in slots.get(i, []))
        texts = {text for text, _ in found.values()}
        if len(texts) != 1:
            raise LoadError(f"{target}: the keys matching {pattern!r} differ beyond the expert index")
        numbers = sorted(found)
        if experts is None:
            experts = numbers
        if numbers != experts or numbers != list(range(len(numbers))):
            raise LoadError(
                f"{target}: the experts of {pattern!r} are {numbers[:4]}..., not 0..{len(experts) - 1}"
            )
        sources.append(texts.pop())
    assert experts is not None
    count, parts, groups = len(experts), len(patterns), len(names)
    meta = metas.get(next(iter(slots[0])))
    if count % groups or meta is None or (op.stack_dim, op.concat_dim) != (0, 1) or len(meta.shape) != 2:
        raise LoadError(
            f"{target}: {count} experts of shape {meta and list(meta.shape)} with {op} are not translated (needs "
            f"experts divisible by {groups}, 2-d weights, stack_dim=0, concat_dim=1)"
        )
    out, inp, per = meta.shape[0], meta.shape[1], count // groups
    ops = (
        Stack(0),  # [P * E, out, in], pattern-major
        Reshape((parts, groups, per, out, inp)),
        Transpose(0, 1),  # [groups, P, E / groups, out, in]
        Transpose(1, 2),  # [groups, E / groups, P, out, in]
        Reshape((groups, per, parts * out, inp)),
        Unstack(0),
    )
    targets = tuple(target.replace(names[0], name, 1) for name in names)
    return [Rule(tuple(sources), targets, ops)], []


def _expert_index(key: str, pattern: str) -> tuple[int, tuple[str, int]]:
    match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    if match is None or match.lastindex != 1:
        raise LoadError(f"{key}: cannot find the expert index of {pattern!r} in it")
    number = int(match.group(1))
    return number, (key[: match.start(1)] + "#" + key[match.end(1) :], number)


def checkpoint_renames(
    model: nn.Module,
    checkpoint_keys: list[str],
    model_keys: list[str],
    key_mapping: dict[str, str] | None,
    metas: Mapping[str, TensorMeta] | None = None,
) -> tuple[WeightMap, list[Any]]:
    """Transformers' own checkpoint-key -> model-key conversions for this model, as a WeightMap stage.

    Renames become renames. Of transformers' ``WeightConverter``s, the ones every MoE model of the
    Mixtral and Qwen2-MoE families uses become exact ops: ``MergeModulelist(dim=0)`` (per-expert
    ``down_proj`` -> one ``[E, out, in]`` tensor) and ``MergeModulelist(dim=0), Concatenate(dim=1)``
    (per-expert gate and up -> ``[E, 2 * inter, hidden]``), and so does a plain ``Concatenate``. Other
    converters are refused by name.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model, key_mapping=key_mapping)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    present = dict.fromkeys(model_keys, True)
    rules = []
    converted: dict[tuple[int, str], dict[int, list[str]]] = {}
    for key in checkpoint_keys:
        new, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, present)
        if new not in present and key in present:
            new, pattern = rename_source_key(key, [], [], model.base_model_prefix, present)
        if pattern is not None:
            index = next(i for i, c in enumerate(converters) if pattern in c.source_patterns)
            slot = list(converters[index].source_patterns).index(pattern)
            converted.setdefault((index, new), {}).setdefault(slot, []).append(key)
        elif new != key:
            rules.append(Rule((key,), (new,)))
    after: list[Rule] = []  # per-target ops of a one-to-many converter (PermuteForRope after a Chunk)
    for (index, target), slots in converted.items():
        translated = translate(converters[index], target, slots, metas or {}, model)
        if translated is None:
            rules.append(_converter_rule(converters[index], target, slots, metas or {}))
        else:
            rules += translated[0]
            after += translated[1]
    return WeightMap.of(rules).then(WeightMap.of(after)), transforms


def _converter_rule(
    converter: Any, target: str, slots: dict[int, list[str]], metas: Mapping[str, TensorMeta]
) -> Rule:
    """One transformers ``WeightConverter`` application (all its source keys for one target) as a Rule."""
    patterns = list(converter.source_patterns)
    operations = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    described = (
        f"{type(converter).__name__}({patterns} -> {converter.target_patterns}, {converter.operations})"
    )
    some = next(iter(slots.values()))[0]
    missing = [p for i, p in enumerate(patterns) if i not in slots]
    if missing:
        raise LoadError(
            f"{target}: transformers builds it from {patterns} but the checkpoint has no key matching {missing[0]!r} "
            f"(it has {some})"
        )
    merged = operations[:1] == [("MergeModulelist", 0)]
    if merged and (operations[1:] == [] and len(patterns) == 1 or operations[1:] == [("Concatenate", 1)]):
        sources, experts = [], None
        for i, pattern in enumerate(patterns):
            found, texts = {}, set()
            for key in slots[i]:
                text, number = _collected_index(key, pattern, described)
                found[number] = key
                texts.add(text)
            if len(texts) != 1:
                raise LoadError(
                    f"{target}: the keys matching {pattern!r} differ beyond the expert index: {sorted(texts)[:2]}"
                )
            sources.append(texts.pop())
            if experts is None:
                experts = found
            elif sorted(found) != sorted(experts):
                lone = sorted(set(found) ^ set(experts))[0]
                raise LoadError(
                    f"{target}: expert {lone} has {'no' if lone not in found else 'an'} {pattern!r} tensor while the "
                    f"other source pattern(s) {'have' if lone not in found else 'do not'}; every expert needs all of {patterns}"
                )
        assert experts is not None
        count = len(experts)
        meta = metas.get(experts[min(experts)])
        if len(patterns) == 1:
            return Rule(tuple(sources), (target,), (Stack(0),))
        if meta is None:
            raise LoadError(f"{target}: the shapes of its source tensors are needed to convert them")
        shape = tuple(meta.shape)
        ops = (  # stack every source's experts, then lay them out expert-major: [E, k * out, in]
            Stack(0),
            Reshape((len(patterns), count, *shape)),
            Transpose(0, 1),
            Reshape((count, len(patterns) * shape[0], *shape[1:])),
        )
        return Rule(tuple(sources), (target,), ops)
    if len(operations) == 1 and operations[0][0] == "Concatenate" and all("*" not in p for p in patterns):
        if any(len(slots[i]) != 1 for i in range(len(patterns))):
            raise LoadError(f"{target}: several checkpoint keys match one source of {described}")
        return Rule(tuple(slots[i][0] for i in range(len(patterns))), (target,), (Concat(operations[0][1]),))
    raise LoadError(
        f"{some}: transformers converts this checkpoint key with {described}; splice translates MergeModulelist(dim=0) "
        "[+ Concatenate(dim=1)], Concatenate and the ops in splice.hf.conversions, not this conversion yet"
    )


def _collected_index(key: str, pattern: str, described: str) -> tuple[str, int]:
    """``key`` with the expert index that ``*`` stands for in transformers' ``pattern`` replaced by ``#``.

    Source patterns are regexes in which ``*.`` stands for one module-list index, as transformers
    compiles them (``mlp.experts.*.gate_proj.weight``, ``\\.experts.*.w1.weight``).
    """
    regex = pattern.replace("*.", r"(?P<splice_index>\d+)\.", 1)
    if re.search(r"[a-zA-Z0-9]$", regex):
        regex += r"(?!\w)"  # a name boundary, as transformers adds
    try:
        match = re.search(regex, key) if "splice_index" in regex else None
    except re.error:
        match = None
    if match is None:
        raise LoadError(
            f"{key}: cannot find the expert index of {pattern!r} in it (converting with {described})"
        )
    start, end = match.span("splice_index")
    return key[:start] + "#" + key[end:], int(match.group("splice_index"))
