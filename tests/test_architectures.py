"""Every causal-LM and image-text-to-text architecture in the installed transformers, through splice.

For each architecture (`arch_sweep`): a tiny config, fixed seed, `save_pretrained`; then
`splice.from_pretrained` unfused, with each registered fusion family alone and with every family
that worked together. Each load must match transformers exactly (fp32 logits within 1e-5, and the
vision tower's output for VLMs where it can be driven) and save back bitwise, or be refused at load by
a `SpliceError` naming the construct. The full list is opt-in (``--runarch``); a fixed sample runs by
default. ``tests/arch_table.py`` turns the same sweep into the README's support table.
"""

from __future__ import annotations

import re

import pytest
from arch_sweep import architectures, sweep_one

# chosen to cover each mechanism the sweep has caught bugs in, cheaply: composite VLMs and their vision
# towers (Conv2d and Conv3d patch embeddings), MoE checkpoint converters, post-norm layers, pre-fused
# attention, recurrent models where nothing applies. Architectures with a dedicated test elsewhere
# (Falcon-H1, MiniMax, Zaya, BigBird, DeepSeek-V4, vipllava) are left to it, to keep the default run short.
SAMPLE = {
    ("causal_lm", "llama"),
    ("causal_lm", "gpt2"),
    ("causal_lm", "gpt_neox"),
    ("causal_lm", "bloom"),
    ("causal_lm", "falcon"),
    ("causal_lm", "opt"),
    ("causal_lm", "phi3"),
    ("causal_lm", "qwen2_moe"),
    ("causal_lm", "olmo2"),
    ("causal_lm", "mamba"),
    ("causal_lm", "gemma2"),
    ("image_text_to_text", "llava"),
    ("image_text_to_text", "qwen2_vl"),
    ("image_text_to_text", "gemma3"),
    ("image_text_to_text", "git"),
}
NAMED = re.compile(
    r"[A-Za-z_]\w*\.[\w.#*]+|'[^']+'|\b\w+_\w+\b"
)  # a dotted path, a quoted name or an attribute


def _params():
    for mapping, model_type in architectures():
        marks = () if (mapping, model_type) in SAMPLE else (pytest.mark.arch,)
        yield pytest.param(mapping, model_type, id=f"{mapping}-{model_type}", marks=marks)


def test_sample_is_current():
    assert SAMPLE <= set(architectures()), sorted(SAMPLE - set(architectures()))


@pytest.mark.parametrize(("mapping", "model_type"), _params())
def test_architecture(mapping, model_type):
    record = sweep_one(mapping, model_type)
    if record["status"] != "built":
        if (mapping, model_type) in SAMPLE:
            pytest.fail(f"a sampled architecture must build: {record['status']}")
        pytest.skip(record["status"])
    results = record["results"]
    bad = {config: detail for config, (outcome, detail) in results.items() if outcome in ("wrong", "crash")}
    assert not bad, bad
    assert results["{}"][0] == "exact", results["{}"]
    for config, (outcome, detail) in results.items():
        if outcome == "refused":
            assert NAMED.search(detail.split(": ", 1)[1]), (
                f"{config}: a refusal must name what it refuses: {detail}"
            )
