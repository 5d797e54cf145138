"""splice.checkpoint: strided selections (a TP rank's columns) read in few system calls, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from test_checkpoint import assert_same, random_tensor

import splice.checkpoint.reader as reader_module
from splice.checkpoint import CheckpointReader, save_state_dict
from splice.checkpoint import _io as checkpoint_io
from splice.checkpoint.slicing import DISCARD, positional_reads
from splice.parallel.layout import chunk_bounds

SHAPES = [(37, 53), (64, 24), (5, 7, 11), (1, 9)]  # uneven, non-square, 3-D, one row


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    """Every (shape, dtype) as one tensor, in a checkpoint cut into several files."""
    tensors = {
        f"{dtype}-{'x'.join(map(str, shape))}".replace("torch.", ""): random_tensor(shape, dtype, seed)
        for seed, (shape, dtype) in enumerate(
            (shape, dtype) for shape in SHAPES for dtype in (torch.float32, torch.bfloat16, torch.float16)
        )
    }
    path = save_state_dict(tensors, tmp_path_factory.mktemp("strided") / "ckpt", max_shard_size=6000)
    return path, tensors


def rank_indices(shape: tuple[int, ...], tp: int) -> list[tuple]:
    """Every rank's piece along every dimension: contiguous row blocks, and strided column/middle blocks."""
    indices = []
    for dim, size in enumerate(shape):
        for start, stop in chunk_bounds(size, tp):
            indices.append((slice(None),) * dim + (slice(start, stop),))
    return indices


@pytest.mark.parametrize("max_gap", [0, reader_module.MAX_GAP], ids=["call-per-run", "through-gaps"])
@pytest.mark.parametrize("tp", [2, 3, 4])
def test_every_rank_piece_is_bitwise_the_slice_of_the_full_tensor(
    sharded_checkpoint, tp, max_gap, monkeypatch
):
    path, tensors = sharded_checkpoint
    monkeypatch.setattr(reader_module, "MAX_GAP", max_gap)
    with CheckpointReader(path) as reader:
        assert len(reader.files) > 1
        for key, full in tensors.items():
            for index in rank_indices(tuple(full.shape), tp):
                expected = full[index]
                read, discarded = reader.bytes_read, reader.bytes_discarded
                assert_same(reader.get_slice(key)[index], expected)
                assert reader.bytes_read - read == expected.nbytes
                # through the gaps: exactly the bytes between the first and last selected ones
                covered = _covered_bytes(full, index) if expected.numel() and max_gap else expected.nbytes
                assert reader.bytes_discarded - discarded == covered - expected.nbytes

                # into a strided destination (a fused tensor's column block), leaving its neighbours alone
                sentinel = random_tensor((*expected.shape[:-1], expected.shape[-1] + 3), full.dtype, 99)
                out = sentinel.clone()
                reader.read_into(key, out[..., 2 : 2 + expected.shape[-1]], index)
                assert_same(out[..., 2 : 2 + expected.shape[-1]], expected)
                assert_same(out[..., :2], sentinel[..., :2])
                assert_same(out[..., 2 + expected.shape[-1] :], sentinel[..., 2 + expected.shape[-1] :])


def _covered_bytes(full: torch.Tensor, index: tuple) -> int:
    """Bytes from the first selected element of ``full`` (C order) to the end of the last one."""
    flat = torch.arange(full.numel()).reshape(full.shape)[index].reshape(-1)
    return (int(flat.max()) - int(flat.min()) + 1) * full.element_size()


@pytest.mark.parametrize("rows", [10, 1000, 5000])
def test_a_column_split_takes_a_bounded_number_of_reads_not_one_per_row(tmp_path, rows):
    full = random_tensor((rows, 64), torch.float32, 0)
    save_state_dict({"w": full}, tmp_path / "ckpt")
    with CheckpointReader(tmp_path / "ckpt") as reader:
        before = reader.read_calls
        right = reader.get_slice("w")[:, 32:64]
        assert_same(right, full[:, 32:])
        calls = reader.read_calls - before
        # one preadv per IOV_MAX buffers: a run per row and a 128-byte gap between rows
        assert calls == math.ceil((2 * rows - 1) / checkpoint_io.IOV_MAX)
        assert calls <= 1 + rows // 500
        assert reader.bytes_discarded == (rows - 1) * 32 * 4


def test_gaps_wider_than_max_gap_are_skipped_with_a_read_per_run(tmp_path):
    # 3 rows of 40000 floats, half of each selected: an 80 KB gap costs more to copy than a call does
    full = random_tensor((3, 40000), torch.float32, 1)
    save_state_dict({"w": full}, tmp_path / "ckpt")
    with CheckpointReader(tmp_path / "ckpt") as reader:
        before = reader.read_calls
        assert_same(reader.get_slice("w")[:, :20000], full[:, :20000])
        assert reader.read_calls - before == 3 and reader.bytes_discarded == 0


def test_positional_reads_groups_runs_and_gaps_in_order():
    # runs of 8 bytes at 0, 24, 48 (gaps of 16), then one at 200 (gap of 144); a contiguous destination
    reads = positional_reads([0, 24, 48, 200], 8, [0], 32, max_gap=16)
    assert reads == [(0, [(0, 8), (DISCARD, 16), (8, 8), (DISCARD, 16), (16, 8)]), (200, [(24, 8)])]
    # a destination in blocks of 4 bytes (a column view): each run scatters over two blocks
    reads = positional_reads([0, 24], 8, [0, 4, 100, 104], 4, max_gap=16)
    assert reads == [(0, [(0, 4), (4, 4), (DISCARD, 16), (100, 4), (104, 4)])]
    # a destination block holding several runs: each run lands at its place inside it; no gap allowed
    reads = positional_reads([0, 24], 8, [0, 64], 16, max_gap=0)
    assert reads == [(0, [(0, 8)]), (24, [(8, 8)])]
    assert positional_reads([], 8, [], 0, max_gap=16) == []
