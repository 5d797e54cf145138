"""`splice inspect PATH`: what each family would fuse in a model, without loading any weight.

The model is built on the meta device from ``config.json`` and fused there, so inspecting a 70B
checkpoint takes a second and no memory. With ``--save-map`` the resulting weight map (checkpoint
keys -> runtime keys, sizes resolved from the safetensors headers) is written as JSON, ready for
``splice convert``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from splice.errors import FusionError, LoadError
from splice.fusion import FusionReport, fuse, get_state, registered_families


def parse_fusion(text: str | None) -> Any:
    """``qkv,gate_up`` or a JSON fusion config (``{"qkv": {"modules": "layers\\\\.0\\\\."}}``)."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise FusionError(f"--fusion is not valid JSON: {exc}") from None
    return [name.strip() for name in text.split(",") if name.strip()]


def inspect_model(path: str | Path, fusion: Any = None) -> dict[str, FusionReport | str]:
    """Per family: the report of fusing a meta copy of the model, or the reason it does not apply."""
    import transformers

    from splice.loading.resolve import build_on_meta, load_config, model_class, pop_fusion_config

    path = Path(path)
    _read_config_json(path)
    try:
        config = load_config(transformers.AutoModel, path)
    except LoadError:
        raise
    except Exception as exc:  # transformers' reasons come as OSError, ValueError, KeyError, its own types
        raise LoadError(f"{path / 'config.json'}: {_reason(exc)}") from None
    stored = pop_fusion_config(config)
    cls = _architecture(config) or model_class(transformers.AutoModel, config)
    requested = fusion if fusion is not None else stored
    results: dict[str, FusionReport | str] = {}
    if requested is not None:
        model = build_on_meta(cls, config)
        results["requested"] = fuse(model, requested)
        return results
    for family in registered_families():
        model = build_on_meta(cls, config)
        try:
            results[family] = fuse(model, [family])
        except FusionError as exc:
            results[family] = str(exc).split(": ", 1)[-1]
    return results


def _read_config_json(path: Path) -> dict[str, Any]:
    """``config.json`` as a dict, or a `LoadError` naming the file (transformers' own message hides the JSON error)."""
    file = path / "config.json"
    try:
        config = json.loads(file.read_text())
    except OSError as exc:
        raise LoadError(f"{file}: cannot read it: {exc.strerror}") from None
    except ValueError as exc:  # a UnicodeDecodeError too
        raise LoadError(f"{file}: not valid JSON: {exc}") from None
    except RecursionError:
        raise LoadError(f"{file}: not valid JSON: nested too deeply") from None
    if not isinstance(config, dict):
        raise LoadError(f"{file}: must be a JSON object with a model_type, got a {type(config).__name__}")
    return config


def _reason(exc: BaseException) -> str:
    """The first paragraph of an exception's message on one line; a validator's wrapped error gives its own."""
    if exc.__cause__ is not None:  # huggingface_hub's StrictDataclassClassValidationError wraps the reason
        exc = exc.__cause__
    text = str(exc).strip().split("\n\n")[0] or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines())


def _architecture(config: Any) -> Any:
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return None


def run(args: argparse.Namespace) -> int:
    console = (
        Console() if sys.stdout.isatty() else Console(width=200)
    )  # piped output: one row per line, for grep
    path = Path(args.path)
    if not (path / "config.json").is_file():
        raise LoadError(f"{path}: no config.json (splice inspect reads a Transformers model directory)")
    fusion = parse_fusion(args.fusion)
    if args.save_map and not Path(args.save_map).parent.is_dir():
        # checked first, so that a typo does not cost the whole inspection
        raise LoadError(f"--save-map {args.save_map}: directory {Path(args.save_map).parent} does not exist")
    results = inspect_model(path, fusion)
    table = Table(title=f"splice inspect {path}", show_lines=False)
    for column in ("family", "modules", "where", "runtime parameters"):
        table.add_column(column, overflow="fold")
    for family, result in results.items():
        if isinstance(result, FusionReport):
            for name, count, where, keys in result.rows():
                table.add_row(name, str(count), where, keys)
        else:
            table.add_row(family, "0", "[dim]" + result + "[/dim]", "")
    console.print(table)
    if args.save_map:
        save_map(path, fusion, Path(args.save_map))
        console.print(
            f"weight map written to {args.save_map} (use it with: splice convert SRC DST --map {args.save_map})"
        )
    return 0


def save_map(path: Path, fusion: Any, out: Path) -> None:
    """Write the checkpoint -> fused WeightMap for this model, in the checkpoint's own key naming.

    The fused keys are named as ``save_pretrained(save_original_format=False)`` names them (transformers'
    reverse renames applied), so only the fused tensors appear in the map, with their sizes resolved.
    """
    import transformers

    from splice.checkpoint import CheckpointReader
    from splice.hf.load import prepare
    from splice.loading.request import LoadRequest
    from splice.weightmap import Rule, WeightMap

    prepared = prepare(
        LoadRequest(_architecture_of(path) or transformers.AutoModel, path, fusion_config=fusion or {})
    )
    if get_state(prepared.model) is None:
        raise FusionError("nothing to fuse: pass --fusion")
    with CheckpointReader(prepared.path) as reader:
        metas = reader.metas()
    plan = prepared.weight_map.compile(list(metas), metas)
    prepared.model._weight_conversions = [t for t in prepared.transforms if t.was_used()]
    rules = []
    for step in plan.steps:
        named = [_checkpoint_keys(prepared.model, k, m) for k, m in zip(step.targets, step.target_metas)]
        if [k for keys in named for k in keys] == list(step.sources):
            continue  # transformers' own conversion (a rename, per-expert tensors stacked): no change on disk
        if any(len(keys) != 1 for keys in named):
            raise FusionError(f"cannot express {step} in the checkpoint's key naming")
        targets = tuple(keys[0] for keys in named)
        if step.ops is None:
            raise FusionError(f"cannot express {step} as one rule")
        rules.append(Rule(step.sources, targets, step.ops))
    WeightMap.of(rules).generalize(list(metas), metas).save(out)


def _checkpoint_keys(model: Any, key: str, meta: Any) -> list[str]:
    """The checkpoint key(s) transformers' save gives a runtime tensor (several for stacked experts)."""
    from transformers.core_model_loading import revert_weight_conversion

    return list(revert_weight_conversion(model, {key: meta.empty("meta")}))


def _architecture_of(path: Path) -> Any:
    import transformers

    config = _read_config_json(path)
    for name in config.get("architectures") or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return None
