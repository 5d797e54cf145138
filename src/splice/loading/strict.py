"""Loading is strict: the one check of a compiled plan against the tensors the model expects.

A model key the plan gives no value is a `WeightsMismatchError` naming the key (never a random init),
and so is a value whose shape differs from the model's, naming both shapes and the checkpoint keys it
comes from. Keys the plan produces that the model has no place for are returned, for the caller to
warn about (transformers skips them too), except those transformers itself ignores.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from torch import nn

from splice.errors import WeightsMismatchError
from splice.transforms import TensorMeta
from splice.weightmap import CompiledMap, Step


def check_plan(
    plan: CompiledMap,
    expected: Mapping[str, TensorMeta],
    missing_ok: Collection[str],
    where: Any,
    what: str = "the checkpoint",
) -> list[str]:
    """Refuse ``plan`` if it misses a key of ``expected`` (other than ``missing_ok``) or gets a shape wrong.

    Returns the keys it produces that ``expected`` lacks. ``where`` (the checkpoint's path) and ``what``
    (what the plan reads: "the checkpoint", "the tensor-parallel plan") start the messages.
    """
    produced = plan.target_metas
    missing = [k for k in expected if k not in produced and k not in missing_ok]
    if missing:
        raise WeightsMismatchError(
            f"{where}: {what} has no weight for {len(missing)} model key(s): {few(missing)}; "
            "refusing to leave them randomly initialized"
        )
    for key, meta in produced.items():
        if key in expected and meta.shape != expected[key].shape:
            step = plan.step_for(key)
            raise WeightsMismatchError(
                f"{where}: {key} has shape {list(meta.shape)} in {what} (from {', '.join(step.sources)}) "
                f"but the model expects {list(expected[key].shape)}"
            )
    return [k for k in produced if k not in expected]


def needed_steps(plan: CompiledMap, expected: Mapping[str, TensorMeta]) -> list[Step]:
    """The plan's steps that give the model at least one of its tensors, in order."""
    return [s for s in plan.steps if any(t in expected for t in s.targets)]


def ignored_unexpected(model: nn.Module, key: str) -> bool:
    """A checkpoint key transformers skips silently (the model's ``_keys_to_ignore_on_load_unexpected``, ...)."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    patterns |= {r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"}
    return any(re.search(p, key) for p in patterns)


def meta_keys(model: nn.Module) -> set[str]:
    """The model's parameters and buffers that still hold no data."""
    keys = {k for k, p in model.named_parameters(remove_duplicate=False) if p.is_meta}
    return keys | {k for k, b in model.named_buffers(remove_duplicate=False) if b.is_meta}


def few(keys: list[str], n: int = 5) -> str:
    """The first ``n`` keys, and how many more there are."""
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")
