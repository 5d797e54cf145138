"""MoE expert layouts over simulated ranks: no processes. Per-expert checkpoint tensors -> stacked -> TP/EP cut.

For every expert count, intermediate size, hidden size and rank count hypothesis picks, the boxes
`block_reads` plans for rank r must fill exactly rank r's piece of the TP-global tensor (what running the
whole step and cutting it gives), every checkpoint element must be read by exactly one rank, and the
layout must undo bit for bit. Steps it cannot plan as boxes return None (the loader then builds the whole).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.parallel.block_reads import block_reads
from splice.parallel.experts import ExpertPlan, ExpertsLayout
from splice.parallel.layout import chunk_bounds, padded
from splice.transforms import Reshape, Stack, TensorMeta, Transpose
from splice.weightmap import Rule, WeightMap

FEW = settings(deadline=None, max_examples=15)

GATE_UP, DOWN = "experts.gate_up_proj", "experts.down_proj"


def checkpoint(experts: int, size: int, hidden: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(experts * 1000 + size * 10 + hidden)
    out = {}
    for e in range(experts):
        out[f"experts.{e}.w1.weight"] = torch.randn(size, hidden, generator=g)
        out[f"experts.{e}.w3.weight"] = torch.randn(size, hidden, generator=g)
        out[f"experts.{e}.w2.weight"] = torch.randn(hidden, size, generator=g)
    return out


def stacking(experts: int, size: int, hidden: int) -> WeightMap:
    """transformers' MergeModulelist(dim=0) [+ Concatenate(dim=1)], as splice.hf translates it."""
    gate_up = (
        Stack(0),
        Reshape((2, experts, size, hidden)),
        Transpose(0, 1),
        Reshape((experts, 2 * size, hidden)),
    )
    return WeightMap.of(
        [
            Rule(("experts.#.w1.weight", "experts.#.w3.weight"), (GATE_UP,), gate_up),
            Rule(("experts.#.w2.weight",), (DOWN,), (Stack(0),)),
        ]
    )


def check(tensors, wm: WeightMap, dims: dict[str, int], ranks: int) -> None:
    metas = {k: TensorMeta.of(t) for k, t in tensors.items()}
    plan = wm.compile(list(tensors), metas)
    for step in plan.steps:
        [target] = step.targets
        whole = step.run([tensors[k] for k in step.sources])[0]
        dim = dims[target]
        read = {k: torch.zeros(t.shape, dtype=torch.int64) for k, t in tensors.items() if k in step.sources}
        for a, b in chunk_bounds(whole.shape[dim], ranks):
            blocks = block_reads(step, target, dim, (a, b))
            assert blocks is not None, step
            local = torch.zeros(whole.narrow(dim, a, b - a).shape)
            for block in blocks:
                local[block.at] = tensors[block.source][block.source_index].reshape(local[block.at].shape)
                read[block.source][block.source_index] += 1
            assert torch.equal(local, whole.narrow(dim, a, b - a))
        assert all(bool((count == 1).all()) for count in read.values())  # every element by exactly one rank
        assert [torch.equal(x, tensors[k]) for k, x in zip(step.sources, step.inverted().run([whole]))]


@FEW
@given(
    experts=st.integers(1, 5),
    size=st.integers(1, 9),
    hidden=st.integers(1, 5),
    ranks=st.sampled_from([1, 2, 3, 4]),
)
def test_tensor_parallel_experts(experts, size, hidden, ranks):
    tensors = checkpoint(experts, size, hidden)
    cut = padded(size, ranks)
    layout = ExpertPlan(
        [ExpertsLayout("experts", "tp", "gate_up_proj", "down_proj", experts, hidden, size, cut)]
    )
    wm = stacking(experts, size, hidden).then(layout.rules(ranks))
    check(tensors, wm, layout.dims(), ranks)
    # rank r holds rows r of each expert's gate, then the same rows of its up: transformers' packed_colwise
    metas = {k: TensorMeta.of(t) for k, t in tensors.items()}
    step = wm.compile(list(tensors), metas).step_for(GATE_UP)
    a, b = chunk_bounds(2 * cut, ranks)[ranks - 1]
    piece = cut // ranks
    rows = slice((ranks - 1) * piece, min(ranks * piece, size))
    found = {bl.source: (bl.source_index[0], bl.at[1].start) for bl in block_reads(step, GATE_UP, 1, (a, b))}
    if rows.start < size:
        assert found["experts.0.w1.weight"] == (rows, 0) and found["experts.0.w3.weight"] == (rows, piece)
    else:  # the last rank holds only padding
        assert found == {}


@FEW
@given(
    experts=st.integers(1, 6),
    size=st.integers(1, 6),
    hidden=st.integers(1, 4),
    ranks=st.sampled_from([1, 2, 3]),
)
def test_expert_parallel_experts(experts, size, hidden, ranks):
    if experts % ranks:
        return
    tensors = checkpoint(experts, size, hidden)
    layout = ExpertPlan(
        [ExpertsLayout("experts", "ep", "gate_up_proj", "down_proj", experts, hidden, size, size)]
    )
    check(tensors, stacking(experts, size, hidden), layout.dims(), ranks)
    # a rank's whole experts: one box per checkpoint tensor
    metas = {k: TensorMeta.of(t) for k, t in tensors.items()}
    step = stacking(experts, size, hidden).compile(list(tensors), metas).step_for(GATE_UP)
    assert len(block_reads(step, GATE_UP, 0, (0, experts // ranks))) == 2 * (experts // ranks)


def test_unplannable_steps_return_none():
    tensors = {"a": torch.randn(4, 6)}
    metas = {k: TensorMeta.of(t) for k, t in tensors.items()}
    # a transpose moves the only dim that could shrink onto the cut dim
    step = WeightMap.of([Rule(("a",), ("b",), (Transpose(0, 1),))]).compile(["a"], metas).steps[0]
    assert block_reads(step, "b", 0, (0, 3)) is None
    # a reshape that mixes the shrinkable dim into another: rows are no longer whole lines
    step = WeightMap.of([Rule(("a",), ("b",), (Reshape((8, 3)),))]).compile(["a"], metas).steps[0]
    assert block_reads(step, "b", 0, (0, 4)) is None
