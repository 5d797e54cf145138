"""The safetensors file format: dtype tags, a validating header parser, and a byte-exact header encoder.

A safetensors file is::

    [8 bytes: N, u64 little-endian] [N bytes: UTF-8 JSON header, space-padded] [data section]

The header maps each tensor name to ``{"dtype": TAG, "shape": [...], "data_offsets": [begin, end]}``
(offsets relative to the data section) plus an optional ``"__metadata__"`` object of string → string.
The data section is exactly the concatenation of the tensors' bytes: no gaps, no overlaps, nothing after.

The encoder reproduces safetensors' own serializer (``safetensors.torch.save_file``, checked against 0.8.0):

1. tensors are ordered by dtype, largest alignment first, using the declaration order of the Rust
   ``Dtype`` enum (``SERIALIZE_ORDER`` below, reversed), then by name (byte order of the UTF-8 string);
2. data offsets are assigned in that order, back to back from 0;
3. the header is compact JSON (``","`` and ``":"`` separators, non-ASCII written raw, control characters
   escaped as ``\\u00xx``), ``"__metadata__"`` first when given, then the tensors in data order, each as
   ``{"dtype":…,"shape":[…],"data_offsets":[b,e]}``;
4. the header is padded with spaces to a multiple of 8 bytes and N counts the padding.

safetensors writes ``__metadata__`` entries in Rust ``HashMap`` order, which is randomized per call, so
with two or more metadata entries its output is not reproducible even against itself. We write them in
the caller's order; the file then equals safetensors' up to that permutation (same length, same bytes
elsewhere), and a file that we read and write back keeps its original order.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from splice.errors import CheckpointError
from splice.tensors import TensorMeta

MAX_HEADER_SIZE = 100_000_000
"""Largest header accepted, in bytes; safetensors refuses larger ones too."""

METADATA_KEY = "__metadata__"

# Every safetensors tag whose element is a whole number of bytes, with its torch dtype name. Tags this torch
# build lacks are dropped below.
_TAG_TO_TORCH_NAME = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
}

DTYPE_OF_TAG: dict[str, torch.dtype] = {
    tag: getattr(torch, name) for tag, name in _TAG_TO_TORCH_NAME.items() if hasattr(torch, name)
}
TAG_OF_DTYPE: dict[torch.dtype, str] = {dtype: tag for tag, dtype in DTYPE_OF_TAG.items()}

# Tags safetensors knows whose elements are smaller than a byte. Their shapes count sub-byte elements while
# torch packs them (float4_e2m1fn_x2 holds two per element), so a byte-addressed reader cannot serve them.
_SUB_BYTE_TAGS = frozenset({"F4", "F6_E2M3", "F6_E3M2"})

SERIALIZE_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
    "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)  # fmt: skip
"""The Rust ``safetensors::Dtype`` enum in declaration order; the serializer sorts by it, descending."""
_RANK = {tag: rank for rank, tag in enumerate(SERIALIZE_ORDER)}


def tag_of(dtype: torch.dtype, where: str) -> str:
    """The safetensors tag of a torch dtype, or an error naming ``where`` and the dtypes that can be stored."""
    try:
        return TAG_OF_DTYPE[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in TAG_OF_DTYPE)
        raise CheckpointError(
            f"{where}: dtype {dtype} cannot be stored in safetensors; supported: {supported}"
        ) from None


def check_little_endian() -> None:
    if sys.byteorder != "little":
        raise CheckpointError(
            "safetensors data is little-endian and splice.checkpoint reads and writes it in place; "
            f"this host is {sys.byteorder}-endian"
        )


def describe(meta: TensorMeta) -> str:
    """``shape (2, 3) and dtype torch.float32``: how error messages show a TensorMeta."""
    return f"shape {tuple(meta.shape)} and dtype {meta.dtype}"


# ----------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live inside a file."""

    name: str
    meta: TensorMeta
    start: int
    """Absolute byte offset of the first element in the file."""

    @property
    def nbytes(self) -> int:
        return self.meta.nbytes


@dataclass(frozen=True)
class Header:
    """A parsed and validated safetensors header."""

    entries: dict[str, TensorEntry]
    """In data order (the order safetensors writes them), ties between empty tensors in header order."""
    metadata: dict[str, str] | None
    data_start: int
    """8 + N: the absolute offset of the data section."""


class _DuplicateKey(Exception):
    pass


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def load_json_object(raw: bytes, where: str, what: str) -> dict:
    """Decode UTF-8 JSON that must be an object, rejecting duplicate keys (``json`` would keep the last)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: {what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as e:
        raise CheckpointError(f"{where}: {what} has the key {e.args[0]!r} more than once") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: {what} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where}: {what} must be a JSON object, found {type(doc).__name__}")
    return doc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_header(header: bytes, file_size: int, where: str) -> Header:
    """Validate the JSON ``header`` of a file of ``file_size`` bytes named ``where`` (used in every message)."""
    doc = load_json_object(header, where, "the header")
    data_start = 8 + len(header)
    data_size = file_size - data_start

    metadata = doc.pop(METADATA_KEY, None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(
                f"{where}: {METADATA_KEY} must be an object of string values, found {json.dumps(metadata)[:200]}"
            )

    located = [_parse_entry(name, info, data_start, where) for name, info in doc.items()]
    # Data order. The sort is stable, so empty tensors sharing an offset keep their header order, and an
    # empty tensor sorts before a non-empty one that starts where it does.
    located.sort(key=lambda item: (item[0], item[1]))
    cursor, previous = 0, None
    for begin, end, entry in located:
        if begin > cursor:
            after = f"after tensor {previous!r} ends at {cursor}" if previous else "at the start of the data"
            raise CheckpointError(
                f"{where}: data offsets are not contiguous: tensor {entry.name!r} starts at {begin}, "
                f"leaving {begin - cursor} unaccounted bytes {after}"
            )
        if begin < cursor:
            raise CheckpointError(
                f"{where}: data offsets overlap: tensor {entry.name!r} [{begin}, {end}) starts before "
                f"tensor {previous!r} ends at {cursor}"
            )
        cursor, previous = end, entry.name
        if end > data_size:
            raise CheckpointError(
                f"{where}: truncated: tensor {entry.name!r} data ends at byte {data_start + end} of the file "
                f"(data_offsets [{begin}, {end}] after a {data_start}-byte header) but the file has {file_size} bytes"
            )
    if cursor < data_size:
        raise CheckpointError(
            f"{where}: {data_size - cursor} bytes after the end of the last tensor's data "
            f"(expected the file to end at byte {data_start + cursor}, it has {file_size} bytes)"
        )
    return Header(
        entries={entry.name: entry for _b, _e, entry in located}, metadata=metadata, data_start=data_start
    )


def _parse_entry(name: str, info: object, data_start: int, where: str) -> tuple[int, int, TensorEntry]:
    here = f"{where}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(
            f"{here}: expected an object with dtype, shape and data_offsets, found {info!r}"
        )
    missing = [field for field in ("dtype", "shape", "data_offsets") if field not in info]
    if missing:
        raise CheckpointError(f"{here}: header entry lacks {', '.join(missing)} (found {sorted(info)})")
    tag, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(tag, str) or tag not in DTYPE_OF_TAG:
        if tag in _SUB_BYTE_TAGS:
            raise CheckpointError(
                f"{here} has the sub-byte dtype tag {tag!r}, which splice.checkpoint cannot read"
            )
        raise CheckpointError(f"{here} has dtype tag {tag!r}, expected one of {', '.join(DTYPE_OF_TAG)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{here} has shape {shape!r}, expected a list of non-negative integers")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
    ) or (offsets[1] < offsets[0]):
        raise CheckpointError(
            f"{here} has data_offsets {offsets!r}, expected [begin, end] with 0 <= begin <= end"
        )
    meta = TensorMeta(tuple(shape), DTYPE_OF_TAG[tag])
    begin, end = offsets
    if end - begin != meta.nbytes:
        raise CheckpointError(
            f"{here} has data_offsets [{begin}, {end}] spanning {end - begin} bytes, but shape {shape} "
            f"of {tag} needs {meta.numel} x {meta.dtype.itemsize} = {meta.nbytes} bytes"
        )
    return begin, end, TensorEntry(name, meta, data_start + begin)


def header_length(length_prefix: bytes, file_size: int, where: str) -> int:
    """Validate the 8-byte length prefix against the file size and return N."""
    if len(length_prefix) < 8 or file_size < 8:
        raise CheckpointError(
            f"{where}: file is {file_size} bytes, too short for the 8-byte header length of a safetensors file"
        )
    # The length is the file's first 8 bytes: a file that is not safetensors (a name in a hostile index
    # pointing at /etc/passwd) would have them printed as a number, so the messages never show it.
    n = int.from_bytes(length_prefix, "little")
    if n > MAX_HEADER_SIZE:
        raise CheckpointError(
            f"{where}: not a safetensors file: its first 8 bytes do not hold a header length of at most "
            f"{MAX_HEADER_SIZE} bytes (the file is corrupt or in another format)"
        )
    if n > file_size - 8:
        raise CheckpointError(
            f"{where}: truncated or not safetensors: its header length is more than the {file_size - 8} "
            "bytes that follow the 8-byte length prefix"
        )
    return n


# ----------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class FileLayout:
    """Everything about a safetensors file that is known before any tensor data exists."""

    prefix: bytes
    """The first bytes of the file: the 8-byte length and the padded JSON header."""
    starts: dict[str, int]
    """Absolute byte offset of each tensor's data, in data order."""
    size: int
    """Total file size in bytes."""


def check_metadata(metadata: Mapping[str, str] | None, where: str) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{where}: metadata must map strings to strings, found {metadata!r}")
    return dict(metadata)


def encode_layout(
    tensors: Iterable[tuple[str, TensorMeta]], metadata: Mapping[str, str] | None
) -> FileLayout:
    """The header and data layout safetensors' serializer produces for ``tensors`` (rules in the module doc)."""
    tagged = [(name, meta, tag_of(meta.dtype, f"tensor {name!r}")) for name, meta in tensors]
    tagged.sort(key=lambda item: (-_RANK[item[2]], item[0]))

    doc: dict[str, object] = {}
    if metadata is not None:
        doc[METADATA_KEY] = dict(metadata)
    offsets: dict[str, int] = {}
    cursor = 0
    for name, meta, tag in tagged:
        if name == METADATA_KEY:
            raise CheckpointError(
                f"tensor name {METADATA_KEY!r} is reserved for the safetensors header metadata"
            )
        doc[name] = {"dtype": tag, "shape": list(meta.shape), "data_offsets": [cursor, cursor + meta.nbytes]}
        offsets[name] = cursor
        cursor += meta.nbytes
    header = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)
    data_start = 8 + len(header)
    return FileLayout(
        prefix=len(header).to_bytes(8, "little") + header,
        starts={name: data_start + offset for name, offset in offsets.items()},
        size=data_start + cursor,
    )
