"""Which LoRA of one tree makes which LoRA of the other, as data (a `LoraMap`), and running it on tensors.

A LoRA map sends each target module (by path in the target tree) to its LoRA's spec and a *source*: where
its tensors come from in the other tree.

- `Same`: one module's LoRA, unchanged (only its path may differ: chain fusion moves modules).
- `Rows`: rows of a fused module's LoRA (a fused Linear's LoRA seen from one of its parts).
- `Stack`: the parts' LoRAs as one LoRA of their concatenation (split parts seen from the original
  fused Linear, or ``fuse_lora``).
- `Join`: LoRAs of parts that share one A, back into the fused LoRA they were taken from.

`map_to_original` is for saving (runtime -> original), `map_to_runtime` for loading (original ->
runtime); `materialize` runs one entry. `describe_stacks` writes what a save stacked or split into the
adapter file's metadata, so that loading it onto the same layout restores the same LoRAs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from splice.peft.addresses import AddressBook
from splice.peft.algebra import (
    LoraSpec,
    LoraWeights,
    deinterleave_rows,
    interleave_rows,
    join_rows,
    stack,
    stacked_spec,
    take_rows,
)
from splice.peft.errors import AdapterError


@dataclass(frozen=True)
class Same:
    """The LoRA of one module, unchanged."""

    path: str


@dataclass(frozen=True)
class Rows:
    """Rows ``rows`` of a fused module's LoRA: the same A (or its rank block ``cols``), those rows of B."""

    path: str
    rows: tuple[int, int]
    cols: tuple[int, int] | None = None
    groups: int = 1  # >1: the fused module's rows are its parts' blocks interleaved (rows count as if not)
    sizes: tuple[int, ...] = ()  # the parts' sizes, when groups > 1


@dataclass(frozen=True)
class Stack:
    """The parts' LoRAs (None: no LoRA) as one LoRA of their concatenation: A stacked, B block-diagonal."""

    paths: tuple[str | None, ...]
    sizes: tuple[int, ...]
    groups: int = 1  # >1: the whole lays the parts' rows out interleaved in this many groups


@dataclass(frozen=True)
class Join:
    """LoRAs of parts that share one A (as `Rows` makes them) as the one LoRA they came from."""

    paths: tuple[str, ...]


Source = Same | Rows | Stack | Join
LoraMap = dict[str, tuple[LoraSpec, Source]]


@dataclass(frozen=True)
class Block:
    """Where one original part's LoRA sits inside a stacked LoRA (``load_adapter(fuse_lora=True)`` records it)."""

    cols: tuple[int, int]
    spec: LoraSpec


# --------------------------------------------------------------------------------------------------
# saving: runtime -> original


def map_to_original(
    book: AddressBook, specs: Mapping[str, LoraSpec], blocks: Mapping[str, Mapping[str, Block]] | None = None
) -> LoraMap:
    """Runtime LoRAs (by runtime path) -> the LoRAs of the original model that behave the same (by name)."""
    blocks = blocks or {}
    lora_map: LoraMap = {}
    parts: dict[str, dict[int, str]] = {}

    def put(name: str, spec: LoraSpec, source: Source) -> None:
        if name in lora_map:
            raise AdapterError(
                f"two LoRAs of one adapter land on {name}; the original model has one weight there"
            )
        lora_map[name] = (spec, source)

    for path, spec in specs.items():
        address = book.by_runtime[path]
        if not address.derived:
            put(address.name, spec, Same(path))
        elif address.kind == "fused":
            layout = blocks.get(path)
            for index, member in enumerate(address.members):
                rows = _rows(address.sizes, index)
                if layout is None:
                    put(member, spec, Rows(path, rows))
                elif member in layout:
                    put(member, layout[member].spec, Rows(path, rows, layout[member].cols))
        else:  # a part of a split: gather the parts of each whole
            parts.setdefault(address.group, {})[address.index] = path
    for whole_name, present in parts.items():
        whole = book.by_name[whole_name]
        paths = tuple(present.get(i) for i in range(len(whole.members)))
        where = (
            f"LoRAs on the parts of {whole_name} ({', '.join(book.by_runtime[p].name for p in paths if p)})"
        )
        spec = stacked_spec([specs[p] for p in paths if p is not None], where=where)
        put(whole_name, spec, Stack(paths, whole.sizes, whole.groups))
    return lora_map


# --------------------------------------------------------------------------------------------------
# loading: original -> runtime


def map_to_runtime(
    book: AddressBook,
    specs: Mapping[str, LoraSpec],
    weights: Mapping[str, LoraWeights | None],
    metadata: Mapping[str, Any],
    *,
    fuse_lora: bool,
) -> tuple[LoraMap, dict[str, dict[str, Block]]]:
    """Original LoRAs (by name) -> runtime LoRAs (by runtime path), plus the stacked layouts it creates.

    ``weights`` holds each module's factors (None for LoRAs that are not plain A/B, e.g. embeddings);
    they decide whether the layouts recorded in ``metadata`` by `describe_stacks` can be restored.
    """
    lora_map: LoraMap = {}
    blocks: dict[str, dict[str, Block]] = {}
    done: set[str] = set()
    rslora = next(iter(specs.values())).rslora if specs else False

    stacked = {} if fuse_lora else metadata.get("stacked", {})  # fuse_lora keeps one LoRA per fused Linear
    for whole_name, parts in stacked.items():  # split parts saved as one stacked LoRA: restore them
        restored = _restore_parts(book, whole_name, parts, weights, rslora)
        if restored is not None:
            lora_map.update(restored)
            done.add(whole_name)
    for fused_name, members in metadata.get("shared", {}).items():  # a fused LoRA saved as rows per part
        fused = book.by_name.get(fused_name)
        if fused is None or fused.kind != "fused" or list(fused.members) != list(members):
            continue
        if any(m in done or weights.get(m) is None or specs[m] != specs[members[0]] for m in members):
            continue
        if join_rows([weights[m] for m in members], where=fused_name) is not None:
            lora_map[fused.runtime] = (specs[members[0]], Join(tuple(members)))
            done.update(members)
    if fuse_lora:
        for fused in [a for a in book.addresses if a.kind == "fused"]:
            present = [m for m in fused.members if m in specs and m not in done]
            if not present:
                continue
            for member in present:
                if weights.get(member) is None:
                    raise AdapterError(
                        f"fuse_lora: the LoRA of {member} is not a plain A/B pair, so it cannot be stacked"
                    )
            spec = stacked_spec(
                [specs[m] for m in present], where=f"fuse_lora on {fused.name} ({', '.join(present)})"
            )
            lora_map[fused.runtime] = (
                spec,
                Stack(tuple(m if m in present else None for m in fused.members), fused.sizes),
            )
            col, layout = 0, {}
            for member in present:
                layout[member] = Block((col, col + specs[member].r), specs[member])
                col += specs[member].r
            blocks[fused.runtime] = layout
            done.update(present)
    for name, spec in specs.items():
        if name not in done:
            lora_map[book.named(name).runtime] = (spec, Same(name))
    return lora_map, blocks


def _restore_parts(
    book: AddressBook,
    whole_name: str,
    parts: list[dict[str, Any]],
    weights: Mapping[str, LoraWeights | None],
    rslora: bool,
) -> LoraMap | None:
    whole = book.by_name.get(whole_name)
    if whole is None or whole.kind != "concat" or weights.get(whole_name) is None:
        return None
    lora_map: LoraMap = {}
    whole_weights = weights[whole_name]
    if whole.groups > 1:  # rows are counted with the parts back to back
        whole_weights = deinterleave_rows(whole_weights, whole.sizes, whole.groups)
    for part in parts:
        address = book.by_name.get(part["part"])
        if address is None or address.group != whole_name or list(address.rows) != list(part["rows"]):
            return None
        try:
            take_rows(whole_weights, tuple(part["rows"]), tuple(part["cols"]), where=whole_name)
        except AdapterError:
            return None  # trained past block-diagonal: keep the whole LoRA (exact either way)
        spec = LoraSpec(int(part["r"]), part["alpha"], rslora)
        rows = Rows(whole_name, tuple(part["rows"]), tuple(part["cols"]), whole.groups, whole.sizes)
        lora_map[address.runtime] = (spec, rows)
    return lora_map


# --------------------------------------------------------------------------------------------------
# running a LoRA map


def materialize(
    spec: LoraSpec, source: Source, get: Callable[[str], LoraWeights], *, where: str
) -> tuple[LoraWeights, list[tuple[int, int] | None]]:
    """The tensors of one mapped LoRA (and, for a stack, each part's rank columns)."""
    if isinstance(source, Same):
        return get(source.path), []
    if isinstance(source, Rows):
        whole = get(source.path)
        if source.groups > 1:
            whole = deinterleave_rows(whole, source.sizes, source.groups)
        return take_rows(whole, source.rows, source.cols, where=where), []
    if isinstance(source, Stack):
        parts = [None if p is None else get(p) for p in source.paths]
        stacked, cols = stack(parts, source.sizes, spec)
        if source.groups > 1:
            stacked = interleave_rows(stacked, source.sizes, source.groups)
        return stacked, cols
    joined = join_rows([get(p) for p in source.paths], where=where)
    if joined is None:
        raise AdapterError(f"{where}: the LoRAs of {', '.join(source.paths)} do not share one A")
    return joined, []


def describe_stacks(
    lora_map: LoraMap,
    book: AddressBook,
    specs: Mapping[str, LoraSpec],
    stacked_cols: Mapping[str, list[tuple[int, int] | None]],
) -> dict[str, Any]:
    """What a save stacked or split (``specs``: the runtime LoRAs), by original names, for the file's metadata."""
    stacked: dict[str, list[dict[str, Any]]] = {}
    shared: dict[str, list[str]] = {}
    for name, (_, source) in lora_map.items():
        if isinstance(source, Stack):
            row, entries = 0, []
            for path, size, cols in zip(source.paths, source.sizes, stacked_cols[name]):
                if path is not None:
                    part = specs[path]
                    entries.append(
                        {
                            "part": book.by_runtime[path].name,
                            "rows": [row, row + size],
                            "cols": list(cols),
                            "r": part.r,
                            "alpha": part.alpha,
                        }
                    )
                row += size
            stacked[name] = entries
        elif isinstance(source, Rows) and source.cols is None:
            shared.setdefault(book.by_runtime[source.path].name, []).append(name)
    return {k: v for k, v in (("stacked", stacked), ("shared", shared)) if v}


def _rows(sizes: tuple[int, ...], index: int) -> tuple[int, int]:
    start = sum(sizes[:index])
    return start, start + sizes[index]
