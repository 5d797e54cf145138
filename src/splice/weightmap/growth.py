"""How much a weight map read from a file may make out of what it reads, checked from shapes before anything is allocated.

The ops of ``splice convert`` and ``splice consolidate`` come from files (a ``--map``, the weight map a
converted checkpoint records, ``splice-parallel.json``), and a file can say anything:
``dedup_blocks(times=10**9)`` recorded for a 4x4 tensor turns, reversed, into a 64 GB allocation. So
each step is walked op by op on shapes alone, and refused when any op's outputs exceed
``MAX_GROWTH`` times the bytes the step reads (plus ``STEP_SLACK``, for the padding of tiny tensors);
all steps together may write at most ``MAX_GROWTH`` times what it reads (plus ``TOTAL_SLACK``). What a
step reads is the real size of tensors in real files, so work and memory stay bounded by them.

Legitimate layouts stay far below the bound: fusing or renaming keeps the size, tensor-parallel kv
replicas multiply a k/v projection by (ranks / kv heads), padding rounds a size up to the number of ranks.

>>> from splice.transforms import RepeatBlocks, TensorMeta
>>> import torch
>>> step = WeightMap.parse(["w -> w | repeat_blocks(times=1000000000)"]).compile(["w"], {"w": TensorMeta((4, 4), torch.float32)}).steps[0]
>>> check_step(step, step.source_metas, "ckpt")
Traceback (most recent call last):
...
splice.errors.WeightMapError: ckpt: w -> w: repeat_blocks(dim=0, blocks=1, times=1000000000) would make 64.0 GB out of the 64 B the step reads, more than 64 times as much (+ 64.0 kB); refusing to allocate it (is the file hostile or corrupt?)
"""

from __future__ import annotations

from collections.abc import Sequence

from splice.errors import TransformError, WeightMapError
from splice.tensors import TensorMeta
from splice.weightmap.maps import WeightMap  # noqa: F401  (the doctest)
from splice.weightmap.program import CompiledMap, Step

__all__ = ["MAX_GROWTH", "STEP_SLACK", "TOTAL_SLACK", "check_compiled", "check_step"]

MAX_GROWTH = 64
STEP_SLACK = 64_000
TOTAL_SLACK = 1_000_000


def check_step(step: Step, source_metas: Sequence[TensorMeta], where: str) -> list[TensorMeta]:
    """The shapes of ``step``'s targets for sources of ``source_metas``, or a `WeightMapError` naming the op
    that would grow the data beyond the bound (see the module doc). Nothing is allocated."""
    read = sum(m.nbytes for m in source_metas)
    budget = MAX_GROWTH * read + STEP_SLACK
    env = dict(zip(step.sources, source_metas))
    label = f"{where}: {', '.join(step.sources[:3])}{', ...' if len(step.sources) > 3 else ''} -> "
    label += ", ".join(step.targets[:3]) + (", ..." if len(step.targets) > 3 else "")
    for instr in step.program:
        current = [env[k] for k in instr.inputs]
        for op in instr.ops:
            try:
                current = op.infer(current)
            except (
                TransformError,
                RuntimeError,
                OverflowError,
                TypeError,
            ) as exc:  # torch's own on absurd sizes
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise WeightMapError(
                    f"{label}: {op} cannot run on {', '.join(map(str, current))}: {reason}"
                ) from None
            made = sum(m.nbytes for m in current)
            if made > budget:
                raise WeightMapError(
                    f"{label}: {op} would make {_human(made)} out of the {_human(read)} the step reads, more than "
                    f"{MAX_GROWTH} times as much (+ {_human(STEP_SLACK)}); refusing to allocate it "
                    "(is the file hostile or corrupt?)"
                )
        env.update(zip(instr.outputs, current))
    return [env[k] for k in step.targets]


def check_compiled(compiled: CompiledMap, where: str) -> None:
    """`check_step` for every step of a map compiled with shapes, and the same bound on all of them together."""
    read = made = 0
    for step in compiled.steps:
        if step.source_metas is None:
            raise WeightMapError(f"{where}: the map was compiled without shapes; cannot bound it")
        made += sum(m.nbytes for m in check_step(step, step.source_metas, where))
        read += sum(m.nbytes for m in step.source_metas)
    if made > MAX_GROWTH * read + TOTAL_SLACK:
        raise WeightMapError(
            f"{where}: the conversion would write {_human(made)} out of the {_human(read)} it reads, more than "
            f"{MAX_GROWTH} times as much (+ {_human(TOTAL_SLACK)}); refusing it (is the file hostile or corrupt?)"
        )


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover
