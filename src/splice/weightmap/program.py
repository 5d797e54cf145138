"""What compiling a map makes: a `CompiledMap` of steps (`Step`), each a program of instructions (`Instr`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from splice.errors import TransformError, WeightMapError
from splice.tensors import TensorMeta
from splice.transforms import Op, apply_ops, invert_ops
from splice.weightmap.patterns import compact
from splice.weightmap.rules import Rule

__all__ = ["CompiledMap", "Instr", "Step"]


@dataclass(frozen=True)
class Instr:
    """One rule applied to concrete keys: ``inputs -> ops -> outputs`` (names are keys, or a program's intermediate values)."""

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
        return f"{compact(self.sources)} -> {compact(self.targets)} : {body}"


@dataclass
class CompiledMap:
    """A weight map compiled against concrete keys: steps over concrete keys, plus what nothing claimed and what matched nothing."""

    steps: list[Step]
    unclaimed: list[str] = field(default_factory=list)
    unused_rules: list[Rule] = field(default_factory=list)

    @property
    def target_keys(self) -> list[str]:
        return [k for s in self.steps for k in s.targets]

    @property
    def target_metas(self) -> dict[str, TensorMeta]:
        out: dict[str, TensorMeta] = {}
        for s in self.steps:
            if s.target_metas is None:
                raise WeightMapError("this map was compiled without shapes; pass metas to compile()")
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

    def inverse(self) -> CompiledMap:
        return CompiledMap([s.inverted() for s in self.steps])

    def __str__(self) -> str:
        return "\n".join(str(s) for s in self.steps if not (s.is_rename and s.sources == s.targets))
