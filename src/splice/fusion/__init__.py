"""Fusion families and per-model surgery.

Built-in families: ``qkv``, ``gate_up``, ``patch_embeddings``, ``norm_mlp``, ``qkv_split``. Each one is
a file here holding its spec, its fused module and its transforms.
"""

from splice.fusion.gate_up import GateUpSpec
from splice.fusion.qkv import QKVSpec
from splice.fusion.spec import FusionOptions, ModuleFusionSpec, register_fusion, registered_families
from splice.fusion.surgery import FusionRecord, FusionReport, fuse, get_state, original_state_dict, unfuse

register_fusion("qkv", QKVSpec())
register_fusion("gate_up", GateUpSpec())

__all__ = [
    "FusionOptions",
    "FusionRecord",
    "FusionReport",
    "ModuleFusionSpec",
    "fuse",
    "get_state",
    "original_state_dict",
    "register_fusion",
    "registered_families",
    "unfuse",
]
