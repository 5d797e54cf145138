"""Fusion families and per-model surgery.

Built-in families: ``qkv``, ``gate_up``, ``patch_embeddings``, ``norm_mlp``, ``qkv_split``. Each one is
a file here holding its spec, its stand-in modules and its transforms, and registering itself; this
package imports them. The contract a family implements is `splice.fusion.spec.ModuleFusionSpec` and
`splice.fusion.contract` (the fused-layout record and the stand-in base classes).
"""

# isort: off
# the built-in families register themselves when imported, in this order (the order registered_families() lists)
from splice.fusion import qkv, gate_up, patch_embeddings, norm_mlp, qkv_split  # noqa: F401

# isort: on
from splice.fusion.chain import FusedChain, PassThrough, fuse_modules, unfuse_modules
from splice.fusion.contract import FusedLayout, LinearStandIn, Membership, StandIn, WeightRows
from splice.fusion.discovery import require_module
from splice.fusion.spec import FusionOptions, ModuleFusionSpec, register_fusion, registered_families
from splice.fusion.state import FusionRecord, FusionReport, SpliceState, ensure_state, get_state
from splice.fusion.surgery import fuse, original_state_dict, unfuse

__all__ = [
    "FusedChain",
    "FusedLayout",
    "FusionOptions",
    "FusionRecord",
    "FusionReport",
    "LinearStandIn",
    "Membership",
    "ModuleFusionSpec",
    "PassThrough",
    "SpliceState",
    "StandIn",
    "WeightRows",
    "ensure_state",
    "fuse",
    "fuse_modules",
    "get_state",
    "original_state_dict",
    "register_fusion",
    "registered_families",
    "require_module",
    "unfuse",
    "unfuse_modules",
]
