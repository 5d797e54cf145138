"""LoRA adapters under tensor parallelism: where each factor lives, and back to vanilla PEFT tensors.

A LoRA adds ``B @ A @ x`` (scaled) to a Linear's output. Under TP it follows its base:

- **column-parallel base** (a q/k/v or gate/up slice of a fused Linear, or a plain colwise Linear): the
  input is whole on every rank and the output rows are cut, so ``A`` ``[r, in]`` is *replicated* and
  ``B`` ``[out, r]`` is cut along its rows exactly like the base weight: the same kv replicas and the
  same zero padding. Rank r's LoRA output then lands on the rows its base output holds.
- **row-parallel base** (``o_proj``, ``down_proj``): the input columns are cut, so ``A`` is cut along its
  columns like the base weight (zero padding included) and ``B`` is *replicated*; each rank's
  ``B @ A_r @ x_r`` is a partial sum, reduced by the base's own all-reduce.

Consolidating runs the base weight's layout ops backwards on ``B`` (or ``A``), so replicas that
trained apart and padding that is no longer zero are refused, never merged or dropped; replicated
factors must be identical on every rank. Keys default to the vanilla PEFT file format
(``base_model.model.{module}.lora_A.weight``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from splice.errors import SpliceError
from splice.parallel.layout import chunk_bounds, layout_map
from splice.parallel.sharding import COLUMN, EMBEDDING, ROW, TPLayout
from splice.transforms import Op, bitwise_equal
from splice.weightmap import Rule, WeightMap

__all__ = ["consolidate_lora", "lora_rules", "peft_key", "shard_lora"]


def peft_key(module: str, factor: str) -> str:
    """The key vanilla PEFT saves a LoRA factor under: ``base_model.model.{module}.{lora_A|lora_B}.weight``."""
    return f"base_model.model.{module}.{factor}.weight"


def lora_rules(
    layout: TPLayout, modules: Iterable[str], key: Callable[[str, str], str] = peft_key
) -> tuple[WeightMap, dict[str, int]]:
    """The vanilla -> TP-global map of the LoRA factors on ``modules`` (original module paths), and each cut key's dim."""
    rules: list[Rule] = []
    dims: dict[str, int] = {}
    for module in modules:
        kind, ops = base_of(layout, module)
        if kind == "column":
            cut = key(module, "lora_B")
            dims[cut] = 0
        elif kind == "row":
            cut = key(module, "lora_A")
            dims[cut] = 1
        else:
            continue
        if ops:
            rules.append(Rule((cut,), (cut,), ops))
    return layout_map(rules), dims


def shard_lora(
    layout: TPLayout,
    vanilla: Mapping[str, torch.Tensor],
    modules: Iterable[str],
    key: Callable[[str, str], str] = peft_key,
) -> list[dict[str, torch.Tensor]]:
    """Each rank's pieces of a vanilla adapter: cut factors laid out like their bases, the others replicated."""
    wm, dims = lora_rules(layout, modules, key)
    tp_global = wm.to_runtime(dict(vanilla))
    pieces: list[dict[str, torch.Tensor]] = [{} for _ in range(layout.tp)]
    for name, tensor in tp_global.items():
        dim = dims.get(name)
        for rank in range(layout.tp):
            if dim is None:
                pieces[rank][name] = tensor
            else:
                a, b = chunk_bounds(tensor.shape[dim], layout.tp)[rank]
                pieces[rank][name] = tensor.narrow(dim, a, b - a)
    return pieces


def consolidate_lora(
    layout: TPLayout,
    pieces: Sequence[Mapping[str, torch.Tensor]],
    modules: Iterable[str],
    key: Callable[[str, str], str] = peft_key,
) -> dict[str, torch.Tensor]:
    """Vanilla PEFT tensors from every rank's LoRA pieces (rank order), exactly, or an error naming what would be lost."""
    if len(pieces) != layout.tp:
        raise SpliceError(f"expected the LoRA pieces of {layout.tp} ranks, got {len(pieces)}")
    wm, dims = lora_rules(layout, modules, key)
    names = list(pieces[0])
    for rank, local in enumerate(pieces[1:], 1):
        if set(local) != set(names):
            diff = sorted(set(local) ^ set(names))
            raise SpliceError(f"rank {rank}'s LoRA pieces differ in keys from rank 0's: {diff[:3]}")
    tp_global: dict[str, torch.Tensor] = {}
    for name in names:
        dim = dims.get(name)
        if dim is not None:
            tp_global[name] = torch.cat([local[name] for local in pieces], dim)
            continue
        first = pieces[0][name]
        for rank, local in enumerate(pieces[1:], 1):
            if not bitwise_equal(local[name], first):
                raise SpliceError(
                    f"{name} is replicated, but rank {rank}'s copy differs from rank 0's; "
                    "keeping one would lose the other (were its gradients summed over the ranks?)"
                )
        tp_global[name] = first
    return wm.to_original(tp_global)


def base_of(layout: TPLayout, module: str) -> tuple[str | None, tuple[Op, ...]]:
    """``("column" | "row" | None, the base weight's layout ops)`` for an original module path."""
    for group in layout.groups:
        for part in group.parts:
            if (f"{group.path}.{part.part.name}" if group.path else part.part.name) == module:
                return "column", part.ops
    style = layout.styles.get(module)
    weight = f"{module}.weight"
    ops = next((r.ops for r in layout.rules.stages[0] if [p.text for p in r.sources] == [weight]), ())
    if style in COLUMN:
        return "column", ops
    if style in ROW:
        return "row", ops
    if style in EMBEDDING:
        raise SpliceError(f"{module}: LoRA on a vocabulary-parallel embedding is not supported under TP")
    return None, ()
