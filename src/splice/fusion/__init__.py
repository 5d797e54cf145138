"""Fusion families and per-model surgery.

Built-in families: ``qkv``, ``gate_up``, ``patch_embeddings``, ``norm_mlp``, ``qkv_split``. Each one is
a file here holding its spec, its fused module and its transforms.
"""

from splice.fusion.chain import FusedChain, PassThrough, fuse_modules, unfuse_modules
from splice.fusion.gate_up import GateUpSpec
from splice.fusion.norm_mlp import NormMLPSpec
from splice.fusion.patch_embeddings import PatchEmbeddingsSpec
from splice.fusion.qkv import QKVSpec
from splice.fusion.qkv_split import QKVSplitSpec
from splice.fusion.spec import FusionOptions, ModuleFusionSpec, register_fusion, registered_families
from splice.fusion.surgery import FusionRecord, FusionReport, fuse, get_state, original_state_dict, unfuse

register_fusion("qkv", QKVSpec())
register_fusion("gate_up", GateUpSpec())
register_fusion("patch_embeddings", PatchEmbeddingsSpec())
register_fusion("norm_mlp", NormMLPSpec())
register_fusion("qkv_split", QKVSplitSpec())

__all__ = [
    "FusedChain",
    "PassThrough",
    "fuse_modules",
    "unfuse_modules",
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
