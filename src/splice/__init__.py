"""splice: fuse, split and shard modules of PyTorch / Transformers models, keeping checkpoints in their format.

The public API (see README.md and docs/):

    splice.fuse(model, {"qkv": True, "gate_up": True})      -> FusionReport
    splice.unfuse(model)
    splice.fuse_modules(model, [glob, glob, ...]) / splice.unfuse_modules(model)
    splice.original_state_dict(model)
    splice.from_pretrained(cls, path, fusion_config=..., **hf_kwargs)
    splice.save_pretrained(model, out_dir, save_original_format=True)
    splice.ModuleFusionSpec, splice.register_fusion
    splice.peft, splice.parallel, splice.kernels

Core needs only torch and safetensors; the Transformers, PEFT and parallel parts import lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

from splice.errors import (
    CheckpointError,
    FusionError,
    LoadError,
    SpliceError,
    TransformError,
    WeightMapError,
)
from splice.fusion import (
    FusionReport,
    ModuleFusionSpec,
    fuse,
    fuse_modules,
    register_fusion,
    unfuse,
    unfuse_modules,
)
from splice.weightmap import Rule, WeightMap

__version__ = "0.1.0"

_LAZY_FUNCTIONS = {
    "from_pretrained": "splice.hf",
    "save_pretrained": "splice.hf",
    "original_state_dict": "splice.parallel.view",  # fusion's, or under FSDP2 a sharded view
}
_LAZY_MODULES = {"peft", "parallel", "kernels", "checkpoint", "transforms", "modular", "hf"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(_LAZY_FUNCTIONS[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"splice.{name}")
    raise AttributeError(f"module 'splice' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "FusionError",
    "FusionReport",
    "LoadError",
    "ModuleFusionSpec",
    "Rule",
    "SpliceError",
    "TransformError",
    "WeightMap",
    "WeightMapError",
    "from_pretrained",
    "fuse",
    "fuse_modules",
    "original_state_dict",
    "register_fusion",
    "save_pretrained",
    "unfuse",
    "unfuse_modules",
]
