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

Core needs only torch and safetensors. Every name above is imported on first use (PEP 562), so
``import splice`` itself loads neither torch nor transformers and ``splice modular`` starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from splice.errors import (
    CheckpointError,
    FusionError,
    LoadError,
    MetaDeviceError,
    SaveError,
    SpliceError,
    TransformError,
    WeightMapError,
    WeightsMismatchError,
)

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from splice import checkpoint, hf, kernels, modular, parallel, peft, transforms  # noqa: F401
    from splice.fusion import (  # noqa: F401
        FusionReport,
        ModuleFusionSpec,
        fuse,
        register_fusion,
        unfuse,
        unfuse_modules,
    )
    from splice.hf import from_pretrained, save_pretrained  # noqa: F401
    from splice.kernels import fuse_modules  # noqa: F401
    from splice.parallel.view import original_state_dict  # noqa: F401
    from splice.weightmap import Rule, WeightMap  # noqa: F401

__version__ = "0.1.0"

# PEP 562: the names that need torch (or transformers) import it on first use, so that `splice modular`
# and other torch-free paths start in a fraction of a second. Each name resolves once, then is cached.
_LAZY_NAMES = {
    "FusionReport": "splice.fusion",
    "ModuleFusionSpec": "splice.fusion",
    "fuse": "splice.fusion",
    "fuse_modules": "splice.kernels",  # fusion's, plus kernel= (a kernel registered by name)
    "original_state_dict": "splice.parallel.view",  # fusion's, or under FSDP2/TP a sharded view
    "register_fusion": "splice.fusion",
    "unfuse": "splice.fusion",
    "unfuse_modules": "splice.fusion",
    "Rule": "splice.weightmap",
    "WeightMap": "splice.weightmap",
    "from_pretrained": "splice.hf",
    "save_pretrained": "splice.hf",
}
_LAZY_MODULES = {"peft", "parallel", "kernels", "checkpoint", "transforms", "modular", "hf"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(f"splice.{name}")
    else:
        raise AttributeError(f"module 'splice' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES, *_LAZY_MODULES})


__all__ = [
    "CheckpointError",
    "FusionError",
    "FusionReport",
    "LoadError",
    "MetaDeviceError",
    "ModuleFusionSpec",
    "Rule",
    "SaveError",
    "SpliceError",
    "TransformError",
    "WeightMap",
    "WeightMapError",
    "WeightsMismatchError",
    "from_pretrained",
    "fuse",
    "fuse_modules",
    "original_state_dict",
    "register_fusion",
    "save_pretrained",
    "unfuse",
    "unfuse_modules",
]
