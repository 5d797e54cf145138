"""transformers' MoE converters whose source patterns are regexes (``\\.experts.*.w1.weight``) load and save exactly."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from arch_sweep import tiny_config
from safetensors.torch import load_file

import splice
from splice.errors import LoadError
from splice.hf.conversions import _collected_index


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        (r"\.experts.*.w1.weight", "model.layers.3.mlp.experts.12.w1.weight", ("model.layers.3.mlp.experts.#.w1.weight", 12)),
        ("mlp.experts.*.gate_proj.weight", "model.layers.0.mlp.experts.7.gate_proj.weight", ("model.layers.0.mlp.experts.#.gate_proj.weight", 7)),
    ],
)  # fmt: skip
def test_expert_index(pattern, key, expected):
    assert _collected_index(key, pattern, "converter") == expected


def test_expert_index_missing_is_explained():
    with pytest.raises(
        LoadError, match=r"model\.layers\.0\.mlp\.experts\.w1\.weight: cannot find the expert index"
    ):
        _collected_index("model.layers.0.mlp.experts.w1.weight", r"\.experts.*.w1.weight", "converter")


def test_regex_source_patterns_load_and_save_exactly(tmp_path):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_config("deepseek_v4")).eval()
    model.save_pretrained(tmp_path / "src")
    source = load_file(tmp_path / "src" / "model.safetensors")
    assert any(".experts.0.w1.weight" in k for k in source)  # per-expert tensors, as the converter expects
    loaded = splice.from_pretrained(T.AutoModelForCausalLM, tmp_path / "src", fusion_config={"gate_up": True})
    ids = torch.tensor([[5, 9, 13, 17]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    splice.save_pretrained(loaded, tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(saved) == sorted(source)
    assert all(torch.equal(saved[k], source[k]) for k in source)
