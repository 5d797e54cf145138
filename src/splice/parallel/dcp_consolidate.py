"""``splice consolidate DCP_DIR OUT_DIR --config DIR``: a torch.distributed.checkpoint of a fused model -> the original.

A DCP directory (``dcp.save(model.state_dict(), checkpoint_id=DCP_DIR)`` under FSDP2, any world size or
mesh) holds the *runtime* layout in per-rank chunks. ``--config`` names a directory whose config.json
records the fusion (``splice.save_pretrained(model, DIR, save_original_format=False)`` writes one); the
model is built from it on the meta device and fused, which gives the exact runtime -> original map. Then
one fused tensor at a time is assembled from its chunks, mapped back and written, so memory stays near
one tensor, and the files are byte for byte what ``splice.save_pretrained`` writes for the same weights.
No process group, no GPU, offline.

DCP's ``.metadata`` is a pickle and its items are ``torch.save`` blobs, so both are read as hostile: the
pickle may name only DCP's metadata classes (anything else is refused, not imported), blobs load with
``weights_only=True``, every file name must be a plain name inside DCP_DIR, every offset and length must
lie inside its file, and the chunks of a tensor must tile it exactly.
"""

from __future__ import annotations

import io
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splice.checkpoint import CheckpointWriter
from splice.checkpoint.atomic import refuse_foreign_dir
from splice.errors import CheckpointError, WeightMapError
from splice.fusion.surgery import fuse, get_state
from splice.loading.distributed import num_parameters
from splice.loading.resolve import (
    CONFIG_KEY,
    build_on_meta,
    load_config,
    load_generation_config,
    pop_fusion_config,
    save_configs,
)
from splice.parallel.consolidate import ConsolidateReport
from splice.transforms import TensorMeta

METADATA_NAME = ".metadata"

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata dataclasses and nothing else: any other global is refused, never imported."""

    def __init__(self, file: Any, where: Path):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        allowed = name in _METADATA_CLASSES.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise CheckpointError(
                f"{self.where}: names {module}.{name}, which DCP metadata never holds; refusing to load it"
            )
        return super().find_class(module, name)


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: Path
    start: int
    length: int


@dataclass(frozen=True)
class _Tensor:
    meta: TensorMeta
    chunks: tuple[_Chunk, ...]


def is_dcp_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / METADATA_NAME).is_file()


def read_dcp(dcp_dir: str | os.PathLike) -> dict[str, _Tensor]:
    """The tensors of a DCP directory, each with its chunks' file, byte range and place; all checked."""
    dcp_dir = Path(dcp_dir)
    where = dcp_dir / METADATA_NAME
    if not where.is_file():
        raise CheckpointError(f"{dcp_dir}: no {METADATA_NAME}; not a torch.distributed.checkpoint directory")
    try:
        with open(where, "rb") as f:
            metadata = _MetadataUnpickler(f, where).load()
        entries = metadata.state_dict_metadata
        storage = {(index.fqn, tuple(index.offset)): info for index, info in metadata.storage_data.items()}
    except CheckpointError:
        raise
    except Exception as exc:  # a truncated or foreign pickle
        raise CheckpointError(
            f"{where}: not a readable DCP metadata file ({type(exc).__name__}: {exc})"
        ) from None
    sizes: dict[str, int] = {}
    out: dict[str, _Tensor] = {}
    for key, entry in entries.items():
        if not hasattr(entry, "chunks"):
            raise CheckpointError(
                f"{where}: {key} is not a tensor (only model state dicts can be consolidated)"
            )
        shape, dtype = tuple(int(d) for d in entry.size), entry.properties.dtype
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{where}: {key} has no dtype")
        chunks = []
        for chunk in entry.chunks:
            offsets, extent = tuple(int(o) for o in chunk.offsets), tuple(int(s) for s in chunk.sizes)
            if len(offsets) != len(shape) or any(
                o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, extent, shape)
            ):
                raise CheckpointError(f"{where}: {key} has a chunk at {offsets} of {extent} outside {shape}")
            info = storage.get((key, offsets))
            if info is None:
                raise CheckpointError(f"{where}: {key}'s chunk at {offsets} has no storage entry")
            chunks.append(_chunk(dcp_dir, where, key, offsets, extent, info, sizes))
        _check_tiling(where, key, shape, chunks)
        out[key] = _Tensor(TensorMeta(shape, dtype), tuple(chunks))
    return out


def _chunk(
    dcp_dir: Path, where: Path, key: str, offsets: tuple, extent: tuple, info: Any, sizes: dict[str, int]
) -> _Chunk:
    name = str(info.relative_path)
    if name in ("", ".", "..") or os.path.basename(name) != name or "\\" in name or name.startswith("."):
        raise CheckpointError(
            f"{where}: {key} names the file {name!r}, which is not a plain name in {dcp_dir}"
        )
    if getattr(info, "transform_descriptors", None):
        raise CheckpointError(
            f"{where}: {key} is stored transformed ({info.transform_descriptors}); not supported"
        )
    path = dcp_dir / name
    if name not in sizes:
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(
                f"{dcp_dir}: {name} is missing (it holds part of {key}); a shard was not copied?"
            )
        sizes[name] = path.stat().st_size
    start, length = int(info.offset), int(info.length)
    if start < 0 or length < 0 or start + length > sizes[name]:
        raise CheckpointError(
            f"{path}: {key} is said to lie at bytes [{start}, {start + length}) of a {sizes[name]}-byte file"
        )
    return _Chunk(offsets, extent, path, start, length)


def _check_tiling(where: Path, key: str, shape: tuple, chunks: list[_Chunk]) -> None:
    numel = 1
    for d in shape:
        numel *= d
    volume = sum(_volume(c.sizes) for c in chunks)
    overlapping = any(_overlap(a, b) for i, a in enumerate(chunks) for b in chunks[i + 1 :])
    if volume != numel or overlapping:
        raise CheckpointError(
            f"{where}: the chunks of {key} do not tile its shape {list(shape)} exactly "
            f"({volume} of {numel} elements{', overlapping' if overlapping else ''})"
        )


def _volume(sizes: tuple[int, ...]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def _overlap(a: _Chunk, b: _Chunk) -> bool:
    return all(
        oa < ob + sb and ob < oa + sa for oa, sa, ob, sb in zip(a.offsets, a.sizes, b.offsets, b.sizes)
    ) and bool(_volume(a.sizes) and _volume(b.sizes))


def assemble(key: str, tensor: _Tensor) -> torch.Tensor:
    """One whole tensor from its chunks."""
    out = torch.empty(tensor.meta.shape, dtype=tensor.meta.dtype)
    for chunk in tensor.chunks:
        with open(chunk.file, "rb") as f:
            f.seek(chunk.start)
            raw = f.read(chunk.length)
        try:
            piece = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        except Exception as exc:
            raise CheckpointError(
                f"{chunk.file}: bytes [{chunk.start}, {chunk.start + chunk.length}) are not a tensor "
                f"({type(exc).__name__}: {exc})"
            ) from None
        if (
            not isinstance(piece, torch.Tensor)
            or tuple(piece.shape) != chunk.sizes
            or piece.dtype != out.dtype
        ):
            found = (
                f"{tuple(piece.shape)} {piece.dtype}"
                if isinstance(piece, torch.Tensor)
                else type(piece).__name__
            )
            raise CheckpointError(
                f"{chunk.file}: {key}'s chunk at {chunk.offsets} should be {chunk.sizes} {out.dtype}, found {found}"
            )
        out[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))] = piece
    return out


# --------------------------------------------------------------------------------------------------
# the fused model, from its config


def fused_skeleton(config_dir: str | os.PathLike) -> Any:
    """The model of ``config_dir/config.json`` on the meta device, fused as its ``fusion_config`` says."""
    import transformers

    config_dir = Path(config_dir)
    config = load_config(transformers.AutoConfig, config_dir)
    fusion = pop_fusion_config(config)
    if not fusion:
        raise CheckpointError(
            f"{config_dir / 'config.json'}: records no {CONFIG_KEY}, so which tensors were fused is unknown; "
            "pass the directory splice.save_pretrained(model, DIR, save_original_format=False) wrote"
        )
    architectures = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    if model_cls is None:
        raise CheckpointError(
            f"{config_dir / 'config.json'}: architectures={architectures!r} names no transformers model class"
        )
    model = build_on_meta(model_cls, config)
    if (config_dir / "generation_config.json").is_file():
        load_generation_config(model, config_dir)
    fuse(model, fusion)
    return model


def consolidate_dcp(
    dcp_dir: str | os.PathLike, out_dir: str | os.PathLike, config_dir: str | os.PathLike
) -> ConsolidateReport:
    """Write the original checkpoint of the DCP checkpoint ``dcp_dir`` into ``out_dir`` (replaced atomically)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    started = time.perf_counter()
    dcp_dir, out = Path(dcp_dir), Path(out_dir)
    source, target = Path(os.path.realpath(dcp_dir)), Path(os.path.realpath(out))
    if target == source or source in target.parents or target in source.parents:
        raise CheckpointError(f"refusing to write {out}: it overlaps the DCP directory {dcp_dir}")
    refuse_foreign_dir(out, "OUT_DIR")
    tensors = read_dcp(dcp_dir)
    model = fused_skeleton(config_dir)
    state = get_state(model)
    expected = {k: tuple(t.shape) for k, t in model.state_dict(keep_vars=True).items()}
    found = {k: t.meta.shape for k, t in tensors.items()}
    if expected != found:
        missing = [k for k in expected if k not in found]
        extra = [k for k in found if k not in expected]
        shapes = [
            f"{k}: {found[k]} != {expected[k]}" for k in expected if k in found and found[k] != expected[k]
        ]
        raise CheckpointError(
            f"{dcp_dir} does not match the model of {config_dir}: "
            + "; ".join(
                f"{label} {items[:3]}"
                for label, items in (
                    ("missing", missing),
                    ("not in the model", extra),
                    ("shapes differ", shapes),
                )
                if items
            )
        )
    metas = {k: t.meta for k, t in tensors.items()}
    try:
        plan = state.weight_map().invert().compile(list(metas), metas)
    except WeightMapError as exc:
        raise CheckpointError(f"{dcp_dir} does not fit the fusion of {config_dir}: {exc}") from None
    produced = {k: m for step in plan.steps for k, m in zip(step.targets, step.target_metas)}
    order = {k: i for i, k in enumerate(state.original_keys)}
    ordered = sorted(produced, key=lambda k: order.get(k, len(order)))
    # what transformers' save drops (tied copies) and renames, found on stand-ins that share as the model's
    # tensors share: one storage per tied group (storage pointers are how transformers finds ties)
    runtime = model.state_dict(keep_vars=True)
    groups: dict[int, torch.Tensor] = {}
    stand_ins = {
        k: groups.setdefault(id(runtime[k]), torch.empty(1)) if k in runtime else torch.empty(1)
        for k in ordered
    }
    kept = revert_weight_conversion(model, remove_tied_weights_from_state_dict(dict(stand_ins), model))
    name_of = {id(t): k for k, t in reversed(stand_ins.items())}
    source_of: dict[str, str] = {}  # key in the file -> original key
    for key, tensor in kept.items():
        source_of[key] = key if stand_ins.get(key) is tensor else name_of.get(id(tensor), "")
        if not source_of[key]:
            raise CheckpointError(
                f"{config_dir}: transformers converts this model's weights on save; not supported"
            )
    file_metas = {k: produced[source] for k, source in source_of.items()}
    writes: dict[str, list[str]] = {}
    for key, source in source_of.items():
        writes.setdefault(source, []).append(key)
    with CheckpointWriter(
        out,
        file_metas,
        max_shard_size="50GB",
        metadata={"format": "pt"},
        index_metadata={"total_parameters": num_parameters(model)},
    ) as writer:
        save_configs(model, writer.staging_dir, file_metas)  # the original layout's: no fusion_config
        for key, tensor in plan.run(lambda k: assemble(k, tensors[k])):
            for name in writes.get(key, ()):
                writer.write(name, tensor.contiguous())
    return ConsolidateReport(
        out_dir=writer.out_dir,
        files=writer.filenames,
        tensors=len(file_metas),
        bytes_read=sum(c.length for t in tensors.values() for c in t.chunks),
        bytes_written=sum(m.nbytes for m in file_metas.values()),
        seconds=time.perf_counter() - started,
    )


def run(args: Any) -> int:
    """``splice consolidate DCP_DIR OUT_DIR --config DIR``."""
    if args.config is None:
        raise CheckpointError(
            f"{args.shards_dir} is a torch.distributed.checkpoint directory: pass --config DIR, a directory whose "
            "config.json records the fusion (splice.save_pretrained(model, DIR, save_original_format=False))"
        )
    report = consolidate_dcp(args.shards_dir, args.out_dir, args.config)
    print(
        f"{report.out_dir}: {report.tensors} tensors in {len(report.files)} file(s), "
        f"{report.bytes_written / 1e6:.1f} MB in {report.seconds:.2f} s"
    )
    return 0
