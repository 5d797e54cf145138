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
converter it does not handle, which `splice.hf` then handles or refuses by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from splice.errors import LoadError
from splice.transforms import Op, PermuteBlocks, Reshape, Split, Stack, TensorMeta, Transpose, Unstack
from splice.weightmap import Rule

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
