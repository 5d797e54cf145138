"""A family asked for on a model it does not apply to (state-space, recurrent) says so, naming what the model holds."""

from __future__ import annotations

import pytest
import transformers as T
from arch_sweep import tiny_config

import splice
from splice.errors import FusionError


@pytest.mark.parametrize(
    ("model_type", "blocks"),
    [
        ("mamba", r"MambaForCausalLM's blocks \(backbone\.layers\.\*\) are MambaBlock\(norm: MambaRMSNorm, mixer: MambaMixer\)"),
        ("rwkv", r"RwkvForCausalLM's blocks \(rwkv\.blocks\.\*\) are RwkvBlock\(.*attention: RwkvSelfAttention, feed_forward: RwkvFeedForward\)"),
    ],
)  # fmt: skip
def test_nothing_to_fuse_names_the_blocks(model_type, blocks):
    model = T.AutoModelForCausalLM.from_config(tiny_config(model_type))
    for family in ("qkv", "gate_up", "norm_mlp"):
        with pytest.raises(
            FusionError, match=rf"'{family}': found no .*; {blocks}, so there is nothing for it to fuse"
        ):
            splice.fuse(model, [family])
