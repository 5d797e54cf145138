"""splice.checkpoint: a TP rank's pieces, bit for bit: strided selections (its columns) in few system calls,
rows of several tensors (its fused rows) as file mappings where the pages line up."""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_checkpoint import assert_same, random_tensor

import splice.checkpoint.reader as reader_module
from splice.checkpoint import CheckpointReader, save_state_dict
from splice.checkpoint import _io as checkpoint_io
from splice.checkpoint import _stitch as checkpoint_stitch
from splice.checkpoint._stitch import CAN_STITCH, MAX_PIECES
from splice.checkpoint.slicing import DISCARD, positional_reads
from splice.errors import CheckpointError
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


@pytest.mark.parametrize(
    "max_gap, map_runs",
    [(0, 10**9), (reader_module.MAX_GAP, 10**9), (reader_module.MAX_GAP, 0)],
    ids=["call-per-run", "through-gaps", "mapped-copy"],
)
@pytest.mark.parametrize("tp", [2, 3, 4])
def test_every_rank_piece_is_bitwise_the_slice_of_the_full_tensor(
    sharded_checkpoint, tp, max_gap, map_runs, monkeypatch
):
    path, tensors = sharded_checkpoint
    monkeypatch.setattr(reader_module, "MAX_GAP", max_gap)
    monkeypatch.setattr(reader_module, "MAP_RUNS", map_runs)
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
def test_a_column_split_takes_a_bounded_number_of_reads_not_one_per_row(tmp_path, rows, monkeypatch):
    monkeypatch.setattr(reader_module, "MAP_RUNS", 10**9)  # the read path (mapped copies: below)
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


@pytest.mark.skipif(not CAN_STITCH, reason="mapped copies need Linux mmap")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_column_split_of_many_rows_is_one_mapped_copy_with_no_read_call(tmp_path, dtype):
    rows = reader_module.MAP_RUNS * 3 + 1
    full = random_tensor((rows, 7, 24), dtype, 0)
    save_state_dict({"w": full, "pad": torch.ones(3, dtype=torch.uint8)}, tmp_path / "ckpt")
    with CheckpointReader(tmp_path / "ckpt") as reader:
        before = reader.read_calls
        columns = reader.get_slice("w")[1:, :, 5:17]  # a run per (row, middle) pair
        assert_same(columns, full[1:, :, 5:17])
        assert reader.read_calls == before
        assert reader.bytes_read == columns.nbytes
        assert (
            reader.bytes_discarded
            == _covered_bytes(full, (slice(1, None), slice(None), slice(5, 17))) - columns.nbytes
        )
        # into a strided destination, leaving its neighbours alone
        out = torch.zeros(rows - 1, 7, 20, dtype=dtype)
        reader.read_into("w", out[..., 4:16], (slice(1, None), slice(None), slice(5, 17)))
        assert_same(out[..., 4:16], full[1:, :, 5:17])
        assert not out[..., :4].any() and not out[..., 16:].any()
        assert reader.read_calls == before


def test_a_mapped_copy_falls_back_to_reads_where_the_file_cannot_be_mapped(tmp_path, monkeypatch):
    rows = reader_module.MAP_RUNS * 2
    full = random_tensor((rows, 16), torch.float32, 2)
    save_state_dict({"w": full}, tmp_path / "ckpt")
    monkeypatch.setattr(
        checkpoint_stitch, "through_mapping", lambda *args: False
    )  # e.g. a file system without mmap
    with CheckpointReader(tmp_path / "ckpt") as reader:
        assert_same(reader.get_slice("w")[:, 3:9], full[:, 3:9])
        assert reader.read_calls >= 1 and reader.bytes_read == rows * 6 * 4


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


# ------------------------------------------------------------------ rows of several tensors, stitched


@pytest.fixture(scope="module")
def page_rows(tmp_path_factory):
    """float32 tensors with 1024 columns (a row is a page) over several files, and a bfloat16 one whose aren't."""
    tensors = {
        "a.k": random_tensor((6, 1024), torch.float32, 1),
        "a.q": random_tensor((12, 1024), torch.float32, 2),
        "a.v": random_tensor((6, 1024), torch.float32, 3),
        "b.gate": random_tensor((10, 1024), torch.float32, 4),
        "b.up": random_tensor((10, 1024), torch.float32, 5),
        "c.odd": random_tensor((9, 53), torch.bfloat16, 6),
        "c.odd2": random_tensor((4, 53), torch.bfloat16, 7),
    }
    path = save_state_dict(tensors, tmp_path_factory.mktemp("stitch") / "ckpt", max_shard_size=120_000)
    return path, tensors


def expected_rows(tensors, rows):
    return torch.cat(
        [
            torch.zeros(stop - start, *tensors["a.q"].shape[1:]) if key is None else tensors[key][start:stop]
            for key, start, stop in rows
        ]
    )


@pytest.mark.skipif(not CAN_STITCH, reason="file mappings at fixed addresses are Linux-only")
def test_rows_of_several_tensors_are_mapped_where_pages_line_up_and_equal_the_cat(page_rows):
    path, tensors = page_rows
    # a rank's rows of q, k, v with two padding rows; then a gate/up pair from another file
    cases = [
        [("a.q", 6, 12), ("a.k", 3, 6), ("a.v", 3, 6), (None, 0, 2)],
        [("b.gate", 0, 5), ("b.up", 0, 5)],
        [("a.q", 0, 12), ("b.up", 7, 10)],
    ]
    with CheckpointReader(path) as reader:
        assert len({reader.file_of(k) for k in tensors}) > 1
        for rows in cases:
            read, mapped = reader.bytes_read, reader.bytes_mapped
            got = reader.map_rows(rows, torch.float32)
            expected = expected_rows(tensors, rows)
            assert_same(got, expected)
            padding = sum(stop - start for key, start, stop in rows if key is None) * 4096
            assert reader.bytes_read - read + reader.bytes_mapped - mapped == expected.nbytes - padding
            # every row is a page, so all but the pages cut by each piece's two ends are mappings
            pieces = sum(key is not None for key, _, _ in rows)
            assert reader.bytes_mapped - mapped >= expected.nbytes - padding - 2 * pieces * 4096
        kept = reader.map_rows(cases[0], torch.float32)
        stitched = [reader.map_rows(rows, torch.float32) for rows in cases]
    # the mappings outlive the reader's descriptors, and writing to them leaves the file alone
    assert_same(kept, expected_rows(tensors, cases[0]))
    before = {p.name: p.read_bytes() for p in path.glob("*.safetensors")}
    for tensor in stitched:
        tensor.add_(1.0)
    assert {p.name: p.read_bytes() for p in path.glob("*.safetensors")} == before
    assert_same(stitched[1], expected_rows(tensors, cases[1]) + 1.0)
    with CheckpointReader(path) as reader:
        assert_same(reader.map_rows(cases[1], torch.float32), expected_rows(tensors, cases[1]))


@pytest.mark.skipif(not CAN_STITCH, reason="file mappings at fixed addresses are Linux-only")
def test_rows_whose_pages_do_not_line_up_are_read_and_mismatches_refused(page_rows):
    path, tensors = page_rows
    with CheckpointReader(path) as reader:
        rows = [("c.odd", 2, 9), ("c.odd2", 0, 3), ("c.odd", 0, 1)]
        got = reader.map_rows(rows, torch.bfloat16)
        assert_same(got, torch.cat([tensors[k][a:b] for k, a, b in rows]))
        assert reader.bytes_mapped == 0 and reader.bytes_read == got.nbytes
        assert reader.map_rows([("a.q", 0, 2)], torch.bfloat16) is None  # not the file's dtype
        assert reader.map_rows([("a.q", 0, 2), ("c.odd", 0, 2)], torch.float32) is None  # other trailing dims
        assert reader.map_rows([("a.q", 0, 1)] * (MAX_PIECES + 1), torch.float32) is None
        with pytest.raises(CheckpointError, match=r"12 rows has no rows 10:13"):
            reader.map_rows([("a.q", 10, 13)], torch.float32)


@pytest.mark.skipif(not CAN_STITCH, reason="mapped copies need Linux mmap")
def test_a_file_cut_short_after_opening_is_an_error_not_a_crash(tmp_path):
    rows = reader_module.MAP_RUNS * 2
    save_state_dict({"w": random_tensor((rows, 16), torch.float32, 3)}, tmp_path / "ckpt")
    (file,) = (tmp_path / "ckpt").glob("*.safetensors")
    with CheckpointReader(tmp_path / "ckpt") as reader:
        os.truncate(file, file.stat().st_size - 64)
        with pytest.raises(
            CheckpointError,
            match=r"unexpected end of file before byte \d+ \(was the file changed after it was opened\?\)",
        ):
            reader.get_slice("w")[:, 3:9]
