"""TP layout maths over a simulated list of ranks: no processes, no files, no models.

For every head count, kv head count, head size and TP size hypothesis picks, rank r's plain cut of the
TP-global fused weight must be exactly ``[q_r | k_r | v_r]`` (kv heads replicated when the ranks
outnumber them), the ranks' partial attention / MLP outputs must sum to the unsharded output, the
reads each rank plans must rebuild its piece from the checkpoint tensors, and undoing the layout must
give back the originals bit for bit (refusing diverged replicas and non-zero padding).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pieces import shard, unshard

from splice.errors import TransformError, WeightMapError
from splice.parallel.layout import (
    Part,
    chunk_bounds,
    column_parts,
    fused_column_rules,
    interleave,
    layout_map,
    local_reads,
    padded,
    row_rules,
)
from splice.transforms import Pad, PermuteBlocks, RepeatBlocks, TensorMeta, bitwise_equal
from splice.weightmap import WeightMap

settings.register_profile("splice-parallel", deadline=None, max_examples=60)
settings.load_profile("splice-parallel")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@st.composite
def attention_shapes(draw):
    """(q heads, kv heads, head_dim, tp) that splice can shard: tp divides q heads, and divides or is a multiple of kv heads."""
    tp = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    kv = draw(st.sampled_from([k for k in (1, 2, 3, 4, 6, 8, 12) if k % tp == 0 or tp % k == 0]))
    groups = draw(st.integers(1, 4))
    q = kv * groups
    assume(q % tp == 0)
    head_dim = draw(st.sampled_from([1, 2, 3, 4, 8]))
    return q, kv, head_dim, tp


def qkv_layout(q, kv, head_dim, tp):
    parts = [Part("q_proj", q * head_dim, head_dim), Part("k_proj", kv * head_dim, head_dim, True)]
    parts.append(Part("v_proj", kv * head_dim, head_dim, True))
    layouts = column_parts(parts, tp)
    return layouts, layout_map(fused_column_rules("attn.", layouts, "qkv_proj", tp, ["weight", "bias"]))


def originals(q, kv, head_dim, hidden, seed):
    names = {"q_proj": q, "k_proj": kv, "v_proj": kv}
    out = {}
    for i, (name, heads) in enumerate(names.items()):
        out[f"attn.{name}.weight"] = randn(heads * head_dim, hidden, seed=seed + i)
        out[f"attn.{name}.bias"] = randn(heads * head_dim, seed=seed + 10 + i)
    return out


def heads_of(tensor, head_dim, first, count):
    return tensor[first * head_dim : (first + count) * head_dim]


@given(attention_shapes(), st.integers(1, 6), st.integers(0, 2**16))
def test_rank_r_gets_exactly_its_q_k_v(shape, hidden, seed):
    q, kv, head_dim, tp = shape
    _, wm = qkv_layout(q, kv, head_dim, tp)
    sd = originals(q, kv, head_dim, hidden, seed)
    fused = wm.to_runtime(sd)
    for param in ("weight", "bias"):
        pieces = shard(fused[f"attn.qkv_proj.{param}"], 0, tp)
        q_local, kv_local = q // tp, max(kv // tp, 1)
        for r, piece in enumerate(pieces):
            kv_first = r * kv // tp if kv >= tp else r // (tp // kv)
            expected = torch.cat(
                [
                    heads_of(sd[f"attn.q_proj.{param}"], head_dim, r * q_local, q_local),
                    heads_of(sd[f"attn.k_proj.{param}"], head_dim, kv_first, kv_local),
                    heads_of(sd[f"attn.v_proj.{param}"], head_dim, kv_first, kv_local),
                ]
            )
            assert bitwise_equal(piece, expected), (param, r)
    back = wm.to_original(fused)
    assert set(back) == set(sd)
    assert all(bitwise_equal(back[k], sd[k]) for k in sd)


@given(attention_shapes(), st.integers(1, 3), st.integers(0, 2**16))
def test_ranks_partial_attention_sums_to_the_full_attention(shape, tokens, seed):
    """Every rank runs attention on its own heads (kv replicas included) and its columns of o_proj."""
    q, kv, head_dim, tp = shape
    hidden = 5
    layouts, wm = qkv_layout(q, kv, head_dim, tp)
    sd = originals(q, kv, head_dim, hidden, seed)
    o_proj = randn(hidden, q * head_dim, seed=seed + 99)
    x = randn(tokens, hidden, seed=seed + 7)

    def attention(qkv_w, qkv_b, sizes, o, n_q, n_kv):
        out = x @ qkv_w.T + qkv_b
        qs, ks, vs = out.split(sizes, -1)
        qs, ks, vs = (t.reshape(tokens, -1, head_dim).transpose(0, 1) for t in (qs, ks, vs))
        ks, vs = ks.repeat_interleave(n_q // n_kv, 0), vs.repeat_interleave(n_q // n_kv, 0)
        weights = torch.softmax(qs @ ks.transpose(1, 2), -1)
        return (weights @ vs).transpose(0, 1).reshape(tokens, -1) @ o.T

    full_w = torch.cat([sd[f"attn.{n}_proj.weight"] for n in "qkv"])
    full_b = torch.cat([sd[f"attn.{n}_proj.bias"] for n in "qkv"])
    expected = attention(full_w, full_b, [q * head_dim, kv * head_dim, kv * head_dim], o_proj, q, kv)

    fused = wm.to_runtime(sd)
    local_sizes = [p.local_rows for p in layouts]
    n_q, n_kv = q // tp, layouts[1].local_rows // head_dim
    total = sum(
        attention(w, b, local_sizes, o, n_q, n_kv)
        for w, b, o in zip(
            shard(fused["attn.qkv_proj.weight"], 0, tp),
            shard(fused["attn.qkv_proj.bias"], 0, tp),
            shard(o_proj, 1, tp),
        )
    )
    torch.testing.assert_close(total, expected, atol=1e-5, rtol=1e-5)


@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 2, 3, 4, 8]), st.integers(0, 2**16))
def test_mlp_padding_adds_nothing_and_unpads_exactly(intermediate, hidden, tp, seed):
    gate, up = randn(intermediate, hidden, seed=seed), randn(intermediate, hidden, seed=seed + 1)
    down = randn(hidden, intermediate, seed=seed + 2)
    layouts = column_parts([Part("gate_proj", intermediate), Part("up_proj", intermediate)], tp)
    assert all(p.global_rows == padded(intermediate, tp) for p in layouts)
    wm = layout_map(
        fused_column_rules("mlp.", layouts, "gate_up_proj", tp)
        + row_rules("mlp.down_proj.weight", intermediate, tp)
    )
    sd = {"mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up, "mlp.down_proj.weight": down}
    tp_sd = wm.to_runtime(sd)
    x = randn(3, hidden, seed=seed + 3)
    expected = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    total = 0
    for gate_up_r, down_r in zip(
        shard(tp_sd["mlp.gate_up_proj.weight"], 0, tp), shard(tp_sd["mlp.down_proj.weight"], 1, tp)
    ):
        g, u = (x @ gate_up_r.T).chunk(2, -1)  # rank r's [gate_r | up_r]
        total = total + (torch.nn.functional.silu(g) * u) @ down_r.T
    torch.testing.assert_close(total, expected, atol=1e-4, rtol=1e-4)
    back = wm.to_original(tp_sd)
    assert all(bitwise_equal(back[k], sd[k]) for k in sd)


def test_consolidation_refuses_diverged_replicas_and_dirty_padding():
    layouts, wm = qkv_layout(4, 2, 3, 4)
    sd = originals(4, 2, 3, 5, seed=1)
    tp_sd = wm.to_runtime(sd)
    pieces = shard(tp_sd["attn.qkv_proj.weight"].clone(), 0, 4)
    pieces[1][layouts[0].local_rows] += 1  # rank 1's copy of k head 0 trained apart from rank 0's
    tp_sd["attn.qkv_proj.weight"] = unshard(pieces, 0)
    with pytest.raises(WeightMapError, match="copy 1 of block 0 differs"):
        wm.to_original(tp_sd)

    mlp = column_parts([Part("gate_proj", 6), Part("up_proj", 6)], 4)
    wm = layout_map(fused_column_rules("mlp.", mlp, "gate_up_proj", 4))
    tp_sd = wm.to_runtime({"mlp.gate_proj.weight": randn(6, 2), "mlp.up_proj.weight": randn(6, 2, seed=1)})
    tp_sd["mlp.gate_up_proj.weight"][-1] = 0.5  # rank 3's last up row is padding
    with pytest.raises(WeightMapError, match="padding past index 6 .* non-zero"):
        wm.to_original(tp_sd)


@given(attention_shapes(), st.integers(0, 2**16))
def test_planned_reads_rebuild_every_rank_piece(shape, seed):
    q, kv, head_dim, tp = shape
    hidden = 3
    _, wm = qkv_layout(q, kv, head_dim, tp)
    sd = originals(q, kv, head_dim, hidden, seed)
    metas = {k: TensorMeta.of(t) for k, t in sd.items()}
    plan = wm.compile(metas, metas)
    fused = dict(plan.run(sd.__getitem__))
    for step in plan.steps:
        [target] = step.targets
        meta = step.target_metas[0]
        for bounds in chunk_bounds(meta.shape[0], tp):
            reads = local_reads(step, target, 0, bounds)
            piece = torch.full((bounds[1] - bounds[0], *meta.shape[1:]), float("nan"))
            for read in reads:
                assert read.source in step.sources
                piece[read.at : read.at + read.rows] = sd[read.source][read.start : read.stop]
            assert bitwise_equal(piece, fused[target][bounds[0] : bounds[1]])
            # every read is one contiguous run per part: at most one per source
            assert len(reads) == len({r.source for r in reads})


def test_reads_of_padded_rows_and_column_cuts():
    layouts = column_parts([Part("gate_proj", 5), Part("up_proj", 5)], 2)
    wm = layout_map(fused_column_rules("", layouts, "gate_up_proj", 2) + row_rules("down_proj.weight", 5, 2))
    sd = {
        "gate_proj.weight": randn(5, 2),
        "up_proj.weight": randn(5, 2, seed=1),
        "down_proj.weight": randn(2, 5, seed=2),
    }
    metas = {k: TensorMeta.of(t) for k, t in sd.items()}
    plan = wm.compile(metas, metas)
    fused_step = plan.step_for("gate_up_proj.weight")
    reads = local_reads(
        fused_step, "gate_up_proj.weight", 0, (6, 12)
    )  # rank 1: gate rows 3-4, a pad, up 3-4, a pad
    assert [(r.source, r.start, r.stop, r.at) for r in reads] == [
        ("gate_proj.weight", 3, 5, 0),
        (None, 0, 1, 2),
        ("up_proj.weight", 3, 5, 3),
        (None, 0, 1, 5),
    ]
    down = plan.step_for("down_proj.weight")
    assert [(r.source, r.start, r.stop, r.at) for r in local_reads(down, "down_proj.weight", 1, (3, 6))] == [
        ("down_proj.weight", 3, 5, 0),
        (None, 0, 1, 2),
    ]
    assert local_reads(down, "down_proj.weight", 0, (0, 1)) is None  # the ops act on dim 1, not dim 0


def test_layout_rules_read_like_the_change():
    layouts = column_parts(
        [Part("q_proj", 64, 16), Part("k_proj", 32, 16, True), Part("v_proj", 32, 16, True)], 4
    )
    text = [str(r) for r in fused_column_rules("attn.", layouts, "qkv_proj", 4)]
    assert text == [
        "attn.k_proj.weight -> attn.k_proj.weight | repeat_blocks(dim=0, blocks=2, times=2)",
        "attn.v_proj.weight -> attn.v_proj.weight | repeat_blocks(dim=0, blocks=2, times=2)",
        "attn.{q,k,v}_proj.weight -> attn.qkv_proj.weight | concat(dim=0, sizes=(64, 64, 64)) "
        "| permute_blocks(dim=0, blocks=(3, 4, 16), perm=(1, 0, 2))",
    ]
    assert isinstance(interleave([4, 4], 2), PermuteBlocks)
    assert [type(op) for p in column_parts([Part("a", 3), Part("k", 2, 2, True)], 2) for op in p.ops] == [
        Pad,
        RepeatBlocks,
    ]
    wm = layout_map(fused_column_rules("attn.", layouts, "qkv_proj", 4))
    assert str(WeightMap.from_json(wm.to_json())) == str(wm)


def test_heads_ranks_cannot_share_are_an_error_naming_them():
    with pytest.raises(
        TransformError, match=r"attn: q_proj has 6 head\(s\) of 8 rows, which 4 ranks cannot share"
    ):
        column_parts([Part("q_proj", 48, 8), Part("k_proj", 16, 8, True)], 4, where="attn")
    with pytest.raises(TransformError, match="must divide or be a multiple of 3"):
        column_parts([Part("q_proj", 48, 8), Part("k_proj", 24, 8, True)], 2)
    with pytest.raises(TransformError, match="not a whole number of 8-row blocks"):
        column_parts([Part("q_proj", 44, 8)], 2)


@given(st.integers(0, 50), st.integers(1, 9))
def test_chunk_bounds_cut_like_dtensor_shard(size, tp):
    bounds = chunk_bounds(size, tp)
    assert len(bounds) == tp and bounds[0][0] == 0 and bounds[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    chunks = torch.arange(size).chunk(tp) if size else ()
    assert [b - a for a, b in bounds if b > a] == [len(c) for c in chunks]
    x = torch.arange(size * 2).reshape(size, 2)
    assert torch.equal(unshard(shard(x, 0, tp), 0), x)


def test_docstring_examples():
    import doctest

    import splice.parallel.layout

    result = doctest.testmod(splice.parallel.layout, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 5
