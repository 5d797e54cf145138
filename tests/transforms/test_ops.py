"""Every op: inverse(apply(x)) is bitwise x, shapes propagate without data, and ops serialize."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.errors import TransformError
from splice.transforms import (
    AbsorbScale,
    Concat,
    ConvToLinear,
    DedupBlocks,
    Deinterleave,
    DropZeros,
    InsertZeros,
    Interleave,
    LinearToConv,
    Op,
    Pad,
    PermuteBlocks,
    Reorder,
    RepeatBlocks,
    Reshape,
    Split,
    Stack,
    TensorMeta,
    Transpose,
    UnabsorbScale,
    Unpad,
    Unstack,
    bitwise_equal,
    op_from_dict,
    parse_op,
)
from splice.transforms.interleave import row_order

settings.register_profile("splice", deadline=None, max_examples=60)
settings.load_profile("splice")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]


def tensor(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g).to(dtype)
        flat = t.view(-1)
        if flat.numel() > 2:  # special values must survive bit for bit
            flat[0], flat[1] = float("nan"), -0.0
        return t
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int64).to(dtype)


shape_st = st.lists(st.integers(1, 7), min_size=1, max_size=4)
dtype_st = st.sampled_from(DTYPES)
seed_st = st.integers(0, 2**16)


def check_round_trip(op: Op, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    metas = [TensorMeta.of(t) for t in inputs]
    op = op.resolve(metas)
    outputs = op.apply(inputs)
    assert op.infer(metas) == [TensorMeta.of(t) for t in outputs]
    assert all(t.dtype == inputs[0].dtype for t in outputs)
    restored = op.inverted().apply(outputs)
    assert len(restored) == len(inputs)
    for a, b in zip(restored, inputs):
        assert bitwise_equal(a, b)
    assert op_from_dict(op.to_dict()) == op
    assert parse_op(str(op)) == op
    assert op.inverted().inverted() == op
    return outputs


@given(st.data(), dtype_st, seed_st)
def test_concat_split_uneven(data, dtype, seed):
    shape = data.draw(shape_st)
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    sizes = data.draw(st.lists(st.integers(0, 6), min_size=1, max_size=4))
    parts = []
    for i, s in enumerate(sizes):
        part_shape = list(shape)
        part_shape[dim] = s
        parts.append(tensor(part_shape, dtype, seed + i))
    [fused] = check_round_trip(Concat(dim), parts)
    assert fused.shape[dim] == sum(sizes)
    check_round_trip(Split(dim, tuple(sizes)), [fused])


@given(shape_st, st.integers(1, 5), dtype_st, seed_st, st.data())
def test_stack_unstack(shape, n, dtype, seed, data):
    dim = data.draw(st.integers(0, len(shape)))
    parts = [tensor(shape, dtype, seed + i) for i in range(n)]
    [stacked] = check_round_trip(Stack(dim), parts)
    assert stacked.shape[dim] == n
    check_round_trip(Unstack(dim), [stacked])


@given(
    st.integers(1, 6),
    st.integers(1, 4),
    st.lists(st.integers(1, 4), min_size=1, max_size=3),
    dtype_st,
    seed_st,
)
def test_conv_linear(out_ch, in_ch, kernel, dtype, seed):
    w = tensor([out_ch, in_ch, *kernel], dtype, seed)
    [linear] = check_round_trip(ConvToLinear(), [w])
    assert linear.shape == (out_ch, in_ch * math.prod(kernel))
    check_round_trip(LinearToConv(tuple(kernel)), [linear])


def test_conv_to_linear_matches_the_conv():
    conv = torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4), bias=False)
    x = torch.randn(5, 3, 2, 4, 4)
    [w] = ConvToLinear().apply([conv.weight.detach()])
    torch.testing.assert_close(x.reshape(5, -1) @ w.T, conv(x).reshape(5, 8), rtol=1e-5, atol=1e-5)


@given(shape_st, dtype_st, seed_st, st.data())
def test_transpose(shape, dtype, seed, data):
    d0 = data.draw(st.integers(0, len(shape) - 1))
    d1 = data.draw(st.integers(0, len(shape) - 1))
    check_round_trip(Transpose(d0, d1), [tensor(shape, dtype, seed)])


@given(shape_st, dtype_st, seed_st, st.data())
def test_reshape(shape, dtype, seed, data):
    x = tensor(shape, dtype, seed)
    # any factorization of the elements: split the first dim's size into two factors, move the rest
    n = shape[0]
    a = data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
    op = Reshape((a, n // a, *shape[1:])).resolve([TensorMeta.of(x)])
    [y] = check_round_trip(op, [x])
    assert y.shape == (a, n // a, *shape[1:]) and bitwise_equal(y.flatten(), x.flatten())


@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(1, 3), dtype_st, seed_st, st.data())
def test_permute_blocks(blocks, other, dtype, seed, data):
    perm = tuple(data.draw(st.permutations(range(len(blocks)))))
    x = tensor([math.prod(blocks), other], dtype, seed)
    spec = list(blocks)
    if data.draw(st.booleans()):
        spec[data.draw(st.integers(0, len(spec) - 1))] = -1
    check_round_trip(PermuteBlocks(0, tuple(spec), perm), [x])


def test_permute_blocks_interleaves_gate_up_per_rank():
    gate, up = torch.arange(8).reshape(8, 1), torch.arange(100, 108).reshape(8, 1)
    [out] = PermuteBlocks(0, (2, 4, -1), (1, 0, 2)).apply([torch.cat([gate, up])])
    assert out.flatten().tolist() == [0, 1, 100, 101, 2, 3, 102, 103, 4, 5, 104, 105, 6, 7, 106, 107]


@given(st.lists(st.integers(0, 5), min_size=1, max_size=6), dtype_st, seed_st, st.data())
def test_reorder(sizes, dtype, seed, data):
    order = tuple(data.draw(st.permutations(range(len(sizes)))))
    x = tensor([sum(sizes), 3], dtype, seed)
    check_round_trip(Reorder(0, tuple(sizes), order), [x])


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), dtype_st, seed_st)
def test_repeat_dedup(blocks, times, width, dtype, seed):
    x = tensor([blocks * width, 3], dtype, seed)
    [rep] = check_round_trip(RepeatBlocks(0, blocks, times), [x])
    assert rep.shape[0] == blocks * width * times


def test_dedup_refuses_diverged_replicas():
    [rep] = RepeatBlocks(0, 2, 2).apply([torch.arange(4.0).reshape(4, 1)])
    rep[5] += 1  # block 1, copy 1
    with pytest.raises(TransformError, match="copy 1 of block 1 differs"):
        DedupBlocks(0, 2, 2).apply([rep])


@given(shape_st, st.integers(0, 4), dtype_st, seed_st, st.data())
def test_pad_unpad(shape, extra, dtype, seed, data):
    dim = data.draw(st.integers(0, len(shape) - 1))
    x = tensor(shape, dtype, seed)
    [padded] = check_round_trip(Pad(dim, shape[dim] + extra), [x])
    assert padded.shape[dim] == shape[dim] + extra


def test_unpad_refuses_non_zero_padding():
    with pytest.raises(TransformError, match="non-zero values"):
        Unpad(0, 2).apply([torch.tensor([1.0, 2.0, 0.0, 3.0])])


@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed_st,
)
def test_absorb_power_of_two_scale_is_exact(rows, cols, dtype, seed):
    w = tensor([rows, cols], dtype, seed)
    w = torch.where(w.isnan(), torch.zeros_like(w), w)
    exps = torch.randint(-3, 4, (cols,), generator=torch.Generator().manual_seed(seed))
    g = torch.pow(2.0, exps.float()).to(dtype)
    scaled, _ = check_round_trip(AbsorbScale(1), [w, g])
    torch.testing.assert_close(scaled.float(), (w.float() * g.float()), rtol=0, atol=0)


def test_absorb_refuses_a_scale_that_does_not_divide_back():
    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TransformError, match=r"not exact: dividing the scale back out changes \d+ of 128"):
        AbsorbScale(1).apply([w, torch.full((8,), 0.3)])
    with pytest.raises(TransformError, match="not exact: multiplying"):
        UnabsorbScale(1).apply([w, torch.full((8,), 0.3)])


@pytest.mark.parametrize(
    "op, inputs, message",
    [
        (Concat(0), [torch.zeros(2, 3), torch.zeros(2, 4)], "must agree on every dim except 0"),
        (Concat(0), [torch.zeros(2), torch.zeros(2, dtype=torch.int8)], "different dtypes"),
        (Concat(0, (2, 2)), [torch.zeros(2, 3), torch.zeros(3, 3)], r"input sizes along dim 0 are \[2, 3\]"),
        (Split(0, (2, 2)), [torch.zeros(5)], "sizes add up to 4"),
        (Split(3, (1,)), [torch.zeros(5)], "dim 3 is out of range"),
        (Stack(0), [torch.zeros(2), torch.zeros(3)], "must share shape"),
        (Reshape((4, 2)), [torch.zeros(3, 3)], "has 9 elements, not 8"),
        (Reshape((3, 3), (9,)), [torch.zeros(3, 3)], r"input has shape \[3, 3\]"),
        (ConvToLinear(), [torch.zeros(2, 3)], "expected a conv weight"),
        (LinearToConv((2, 2)), [torch.zeros(2, 6)], r"\[out, in \* 4\]"),
        (PermuteBlocks(0, (3, -1), (1, 0)), [torch.zeros(4)], "not divisible into blocks"),
        (Pad(0, 2), [torch.zeros(3)], "already larger than 2"),
        (AbsorbScale(1), [torch.zeros(2, 3), torch.zeros(4)], "does not fit dim 1"),
        (AbsorbScale(1), [torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3, dtype=torch.int8)], "floating"),
    ],
)
def test_errors_name_the_op_and_the_shapes(op, inputs, message):
    with pytest.raises(TransformError, match=message) as info:
        op.apply(inputs)
    assert str(info.value).startswith(op.name)


def test_unresolved_ops_cannot_be_inverted():
    with pytest.raises(TransformError, match="before its sizes are known"):
        Concat(0).inverted()
    with pytest.raises(TransformError, match="before its kernel is known"):
        ConvToLinear().inverted()
    with pytest.raises(TransformError, match="before its input shape is known"):
        Reshape((2, 2)).inverted()


def test_op_descriptions_reject_unknown_names_and_fields():
    with pytest.raises(TransformError, match="unknown op 'concatt'; known ops: absorb_scale, concat"):
        op_from_dict({"op": "concatt"})
    with pytest.raises(TransformError, match=r"has no field\(s\) \['axis'\]"):
        op_from_dict({"op": "concat", "axis": 0})
    with pytest.raises(TransformError, match="literals"):
        parse_op("concat(dim=x)")
    with pytest.raises(TransformError, match="invalid|cannot parse"):
        parse_op("concat(dim=")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"op": "concat", "dim": 1.5}, "op concat: field dim must be an int, got 1.5"),
        ({"op": "concat", "dim": True}, "op concat: field dim must be an int, got True"),
        ({"op": "concat", "sizes": "ab"}, "op concat: field sizes must be a list of ints, got 'ab'"),
        ({"op": "concat", "sizes": [1, 2.0]}, "op concat: field sizes must be a list of ints, got [1, 2.0]"),
        ({"op": "transpose", "dim0": "a"}, "op transpose: field dim0 must be an int, got 'a'"),
        (
            {"op": "permute_blocks", "blocks": [2, 2], "perm": 3},
            "op permute_blocks: field perm must be a list of ints, got 3",
        ),
        ({"op": "pad", "size": 4, "original": "3"}, "op pad: field original must be an int, got '3'"),
    ],
)
def test_op_fields_are_checked_against_their_annotations(data, message):
    with pytest.raises(TransformError) as info:
        op_from_dict(data)
    assert str(info.value) == message
    text = f"{data['op']}({', '.join(f'{k}={v!r}' for k, v in data.items() if k != 'op')})"
    with pytest.raises(TransformError) as info:
        parse_op(text)  # the printed form goes through the same check
    assert str(info.value) == message


def test_op_fields_accept_what_to_dict_writes_and_none_for_optional_sizes():
    assert op_from_dict({"op": "concat", "dim": -1, "sizes": None}) == Concat(-1)
    assert op_from_dict({"op": "concat", "dim": 0, "sizes": [2, 3]}) == Concat(0, (2, 3))
    assert parse_op("concat(dim=0, sizes=(2, 3))") == Concat(0, (2, 3))


def test_ops_are_plain_printable_values():
    op = Concat(0, (64, 16, 16))
    assert str(op) == "concat(dim=0, sizes=(64, 16, 16))"
    assert op.to_dict() == {"op": "concat", "dim": 0, "sizes": [64, 16, 16]}
    assert hash(op) == hash(Concat(0, [64, 16, 16]))


def test_resolve_rejects_wrong_explicit_sizes_and_meta_planning_stays_cheap():
    import subprocess
    import sys

    with pytest.raises(TransformError, match=r"input sizes along dim 0 are \[4, 2\]"):
        Concat(0, (3, 3)).resolve([TensorMeta((4, 8), torch.float32), TensorMeta((2, 8), torch.float32)])
    code = (
        "import sys, torch\nfrom splice.transforms import Concat, Stack, Reorder, Pad, TensorMeta\n"
        "m = TensorMeta((4, 3), torch.float32)\n"
        "for op, ins in ((Concat(0), [m, m]), (Stack(0), [m, m]), (Reorder(0, (2, 2), (1, 0)), [m]), (Pad(0, 6), [m])):\n"
        "    op.resolve(ins).infer(ins)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # shape propagation must not import torch._dynamo (~0.8 s)


# --------------------------------------------------------------------------------------------------
# interleave <-> deinterleave: pre-fused q/k/v layouts (per head, per kv group)


@given(st.data(), dtype_st, seed_st)
def test_interleave_deinterleave(data, dtype, seed):
    shape = data.draw(shape_st)
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    groups = data.draw(st.integers(1, 4))
    sizes = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
    parts = []
    for i, s in enumerate(sizes):
        part_shape = list(shape)
        part_shape[dim] = groups * s
        parts.append(tensor(part_shape, dtype, seed + i))
    [fused] = check_round_trip(Interleave(dim, groups), parts)
    assert fused.shape[dim] == groups * sum(sizes)
    pieces = check_round_trip(Deinterleave(dim, groups, tuple(sizes)), [fused])
    assert all(bitwise_equal(a, b) for a, b in zip(pieces, parts))


def test_deinterleave_reads_falcon_grouped_rows():
    """Falcon's new decoder architecture: per kv head [q x (heads / kv heads), k, v], head_dim rows each."""
    heads, kv_heads, head_dim = 4, 2, 3
    q = torch.arange(heads * head_dim).reshape(heads, head_dim)
    k, v = (
        100 + torch.arange(kv_heads * head_dim).reshape(kv_heads, head_dim),
        200 + torch.arange(6).reshape(2, 3),
    )
    # what FalconAttention._split_heads reads: view(kv_heads, heads // kv_heads + 2, head_dim)
    grouped = torch.cat(
        [torch.cat([q[2 * g : 2 * g + 2], k[g : g + 1], v[g : g + 1]]) for g in range(kv_heads)]
    )
    op = Deinterleave(0, groups=kv_heads, sizes=(2 * head_dim, head_dim, head_dim))
    out = op.apply([grouped.flatten()])
    assert [t.tolist() for t in out] == [q.flatten().tolist(), k.flatten().tolist(), v.flatten().tolist()]
    assert (
        row_order(kv_heads, op.sizes).tolist()
        == Interleave(0, kv_heads).apply(list(Split(0, (12, 6, 6)).apply([torch.arange(24)])))[0].tolist()
    )


@pytest.mark.parametrize(
    "op, inputs, message",
    [
        (Deinterleave(0, 2, (1, 1)), [torch.zeros(5)], "input has size 5 along dim 0, not 2 groups of 2"),
        (
            Interleave(0, 2),
            [torch.zeros(3), torch.zeros(2)],
            r"input sizes \[3, 2\] along dim 0 do not divide into 2",
        ),
        (Interleave(0, 2, (1, 1)), [torch.zeros(2), torch.zeros(4)], r"not 2 x \[1, 1\]"),
        (Interleave(0, 1), [torch.zeros(2, 3), torch.zeros(2, 4)], "must agree on every dim except 0"),
    ],
)
def test_interleave_errors_name_the_op_and_the_shapes(op, inputs, message):
    with pytest.raises(TransformError, match=message) as info:
        op.apply(inputs)
    assert str(info.value).startswith(op.name)


def test_interleave_options_are_checked():
    with pytest.raises(TransformError, match="groups must be a positive int"):
        Deinterleave(0, 0, (1,))
    with pytest.raises(TransformError, match="before its sizes are known"):
        Interleave(0, 2).inverted()


# --------------------------------------------------------------------------------------------------
# insert_zeros <-> drop_zeros: a bias some fused Linears lack


@given(st.data(), dtype_st, seed_st)
def test_insert_drop_zeros(data, dtype, seed):
    shape = data.draw(shape_st)
    dim = data.draw(st.integers(0, len(shape) - 1))
    n = data.draw(st.integers(1, 4))
    total = n + data.draw(st.integers(0, 3))
    at = tuple(sorted(data.draw(st.sets(st.integers(0, total - 1), min_size=total - n, max_size=total - n))))
    sizes = tuple(data.draw(st.lists(st.integers(0, 5), min_size=len(at), max_size=len(at))))
    inputs = [tensor(shape, dtype, seed + i) for i in range(n)]
    outputs = check_round_trip(InsertZeros(dim, at, sizes), inputs)
    assert all(outputs[p].shape[dim] == s and not outputs[p].count_nonzero() for p, s in zip(at, sizes))
    check_round_trip(DropZeros(dim, at, sizes), outputs)


def test_drop_zeros_refuses_a_block_that_is_no_longer_zero():
    q, k, v = torch.ones(4), torch.zeros(2), torch.ones(4)
    k[1] = 0.5
    with pytest.raises(
        TransformError, match=r"^drop_zeros.*input 1 should be all zeros but 1 of 2 values are not"
    ):
        DropZeros(0, (1,), (2,)).apply([q, k, v])
    with pytest.raises(TransformError, match="at must be increasing positions, one size each"):
        InsertZeros(0, (2, 1), (1, 1))
