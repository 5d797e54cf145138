"""splice.checkpoint: byte-exact safetensors writing, lazy validated reading, atomic replacement."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import splice.checkpoint.atomic as atomic
import splice.checkpoint.reader as reader_module
from splice.checkpoint import (
    TAG_OF_DTYPE,
    CheckpointReader,
    CheckpointWriter,
    load_state_dict,
    parse_size,
    plan_shards,
    save_state_dict,
)
from splice.checkpoint import _io as checkpoint_io
from splice.checkpoint.format import SERIALIZE_ORDER
from splice.checkpoint.writer import shard_filenames
from splice.errors import CheckpointError
from splice.transforms import TensorMeta, bitwise_equal

DTYPES = list(TAG_OF_DTYPE)  # every dtype this torch build and safetensors share
COMMON = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int64, torch.bool, torch.uint8]
FILE_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------ helpers


def as_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    # A fresh copy: .contiguous() may keep a size-1 dimension's odd stride, which .view() refuses.
    dense = torch.empty(t.shape, dtype=t.dtype).copy_(t)
    return dense.reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape))
    assert as_bytes(a) == as_bytes(b)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bytes of every kind (NaNs and subnormals included); bools are 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    nbytes = TensorMeta(tuple(shape), dtype).nbytes
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        raw &= 1
    return raw.view(dtype).reshape(shape)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(
        p.name for p in parent.iterdir() if atomic.STAGING_MARKER in p.name or atomic.ASIDE_MARKER in p.name
    )


def safetensors_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A hand-made safetensors file, possibly malformed."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + raw + data)
    return path


names = st.text(alphabet="abcxyz._019éＺ😀", min_size=1, max_size=6).filter(lambda s: s != "__metadata__")
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@st.composite
def state_dicts(draw, dtypes=DTYPES, max_size=6):
    keys = draw(st.lists(names, max_size=max_size, unique=True))
    return {
        key: random_tensor(draw(shapes), draw(st.sampled_from(dtypes)), draw(st.integers(0, 2**31)))
        for key in keys
    }


metadata_values = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8)
metadatas = st.none() | st.dictionaries(metadata_values, metadata_values, max_size=3)


# ------------------------------------------------------------------------------- byte identity (writing)


def split_header(raw: bytes) -> tuple[bytes, dict, list, bytes]:
    """(length prefix, __metadata__, tensor entries in header order, everything after the header)."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n], object_pairs_hook=list)  # keeps the order of every object
    metadata = dict(next((v for k, v in header if k == "__metadata__"), []))
    entries = [(k, dict(v)) for k, v in header if k != "__metadata__"]
    return raw[:8], metadata, entries, raw[8 + n :]


@FILE_SETTINGS
@given(state_dict=state_dicts(), metadata=metadatas)
def test_written_file_is_byte_identical_to_safetensors_save_file(state_dict, metadata):
    # safetensors 0.8.0 writes invalid JSON ('{},"__metadata__":{}}') for no tensors with empty metadata.
    assume(state_dict or metadata != {})
    with tempfile.TemporaryDirectory() as tmp:
        ours = save_state_dict(state_dict, Path(tmp, "ours"), metadata=metadata) / "model.safetensors"
        theirs = Path(tmp, "theirs.safetensors")
        safetensors.torch.save_file(state_dict, theirs, metadata=metadata)
        ours_raw, theirs_raw = ours.read_bytes(), theirs.read_bytes()
    if metadata is None or len(metadata) <= 1:
        assert ours_raw == theirs_raw
    else:
        # safetensors writes __metadata__ in Rust HashMap order, randomized per call; ours keeps the
        # caller's order. Everything else, including the length and the padding, is identical.
        assert len(ours_raw) == len(theirs_raw)
        ours_parts, theirs_parts = split_header(ours_raw), split_header(theirs_raw)
        assert ours_parts[1] == theirs_parts[1] == metadata
        assert list(ours_parts[1]) == list(metadata)
        assert (ours_parts[0], ours_parts[2], ours_parts[3]) == (
            theirs_parts[0],
            theirs_parts[2],
            theirs_parts[3],
        )


def test_every_dtype_is_ordered_as_safetensors_orders_it(tmp_path):
    # Same-named tensors would tie; distinct names in reverse alphabetical order make the dtype rank decide.
    state_dict = {f"t{99 - i}": random_tensor((3,), dtype, i) for i, dtype in enumerate(DTYPES)}
    save_state_dict(state_dict, tmp_path / "ours", metadata=None)
    safetensors.torch.save_file(state_dict, tmp_path / "theirs.safetensors")
    assert (tmp_path / "ours/model.safetensors").read_bytes() == (
        tmp_path / "theirs.safetensors"
    ).read_bytes()
    _, _, entries, _ = split_header((tmp_path / "theirs.safetensors").read_bytes())
    ranks = [SERIALIZE_ORDER.index(info["dtype"]) for _, info in entries]
    assert ranks == sorted(ranks, reverse=True)


def test_no_tensors_with_empty_metadata_writes_valid_json(tmp_path):
    save_state_dict({}, tmp_path / "out", metadata={})
    raw = (tmp_path / "out/model.safetensors").read_bytes()
    assert raw == b"\x18\x00\x00\x00\x00\x00\x00\x00" + b'{"__metadata__":{}}     '
    assert safetensors.torch.load_file(tmp_path / "out/model.safetensors") == {}


def test_concurrent_writes_from_threads_give_the_same_file(tmp_path):
    state_dict = {f"w{i}": random_tensor((64, 33), COMMON[i % len(COMMON)], i) for i in range(24)}
    metas = {k: TensorMeta.of(v) for k, v in state_dict.items()}
    with CheckpointWriter(tmp_path / "out", metas) as writer:
        threads = [
            threading.Thread(target=lambda ks: [writer.write(k, state_dict[k]) for k in ks], args=(keys,))
            for keys in (list(metas)[0::2], list(metas)[1::2][::-1])
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    safetensors.torch.save_file(state_dict, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "out/model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_writer_accepts_non_contiguous_and_conjugate_views(tmp_path):
    base = random_tensor((6, 8), torch.float32, 0)
    complex_base = torch.randn(3, 2, dtype=torch.complex64)
    state_dict = {"t": base.t(), "sliced": base[:, 2:5], "odd": base[:1, 2], "conj": complex_base.conj()}
    assert state_dict["odd"].is_contiguous() and state_dict["odd"].stride() == (8,)
    save_state_dict(state_dict, tmp_path / "out")
    for key, tensor in load_state_dict(tmp_path / "out").items():
        assert_same(tensor, state_dict[key].resolve_conj().contiguous())


# ------------------------------------------------------------------------------------ sharding and index


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 60), max_size=12), limit=st.integers(0, 100))
def test_plan_shards_splits_as_huggingface_hub_does(sizes, limit):
    from huggingface_hub import split_torch_state_dict_into_shards

    # On the meta device, so that huggingface_hub does not take the empty tensors for shared storage.
    state_dict = {
        f"k{i}": torch.empty(size, dtype=torch.uint8, device="meta") for i, size in enumerate(sizes)
    }
    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern="model{suffix}.safetensors", max_shard_size=limit
    )
    plan = plan_shards({k: TensorMeta.of(v) for k, v in state_dict.items()}, limit)
    assert [name for name in split.filename_to_tensors] == shard_filenames("model.safetensors", len(plan))[
        : len(plan)
    ]
    assert list(split.filename_to_tensors.values()) == plan


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("1.5MB", 1_500_000),
        ("120kb", 120_000),
        ("2KiB", 2048),
        ("3 MiB", 3 * 2**20),
        (7, 7),
        ("10", 10),
    ],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5XB", "GB", "-1", -1, "1.2.3MB", None, True])
def test_parse_size_rejects_garbage(size):
    with pytest.raises(CheckpointError, match="size"):
        parse_size(size)


@FILE_SETTINGS
@given(state_dict=state_dicts(dtypes=COMMON, max_size=8), limit=st.integers(0, 120))
def test_round_trip_through_writer_and_reader(state_dict, limit):
    with tempfile.TemporaryDirectory() as tmp:
        out = save_state_dict(state_dict, Path(tmp, "ckpt"), max_shard_size=limit)
        plan = plan_shards({k: TensorMeta.of(v) for k, v in state_dict.items()}, limit) or [[]]
        files = sorted(p.name for p in out.iterdir())
        with CheckpointReader(out) as reader:
            assert len(reader) == len(state_dict) and set(reader) == set(state_dict)
            assert [p.name for p in reader.files] == shard_filenames("model.safetensors", len(plan))
            if len(plan) > 1:
                assert files == sorted([*(p.name for p in reader.files), "model.safetensors.index.json"])
                assert reader.keys() == sorted(state_dict)  # index order, which is sorted
                assert reader.index_metadata == {"total_size": sum(t.nbytes for t in state_dict.values())}
            else:
                assert files == ["model.safetensors"]
            for shard_index, keys in enumerate(plan):
                for key in keys:
                    assert (
                        reader.file_of(key).name
                        == shard_filenames("model.safetensors", len(plan))[shard_index]
                    )
            for key, tensor in state_dict.items():
                assert reader.meta(key) == TensorMeta.of(tensor)
                assert_same(reader.get(key), tensor)
            assert reader.bytes_read == sum(t.nbytes for t in state_dict.values())
        assert all(as_bytes(a) == as_bytes(state_dict[k]) for k, a in load_state_dict(out).items())


def test_custom_weights_name_and_per_file_metadata(tmp_path):
    state_dict = {f"w{i}": random_tensor((10,), torch.float32, i) for i in range(3)}
    save_state_dict(
        state_dict,
        tmp_path / "a",
        max_shard_size=40,
        weights_name="adapter_model.safetensors",
        metadata={"format": "pt", "note": "é"},
    )
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter_model-00001-of-00003.safetensors",
        "adapter_model-00002-of-00003.safetensors",
        "adapter_model-00003-of-00003.safetensors",
        "adapter_model.safetensors.index.json",
    ]
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        CheckpointReader(tmp_path / "a")
    with CheckpointReader(tmp_path / "a", weights_name="adapter_model.safetensors") as reader:
        assert reader.metadata == {"format": "pt", "note": "é"}
        assert reader.file_metadata("adapter_model-00002-of-00003.safetensors") == {
            "format": "pt",
            "note": "é",
        }
        assert reader.file_metadata(reader.files[2]) == {"format": "pt", "note": "é"}
        with pytest.raises(CheckpointError, match="not one of its files"):
            reader.file_metadata("model.safetensors")
    with CheckpointReader(tmp_path / "a/adapter_model.safetensors.index.json") as reader:
        assert reader.keys() == ["w0", "w1", "w2"]
    with CheckpointReader(tmp_path / "a/adapter_model-00002-of-00003.safetensors") as reader:
        assert reader.keys() == ["w1"] and reader.index_metadata == {}


# --------------------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    root = tmp_path_factory.mktemp("llama")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="60KB")
    return model, root


def test_reads_checkpoints_saved_by_transformers(llama):
    model, root = llama
    expected = model.state_dict()
    for form, files in (("single", 1), ("sharded", 3)):
        with CheckpointReader(root / form) as reader:
            assert len(reader.files) == files
            assert set(reader.keys()) == set(expected)
            assert reader.metadata == {"format": "pt"}
            for key, tensor in expected.items():
                assert reader.meta(key) == TensorMeta.of(tensor)
                assert_same(reader.get(key), tensor)
    with CheckpointReader(root / "sharded") as reader:
        assert reader.index_metadata == {
            "total_parameters": model.num_parameters(),
            "total_size": sum(t.nbytes for t in expected.values()),
        }


def test_writes_what_transformers_save_pretrained_writes(llama, tmp_path):
    model, root = llama
    for form, limit in (("single", "5GB"), ("sharded", "60KB")):
        save_state_dict(
            model.state_dict(), tmp_path / form, max_shard_size=limit,
            index_metadata={"total_parameters": model.num_parameters()},
        )  # fmt: skip
        ours = tree_bytes(tmp_path / form)
        theirs = {name: data for name, data in tree_bytes(root / form).items() if "safetensors" in name}
        assert ours == theirs
    assert len(ours) == 4  # three shards and the index


# ----------------------------------------------------------------------------------- slices and read_into


@st.composite
def indexed_tensors(draw):
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=4)))
    items: list = []
    for size in shape:
        if size and draw(st.booleans()):
            items.append(draw(st.integers(-size, size - 1)))
        else:
            bound = st.none() | st.integers(-size - 2, size + 2)
            items.append(slice(draw(bound), draw(bound), draw(st.sampled_from([None, 1]))))
    if draw(st.booleans()):  # leave out trailing dimensions
        items = items[: draw(st.integers(0, len(items)))]
    elif draw(st.booleans()):  # ... in place of zero or more dimensions
        start = draw(st.integers(0, len(items)))
        stop = draw(st.integers(start, len(items)))
        items[start:stop] = [Ellipsis]
    index = items[0] if len(items) == 1 and draw(st.booleans()) else tuple(items)
    dtype = draw(st.sampled_from(COMMON))
    return random_tensor(shape, dtype, draw(st.integers(0, 2**31))), index


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slices")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=indexed_tensors())
def test_get_slice_and_read_into_match_torch_indexing_and_read_only_the_selection(case, slice_dir):
    full, index = case
    expected = full[index]
    path = slice_dir / "t.safetensors"
    safetensors.torch.save_file({"x": full, "pad": torch.arange(5, dtype=torch.float64)}, path)
    with CheckpointReader(path) as reader:
        handle = reader.get_slice("x")
        assert (handle.shape, handle.dtype, handle.get_shape(), handle.get_dtype()) == (
            tuple(full.shape), full.dtype, list(full.shape), TAG_OF_DTYPE[full.dtype],
        )  # fmt: skip
        got = handle[index]
        assert_same(got, expected)
        assert reader.bytes_read == expected.nbytes

        out = torch.empty_like(expected)
        assert reader.read_into("x", out, index) is out
        assert_same(out, expected)
        assert reader.bytes_read == 2 * expected.nbytes

        # A view into a bigger buffer (a fused destination): filled in place, the rest untouched.
        if expected.ndim:
            sentinel = random_tensor((*expected.shape[:-1], expected.shape[-1] + 3), expected.dtype, 1)
            buffer = sentinel.clone()
            reader.read_into("x", buffer[..., 1 : 1 + expected.shape[-1]], index)
            assert_same(buffer[..., 1 : 1 + expected.shape[-1]], expected)
            assert_same(buffer[..., :1], sentinel[..., :1])
            assert_same(buffer[..., 1 + expected.shape[-1] :], sentinel[..., 1 + expected.shape[-1] :])
            assert reader.bytes_read == 3 * expected.nbytes


class ReadCounter:
    """Counts the read system calls (preadv) the reader issues and the buffers they fill."""

    def __init__(self, monkeypatch):
        self.calls: list[int] = []
        original = checkpoint_io.RandomAccessFile._readv

        def counting(file, buffers, offset):
            self.calls.append(len(buffers))
            return original(file, buffers, offset)

        monkeypatch.setattr(checkpoint_io.RandomAccessFile, "_readv", counting)


def test_reads_are_coalesced_into_as_few_system_calls_as_the_layout_allows(tmp_path, monkeypatch):
    weight = random_tensor((300, 8, 16), torch.bfloat16, 0)
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"w": weight}, path)
    monkeypatch.setattr(
        reader_module, "MAP_RUNS", 10**9
    )  # positional reads only (the mapped copy: test_checkpoint_strided)
    with CheckpointReader(path) as reader:
        counter = ReadCounter(monkeypatch)

        rows = reader.get_slice("w")[100:250]  # a TP rank's rows: one read
        assert_same(rows, weight[100:250])
        assert counter.calls == [1] and reader.bytes_read == rows.nbytes

        counter.calls.clear()
        row = reader.get_slice("w")[7, 2:5]  # an int then a range: still one run
        assert_same(row, weight[7, 2:5]) and counter.calls == [1]

        counter.calls.clear()
        columns = reader.get_slice("w")[:, 4:6]  # one run per row, 192-byte gaps: read through, one call
        assert_same(columns, weight[:, 4:6])
        assert counter.calls == [300 + 299]  # the runs and the gaps between them, one buffer each
        assert reader.bytes_discarded == 299 * 6 * 16 * 2

        # Whole rows of the file into a strided destination: one preadv scatters each file run.
        counter.calls.clear()
        fused = torch.zeros(300, 8, 48, dtype=torch.bfloat16)
        reader.read_into("w", fused[:, :, 16:32])
        assert_same(fused[:, :, 16:32], weight)
        iov_max = checkpoint_io.IOV_MAX
        assert counter.calls == [min(iov_max, 2400 - i) for i in range(0, 2400, iov_max)]
        assert reader.bytes_read == rows.nbytes + row.nbytes + columns.nbytes + weight.nbytes


def test_reads_and_writes_without_positional_io(tmp_path, monkeypatch):
    # The seek-under-a-lock fallback used where os.preadv / os.pwrite do not exist.
    monkeypatch.setattr(checkpoint_io, "HAVE_POSITIONAL_IO", False)
    state_dict = {"a": random_tensor((5, 7), torch.float16, 0), "b": random_tensor((3,), torch.int64, 1)}
    save_state_dict(state_dict, tmp_path / "out")
    safetensors.torch.save_file(state_dict, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "out/model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with CheckpointReader(tmp_path / "out") as reader:
        assert_same(reader.get_slice("a")[1:4, 2:6], state_dict["a"][1:4, 2:6])
        fused = torch.zeros(5, 9, dtype=torch.float16)
        reader.read_into("a", fused[:, 1:8])
        assert_same(fused[:, 1:8], state_dict["a"])


@pytest.mark.parametrize(
    ("index", "out", "message"),
    [
        ((slice(0, 4, 2),), None, "has step 2; only step 1"),
        ((0, 0, 0), None, "too many indices for a tensor of shape \\(4, 6\\)"),
        ((4,), None, "index 4 is out of range for dimension 0 of size 4"),
        ((slice(None), -7), None, "index -7 is out of range for dimension 1 of size 6"),
        ((Ellipsis, Ellipsis), None, "only one ellipsis"),
        ((None,), None, "None \\(a new axis\\)"),
        ((True,), None, "boolean index"),
        ((torch.tensor([0, 1]),), None, "advanced indexing"),
        (("a",), None, "cannot index dimension 0 with 'a'"),
        (None, torch.empty(4, 6, dtype=torch.float64), "expected shape \\(4, 6\\) and dtype torch.float32, found shape \\(4, 6\\) and dtype torch.float64"),
        ((slice(0, 2),), torch.empty(2, 5), "out must match the selection .*expected shape \\(2, 6\\)"),
        (None, torch.empty(6, 4).t(), "not C-ordered or overlaps"),
        (None, torch.empty(1, 6).expand(4, 6), "not C-ordered or overlaps"),
        (None, torch.empty(4, 6, device="meta"), "dense CPU tensor"),
        (None, [[0.0] * 6] * 4, "must be a torch.Tensor"),
    ],
)  # fmt: skip
def test_bad_indices_and_destinations_are_refused_by_name(tmp_path, index, out, message):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"layer.w": torch.zeros(4, 6)}, path)
    with CheckpointReader(path) as reader:
        with pytest.raises(CheckpointError, match=message) as info:
            if out is None:
                reader.get_slice("layer.w")[index]
            else:
                reader.read_into("layer.w", out, index)
        assert "w.safetensors: tensor 'layer.w'" in str(info.value)
        assert reader.bytes_read == 0


def test_zero_dim_and_empty_tensors(tmp_path):
    state_dict = {
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4, dtype=torch.int8),
        "n": torch.tensor(7),
    }
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(state_dict, path)
    with CheckpointReader(path) as reader:
        assert_same(reader.get("scalar"), state_dict["scalar"])
        assert_same(reader.get_slice("scalar")[...], state_dict["scalar"])
        assert_same(reader.get_slice("scalar")[()], state_dict["scalar"])
        assert_same(reader.get_slice("empty")[:, 1:3], state_dict["empty"][:, 1:3])
        out = torch.empty((), dtype=torch.int64)
        reader.read_into("n", out)
        assert out.item() == 7
        assert reader.bytes_read == 3 * 4 + 0 + 8
        with pytest.raises(TypeError):
            len(reader.get_slice("scalar"))
        assert len(reader.get_slice("empty")) == 0


# --------------------------------------------------------------------------------------- reader errors


def good_header(**entries) -> dict:
    return {
        name: {"dtype": "F32", "shape": [2], "data_offsets": offsets} for name, offsets in entries.items()
    }


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        (b"", b"", 3, "file is 8 bytes, too short|header length is more than the 0 bytes that follow"),
        (good_header(a=[0, 8]), b"\0" * 8, 10**6, "truncated or not safetensors: its header length is more than the [0-9]+ bytes that follow"),
        (good_header(a=[0, 8]), b"\0" * 8, 2 * 10**8, "not a safetensors file: its first 8 bytes do not hold a header length of at most 100000000"),
        (good_header(a=[0, 8], b=[8, 16]), b"\0" * 12, None, "truncated: tensor 'b' data ends at byte .* but the file has"),
        (good_header(a=[0, 8]), b"\0" * 9, None, "1 bytes after the end of the last tensor's data"),
        (b'{"a": {"dtype": "F32",', b"", None, "the header is not valid JSON"),
        (b'{"a": "\xff\xfe"}', b"", None, "the header is not valid UTF-8"),
        (b"[1, 2]", b"", None, "the header must be a JSON object, found list"),
        (b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": 1}', b"", None, "has the key 'a' more than once"),
        ({"model.layers.3.mlp.up_proj.weight": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None,
         "tensor 'model.layers.3.mlp.up_proj.weight' has dtype tag 'F33', expected one of F64, F32, F16, BF16, "),
        ({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0", None, "sub-byte dtype tag 'F4'"),
        ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 8]}}, b"\0" * 8, None,
         "tensor 'a' has data_offsets \\[0, 8\\] spanning 8 bytes, but shape \\[2, 3\\] of F32 needs 6 x 4 = 24 bytes"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "has shape \\[-2\\], expected a list of non-negative"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "expected \\[begin, end\\] with 0 <= begin <= end"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"", None, "header entry lacks data_offsets"),
        (good_header(a=[0, 8], b=[4, 12]), b"\0" * 12, None, "data offsets overlap: tensor 'b' \\[4, 12\\) starts before tensor 'a' ends at 8"),
        (good_header(a=[0, 8], b=[12, 20]), b"\0" * 20, None, "not contiguous: tensor 'b' starts at 12, leaving 4 unaccounted bytes after tensor 'a'"),
        (good_header(a=[4, 12]), b"\0" * 12, None, "not contiguous: tensor 'a' starts at 4, leaving 4 unaccounted bytes at the start"),
        ({"__metadata__": {"format": 1}}, b"", None, "__metadata__ must be an object of string values"),
    ],
)  # fmt: skip
def test_corrupt_files_are_refused_with_the_file_and_what_was_expected(
    tmp_path, header, data, length, message
):
    path = safetensors_file(tmp_path / "model-00002-of-00003.safetensors", header, data, length)
    with pytest.raises(CheckpointError, match=message) as info:
        CheckpointReader(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("content", [b"", b"\x01\x02"])
def test_file_shorter_than_the_length_prefix(tmp_path, content):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(content)
    with pytest.raises(
        CheckpointError, match=f"{path}: file is {len(content)} bytes, too short for the 8-byte header length"
    ):
        CheckpointReader(path)


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'}: no such file or directory"):
        CheckpointReader(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no such file"):
        CheckpointReader(tmp_path / "nope.safetensors.index.json")
    (tmp_path / "d").mkdir()
    (tmp_path / "d/other.safetensors").write_bytes(b"")
    with pytest.raises(
        CheckpointError,
        match="neither model.safetensors nor model.safetensors.index.json; it holds other.safetensors",
    ):
        CheckpointReader(tmp_path / "d")


@pytest.fixture
def sharded(tmp_path):
    state_dict = {
        f"model.layers.{i}.mlp.up_proj.weight": random_tensor((4, 2), torch.float32, i) for i in range(6)
    }
    out = save_state_dict(state_dict, tmp_path / "ckpt", max_shard_size=64)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    return out, index


def write_index(out: Path, index: dict) -> None:
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


def test_index_pointing_to_a_missing_shard(sharded):
    out, index = sharded
    (out / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        CheckpointError,
        match="shard model-00002-of-00003.safetensors is missing .* 2 tensors map to it, e.g. 'model.layers.2.mlp.up_proj.weight'",
    ):
        CheckpointReader(out)


def test_index_key_absent_from_its_shard(sharded):
    out, index = sharded
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00003-of-00003.safetensors"
    write_index(out, index)
    with pytest.raises(
        CheckpointError,
        match="maps tensor 'model.layers.9.mlp.up_proj.weight' to model-00003-of-00003.safetensors, but that file has no such tensor .*did you mean",
    ) as info:
        CheckpointReader(out)
    assert str(info.value).startswith(str(out / "model.safetensors.index.json"))


def test_shard_key_absent_from_the_index(sharded):
    out, index = sharded
    del index["weight_map"]["model.layers.3.mlp.up_proj.weight"]
    write_index(out, index)
    with pytest.raises(
        CheckpointError,
        match="model-00002-of-00003.safetensors: holds tensor 'model.layers.3.mlp.up_proj.weight', which the index model.safetensors.index.json does not list",
    ):
        CheckpointReader(out)


def test_key_duplicated_across_shards(sharded, tmp_path):
    out, index = sharded
    # Rewrite shard 3 so that it also holds a key of shard 1.
    shard3 = out / "model-00003-of-00003.safetensors"
    with CheckpointReader(shard3) as reader:
        tensors = {key: reader.get(key) for key in reader.keys()}
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(4, 2)
    safetensors.torch.save_file(tensors, shard3, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match="model-00003-of-00003.safetensors: holds tensor 'model.layers.0.mlp.up_proj.weight', which the index model.safetensors.index.json maps to model-00001-of-00003.safetensors; the key is duplicated across shards",
    ):
        CheckpointReader(out)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"metadata": {}}', 'expected a "weight_map" object .* found no weight_map'),
        ('{"weight_map": []}', 'expected a "weight_map" object .* found list'),
        ('{"weight_map": {"a": 3}}', "the shard file of tensor 'a' 3 must be a non-empty string"),
        (
            '{"weight_map": {"a": "/etc/x.safetensors"}}',
            r"'/etc/x.safetensors' is refused \(an absolute path\)",
        ),
        ('{"weight_map": {}, "metadata": []}', '"metadata" must be an object'),
        ('{"weight_map": {"a": "x", "a": "y"}}', "the index has the key 'a' more than once"),
        ("{oops", "the index is not valid JSON"),
    ],
)
def test_malformed_index(tmp_path, text, message):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=message) as info:
        CheckpointReader(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "model.safetensors.index.json"))


def test_reader_lookup_errors_and_lifecycle(sharded):
    out, _ = sharded
    reader = CheckpointReader(out)
    assert "model.layers.1.mlp.up_proj.weight" in reader and "nope" not in reader
    assert repr(reader) == f"CheckpointReader({str(out)!r}, 6 tensors in 3 files)"
    with pytest.raises(
        CheckpointError,
        match="no tensor 'model.layers.1.mlp.up_proj.weigth' among its 6 tensors; did you mean 'model.layers.1.mlp.up_proj.weight'",
    ):
        reader.get("model.layers.1.mlp.up_proj.weigth")
    reader.close()
    with pytest.raises(CheckpointError, match="reader is closed"):
        reader.get("model.layers.1.mlp.up_proj.weight")


def test_file_truncated_after_opening(tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(100)}, path)
    with CheckpointReader(path) as reader:
        os.truncate(path, path.stat().st_size - 10)
        with pytest.raises(CheckpointError, match="unexpected end of file at byte"):
            reader.get("a")


# --------------------------------------------------------------------------------------- writer errors


@pytest.fixture
def writer(tmp_path):
    metas = {
        "model.layers.0.self_attn.q_proj.weight": TensorMeta((4, 3), torch.bfloat16),
        "model.layers.0.self_attn.k_proj.weight": TensorMeta((2, 3), torch.bfloat16),
        "model.norm.weight": TensorMeta((3,), torch.float32),
    }
    w = CheckpointWriter(tmp_path / "out", metas)
    yield w
    w.abort()


def test_writer_refuses_wrong_shape_dtype_and_unknown_keys(writer, tmp_path):
    q = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(
        CheckpointError,
        match=f"tensor '{q}' was declared with shape \\(4, 3\\) and dtype torch.bfloat16, but the tensor written has shape \\(3, 4\\) and dtype torch.bfloat16",
    ):
        writer.write(q, torch.zeros(3, 4, dtype=torch.bfloat16))
    with pytest.raises(
        CheckpointError,
        match="declared with shape \\(4, 3\\) and dtype torch.bfloat16, but the tensor written has shape \\(4, 3\\) and dtype torch.float16",
    ):
        writer.write(q, torch.zeros(4, 3, dtype=torch.float16))
    with pytest.raises(
        CheckpointError,
        match="tensor 'model.layers.0.self_attn.v_proj.weight' was not declared .*did you mean",
    ):
        writer.write("model.layers.0.self_attn.v_proj.weight", torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match="must be a torch.Tensor, found list"):
        writer.write(q, [[0.0] * 3] * 4)
    with pytest.raises(CheckpointError, match="is on the meta device and has no data"):
        writer.write(q, torch.empty(4, 3, dtype=torch.bfloat16, device="meta"))
    writer.write(q, torch.zeros(4, 3, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match=f"tensor '{q}' is written twice"):
        writer.write(q, torch.zeros(4, 3, dtype=torch.bfloat16))
    assert str(tmp_path / "out") in repr(writer) and "1/3 tensors written" in repr(writer)


def test_unfinished_write_names_the_missing_keys_and_can_be_completed(writer, tmp_path):
    writer.write("model.norm.weight", torch.ones(3))
    with pytest.raises(
        CheckpointError,
        match="2 of 3 declared tensors were never written: 'model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.k_proj.weight'",
    ):
        writer.commit()
    assert not (tmp_path / "out").exists()
    writer.write("model.layers.0.self_attn.q_proj.weight", torch.ones(4, 3, dtype=torch.bfloat16))
    writer.write("model.layers.0.self_attn.k_proj.weight", torch.ones(2, 3, dtype=torch.bfloat16))
    assert writer.commit() == tmp_path / "out"
    assert load_state_dict(tmp_path / "out").keys() == writer.weight_map.keys()
    with pytest.raises(CheckpointError, match="the writer is committed"):
        writer.write("model.norm.weight", torch.ones(3))
    assert leftovers(tmp_path) == []


def test_unfinished_with_block_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="1 of 2 declared tensors were never written: 'b'"):
        with CheckpointWriter(
            tmp_path / "out", {"a": TensorMeta((1,), torch.int8), "b": TensorMeta((), torch.int8)}
        ) as w:
            w.write("a", torch.zeros(1, dtype=torch.int8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("metas", "kwargs", "message"),
    [
        ({"a": TensorMeta((2,), torch.complex128)}, {}, "tensor 'a': dtype torch.complex128 cannot be stored in safetensors; supported: float64"),
        ({"__metadata__": TensorMeta((2,), torch.float32)}, {}, "tensor name '__metadata__' is reserved"),
        ({"a": (2,)}, {}, "metas must map tensor names to TensorMeta"),
        ({"a": TensorMeta((2, -1), torch.float32)}, {}, "tensor 'a' has shape \\(2, -1\\), expected non-negative"),
        ({}, {"metadata": {"format": 1}}, "metadata must map strings to strings"),
        ({}, {"max_shard_size": "5 parsecs"}, "is not a number followed by one of"),
    ],
)  # fmt: skip
def test_writer_refuses_bad_declarations(tmp_path, metas, kwargs, message):
    with pytest.raises(CheckpointError, match=message):
        CheckpointWriter(tmp_path / "out", metas, **kwargs)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- atomicity


class Boom(Exception):
    pass


def interrupted_save(out: Path, state_dict: dict, after: int, **kwargs) -> None:
    metas = {k: TensorMeta.of(v) for k, v in state_dict.items()}
    with pytest.raises(Boom):
        with CheckpointWriter(out, metas, **kwargs) as writer:
            (writer.staging_dir / "config.json").write_text("{}")
            for i, key in enumerate(reversed(list(metas))):
                if i == after:
                    raise Boom
                writer.write(key, state_dict[key])


NEW = {f"new.{i}": random_tensor((50, 3), torch.float32, i) for i in range(6)}


@pytest.mark.parametrize("after", [0, 3])
def test_exception_mid_write_leaves_an_absent_out_dir_absent(tmp_path, after):
    interrupted_save(tmp_path / "out", NEW, after, max_shard_size=1000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_exception_mid_write_leaves_an_existing_checkpoint_unchanged(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_renameat2_function", None)
    old = {"old.w": random_tensor((7, 5), torch.bfloat16, 9)}
    save_state_dict(old, tmp_path / "out")
    (tmp_path / "out/config.json").write_text('{"old": true}')
    before = tree_bytes(tmp_path / "out")
    interrupted_save(tmp_path / "out", NEW, 4, max_shard_size=1000)
    assert tree_bytes(tmp_path / "out") == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_commit_replaces_the_whole_directory(tmp_path, monkeypatch, exchange):
    if exchange and atomic._renameat2_function is None:
        pytest.skip("renameat2 is not available")
    calls = []
    real = atomic.renameat2
    monkeypatch.setattr(atomic, "renameat2", lambda *a: calls.append(a[2]) or (exchange and real(*a)))
    save_state_dict({"old": torch.zeros(3)}, tmp_path / "out")
    (tmp_path / "out/stale.json").write_text("{}")
    metas = {k: TensorMeta.of(v) for k, v in NEW.items()}
    with CheckpointWriter(tmp_path / "out", metas, max_shard_size=1000) as writer:
        for key in metas:
            writer.write(key, NEW[key])
        (writer.staging_dir / "config.json").write_text('{"new": true}')
    assert calls == [atomic._RENAME_NOREPLACE, atomic._RENAME_EXCHANGE]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", *shard_filenames("model.safetensors", 6), "model.safetensors.index.json",
    ]  # fmt: skip
    assert (tmp_path / "out/config.json").read_text() == '{"new": true}'
    assert all(as_bytes(v) == as_bytes(NEW[k]) for k, v in load_state_dict(tmp_path / "out").items())
    assert leftovers(tmp_path) == []


def test_new_directory_gets_normal_permissions_and_symlinks_are_followed(tmp_path):
    (tmp_path / "reference").mkdir()
    save_state_dict({"a": torch.zeros(1)}, tmp_path / "real")
    assert (tmp_path / "real").stat().st_mode == (tmp_path / "reference").stat().st_mode
    os.chmod(tmp_path / "real", 0o750)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    save_state_dict({"b": torch.ones(2)}, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert list(load_state_dict(tmp_path / "real")) == ["b"]
    assert (tmp_path / "real").stat().st_mode & 0o7777 == 0o750


def test_out_dir_that_is_a_file_is_not_replaced(tmp_path):
    (tmp_path / "out").write_text("precious")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        save_state_dict({"a": torch.zeros(1)}, tmp_path / "out")
    assert (tmp_path / "out").read_text() == "precious"
    assert leftovers(tmp_path) == []


def test_dropped_writer_removes_its_staging_dir(tmp_path):
    writer = CheckpointWriter(tmp_path / "out", {"a": TensorMeta((1,), torch.float32)})
    staging = writer.staging_dir
    assert staging.name.startswith(".out.splice-tmp-") and staging.is_dir()
    del writer
    import gc

    gc.collect()
    assert not staging.exists() and list(tmp_path.iterdir()) == []


KILLED_SAVE = """
import sys, time, torch
from splice.checkpoint import CheckpointWriter
from splice.transforms import TensorMeta
metas = {f"w{i}": TensorMeta((256, 256), torch.float32) for i in range(8)}
with CheckpointWriter(sys.argv[1], metas, max_shard_size=600_000) as writer:
    for i, key in enumerate(metas):
        if i == 5:
            print("ready", flush=True)
            time.sleep(60)
        writer.write(key, torch.full((256, 256), float(i)))
"""


def test_sigkill_mid_save_leaves_the_old_checkpoint_intact(tmp_path):
    old = {"old.w": random_tensor((33, 5), torch.float16, 3)}
    save_state_dict(old, tmp_path / "out")
    before = tree_bytes(tmp_path / "out")
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_SAVE), str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout.readline().strip() == "ready"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert tree_bytes(tmp_path / "out") == before
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".out.splice-tmp-")
    # The stale staging dir is inert: a later save succeeds and leaves it alone.
    save_state_dict(NEW, tmp_path / "out")
    assert load_state_dict(tmp_path / "out").keys() == NEW.keys()
    assert leftovers(tmp_path) == stale


def test_failed_swap_restores_the_old_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_renameat2_function", None)
    save_state_dict({"old": torch.zeros(3)}, tmp_path / "out")
    before = tree_bytes(tmp_path / "out")
    real_rename, calls = os.rename, []

    def rename(source, target):
        calls.append((Path(source).name, Path(target).name))
        if len(calls) == 2:  # the old checkpoint is aside; moving the new one in fails
            raise OSError(28, "No space left on device")
        real_rename(source, target)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(
        CheckpointError, match="could not move the new checkpoint into place: .*No space left"
    ):
        save_state_dict(NEW, tmp_path / "out")
    assert calls[0][1].startswith(".out.splice-old-") and calls[2] == (calls[0][1], "out")
    assert tree_bytes(tmp_path / "out") == before
    assert leftovers(tmp_path) == []


def test_crash_between_the_two_fallback_renames_is_reported_by_the_reader(tmp_path):
    save_state_dict({"old": torch.zeros(3)}, tmp_path / "out")
    os.rename(tmp_path / "out", tmp_path / ".out.splice-old-0123abcd")  # where the crash would leave it
    with pytest.raises(
        CheckpointError, match="interrupted save left the previous checkpoint at .*splice-old-0123abcd"
    ):
        CheckpointReader(tmp_path / "out")


def test_io_failures_become_checkpoint_errors(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="cannot create a staging directory beside it"):
        save_state_dict({"a": torch.zeros(1)}, tmp_path / "file/out")
    with pytest.raises(
        CheckpointError, match="weights_name must be a file name ending in .safetensors, found 'sub/x.bin'"
    ):
        save_state_dict({"a": torch.zeros(1)}, tmp_path / "out", weights_name="sub/x.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_declared_shapes_may_be_lists(tmp_path):
    with CheckpointWriter(tmp_path / "out", {"a": TensorMeta([2, 3], torch.float32)}) as writer:
        writer.write("a", torch.ones(2, 3))
    with CheckpointReader(tmp_path / "out") as reader:
        assert reader.meta("a") == TensorMeta((2, 3), torch.float32)


def test_integer_like_indices(tmp_path):
    import numpy as np

    weight = random_tensor((4, 5, 6), torch.float32, 0)
    safetensors.torch.save_file({"w": weight}, tmp_path / "w.safetensors")
    with CheckpointReader(tmp_path / "w.safetensors") as reader:
        assert_same(reader.get_slice("w")[np.int64(1), torch.tensor(-2), 1:3], weight[1, -2, 1:3])
        assert_same(reader.get_slice("w")[..., np.int32(5)], weight[..., 5])


def test_writer_explicit_shard_plan(tmp_path):
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(5)}
    metas = {k: TensorMeta.of(v) for k, v in tensors.items()}
    with CheckpointWriter(tmp_path / "out", metas, shards=[["t3", "t0"], ["t1", "t2", "t4"]]) as writer:
        for k, v in tensors.items():
            writer.write(k, v)
    reader = CheckpointReader(tmp_path / "out")
    assert [reader.file_of(k).name for k in ("t0", "t3", "t1")] == [
        "model-00001-of-00002.safetensors",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    for plan, message in [
        ([["t0", "t1"], ["t1", "t2", "t3", "t4"]], r"listed twice: \['t1'\]"),
        ([["t0", "t1", "t2", "t3"]], r"in no shard: \['t4'\]"),
        ([["t0", "t1", "t2", "t3", "t4", "t9"]], r"undeclared: \['t9'\]"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            CheckpointWriter(tmp_path / "bad", metas, shards=plan)
    assert not (tmp_path / "bad").exists()


def test_map_is_a_zero_copy_private_view(tmp_path):
    tensors = {
        "a": torch.randn(64, 33),
        "b": torch.arange(10, dtype=torch.int64),
        "c": torch.randn(7).to(torch.bfloat16),
    }
    save_state_dict(tensors, tmp_path / "ck")
    original = (tmp_path / "ck" / "model.safetensors").read_bytes()
    reader = CheckpointReader(tmp_path / "ck")
    mapped = {k: reader.map(k) for k in tensors}
    assert reader.bytes_read == 0 and reader.bytes_mapped == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    reader.close()
    for key, tensor in tensors.items():
        assert torch.equal(mapped[key], tensor) and mapped[key].dtype == tensor.dtype  # valid after close()
    mapped["a"].mul_(2)  # copy-on-write: the file never changes
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == original


def test_map_adjacent_concatenates_back_to_back_tensors_without_a_copy(tmp_path):
    # stored in this order: gate, up and v back to back
    tensors = {
        "gate": torch.randn(5, 12),
        "up": torch.randn(7, 12),
        "v": torch.randn(3, 12),
        "w": torch.randn(3, 8),
        "x": torch.randn(2, 12).to(torch.bfloat16),
    }
    save_state_dict(tensors, tmp_path / "ck")
    original = (tmp_path / "ck" / "model.safetensors").read_bytes()
    with CheckpointReader(tmp_path / "ck") as reader:
        fused = reader.map_adjacent(["gate", "up", "v"])
        assert reader.bytes_read == 0 and reader.bytes_mapped == (5 + 7 + 3) * 12 * 4
        assert bitwise_equal(fused, torch.cat([tensors["gate"], tensors["up"], tensors["v"]]))
        assert reader.map_adjacent(["up", "gate"]) is None  # out of file order
        assert reader.map_adjacent(["gate", "v"]) is None  # not back to back
        assert reader.map_adjacent(["v", "w"]) is None  # trailing dims differ
    fused.add_(1.0)  # copy-on-write, as with map()
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == original
