"""Reading ``splice-parallel.json`` back, and checking that it holds what `splice.parallel.save_shards` writes.

The document drives everything `splice consolidate` does, so a field of the wrong type (a hand edit, a
truncated copy, another tool's file) is refused here, by name, before any shard is opened::

    t/shards/splice-parallel.json: field world_size must be an int, got '4'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from splice.checkpoint import DTYPE_OF_TAG
from splice.errors import CheckpointError, WeightMapError
from splice.parallel.shards import FORMAT, METADATA_NAME
from splice.weightmap import WeightMap

__all__ = ["read_metadata", "check_metadata"]


def read_metadata(shards_dir: Path) -> dict[str, Any]:
    path = Path(shards_dir) / METADATA_NAME
    if not Path(shards_dir).is_dir():
        raise CheckpointError(f"{shards_dir}: no such directory")
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{shards_dir}: no {METADATA_NAME}; it is not a directory written by splice.parallel.save_shards"
        ) from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: unreadable: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: unreadable: JSON nested too deeply") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("version") != 1:
        raise CheckpointError(f"{path}: not a {FORMAT} version 1 document")
    for name in ("world_size", "files", "tensors", "weight_map"):
        if name not in document:
            raise CheckpointError(f"{path}: has no {name!r}")
    check_metadata(document, path)
    return document


def check_metadata(document: dict[str, Any], path: Path) -> None:
    """Raise a `CheckpointError` naming ``path`` and the field when a field consolidate reads is mistyped.

    The weight map is checked by parsing it (`WeightMap.from_dict` names the rule and field); the values
    are checked against the shard files when they are opened.
    """

    def refuse(name: str, expected: str, value: Any) -> CheckpointError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return CheckpointError(f"{path}: field {name} must be {expected}, got {shown}")

    world = document["world_size"]
    if not _is_int(world) or world < 1:
        raise refuse("world_size", "a positive int", world)
    files = document["files"]
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        raise refuse("files", "a list of file names", files)
    tensors = document["tensors"]
    if not isinstance(tensors, dict):
        raise refuse("tensors", "a dict of tensor entries", tensors)
    for key, entry in tensors.items():
        where = f"tensors[{key!r}]"
        if not isinstance(entry, dict) or not {"dtype", "shape", "dim", "bounds"} <= set(entry):
            raise refuse(where, "a dict with dtype, shape, dim and bounds", entry)
        if entry["dtype"] not in DTYPE_OF_TAG:
            raise refuse(f"{where}.dtype", f"one of {', '.join(sorted(DTYPE_OF_TAG))}", entry["dtype"])
        shape, dim, bounds = entry["shape"], entry["dim"], entry["bounds"]
        if not _is_sizes(shape):
            raise refuse(f"{where}.shape", "a list of non-negative ints", shape)
        if dim is None:
            if bounds is not None:
                raise refuse(f"{where}.bounds", "null when dim is null", bounds)
            continue
        if not _is_int(dim) or not 0 <= dim < len(shape):
            raise refuse(f"{where}.dim", f"null or an int in 0..{len(shape) - 1}", dim)
        if (
            not isinstance(bounds, list)
            or len(bounds) != world
            or not all(_is_sizes(b) and len(b) == 2 and b[0] <= b[1] <= shape[dim] for b in bounds)
        ):
            raise refuse(
                f"{where}.bounds", f"a list of {world} [start, stop] pairs within 0..{shape[dim]}", bounds
            )
    if not isinstance(document["weight_map"], (dict, list)):
        raise refuse("weight_map", "a weight map (a dict or a list of rules)", document["weight_map"])
    try:
        WeightMap.from_dict(document["weight_map"])
    except WeightMapError as exc:
        raise CheckpointError(f"{path}: field weight_map is malformed: {exc}") from None
    source = document.get("source")
    if source is None:
        return
    if not isinstance(source, dict):
        raise refuse("source", "a dict", source)
    source_files = source.get("files", [])
    if not isinstance(source_files, list):
        raise refuse("source.files", "a list of {name, keys, metadata} dicts", source_files)
    for n, entry in enumerate(source_files):
        if not isinstance(entry, dict) or not isinstance(entry.get("keys"), list):
            raise refuse(f"source.files[{n}]", "a dict with a list of keys", entry)
        if not all(isinstance(k, str) for k in entry["keys"]):
            raise refuse(f"source.files[{n}].keys", "a list of strings", entry["keys"])
        if not _is_str_dict(entry.get("metadata")):
            raise refuse(f"source.files[{n}].metadata", "null or a dict of strings", entry.get("metadata"))
    if not isinstance(source.get("tensors"), dict):
        raise refuse("source.tensors", "a dict of [dtype, shape] pairs", source.get("tensors"))
    if not isinstance(source.get("index_metadata") or {}, dict):
        raise refuse("source.index_metadata", "null or a dict", source.get("index_metadata"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sizes(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value)


def _is_str_dict(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and all(isinstance(v, str) for v in value.values()))
