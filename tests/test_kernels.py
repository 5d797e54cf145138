"""`splice.kernels.use_column_major`: fused projections stored column-major, for batch-1 decoding on a CPU.

Only strides change: parameters keep their identity, shape and bits; logits stay within 1e-5 of the
unfused model and greedy tokens are identical (dynamic and static cache); gradients match; saves are
byte-identical to the source; ``enabled=False`` restores the row-major storage. Bad requests name what
is wrong. (Compiling it, one graph and no recompile: tests/fusion/test_forwards.py.)
"""

from __future__ import annotations

import copy
import filecmp
import subprocess
import sys
import textwrap

import pytest
import tiny
import torch
import transformers as T

import splice
from splice.demo import UNFUSED_PROJECTIONS, VARIANTS, build_variant

KINDS = ["llama", "mistral", "qwen3", "gemma2"]


def fused_pair(kind):
    model = tiny.causal_lm(kind)
    reference = copy.deepcopy(model)
    splice.fuse(model, ["qkv", "gate_up"])
    return reference, model


def column_major(weight):
    return weight.stride() == (1, weight.shape[0])


@pytest.mark.parametrize("kind", KINDS)
def test_column_major_fused_projections_decode_like_the_unfused_model(kind):
    reference, model = fused_pair(kind)
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    wide = [
        m for n, m in model.named_modules() if n.endswith(("qkv_proj", "gate_up_proj")) and m.out_features >= m.in_features
    ]  # fmt: skip
    assert splice.kernels.use_column_major(model) == len(wide) > 0
    assert all(column_major(m.weight) for m in wide)
    for name, parameter in model.named_parameters():  # same objects, same bits
        assert parameter is before[name][0] and torch.equal(parameter, before[name][1])
    others = [
        p for n, p in model.named_parameters() if not n.endswith(("qkv_proj.weight", "gate_up_proj.weight"))
    ]
    assert all(p.is_contiguous() for p in others)  # fmt: skip

    ids = tiny.token_ids(batch=2, length=7)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, attention_mask=mask).logits,
            reference(ids, attention_mask=mask).logits,
            rtol=0,
            atol=1e-5,
        )
    prompt = ids[:1]
    greedy = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    for cache in ({}, {"cache_implementation": "static"}):
        assert torch.equal(
            model.generate(prompt, **greedy, **cache), reference.generate(prompt, **greedy, **cache)
        )


def test_gradients_match_and_keep_the_layout():
    reference, model = fused_pair("llama")
    splice.kernels.use_column_major(model)
    ids = tiny.token_ids(batch=2, length=6)
    model(ids, labels=ids).loss.backward()
    reference(ids, labels=ids).loss.backward()
    fused = model.model.layers[0].mlp.gate_up_proj.weight
    assert column_major(fused.grad)  # autograd lays the gradient out like the parameter
    expected = torch.cat(
        [
            reference.model.layers[0].mlp.gate_proj.weight.grad,
            reference.model.layers[0].mlp.up_proj.weight.grad,
        ]
    )
    torch.testing.assert_close(fused.grad, expected, rtol=0, atol=1e-6)  # fmt: skip
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert column_major(fused)


def test_saves_stay_byte_identical(tmp_path):
    tiny.causal_lm("llama").save_pretrained(tmp_path / "source")
    model = splice.from_pretrained(
        T.AutoModelForCausalLM, tmp_path / "source", fusion_config={"qkv": True, "gate_up": True}
    )
    row_major = copy.deepcopy(model)
    splice.kernels.use_column_major(model)
    splice.save_pretrained(model, tmp_path / "original")
    assert filecmp.cmp(
        tmp_path / "source/model.safetensors", tmp_path / "original/model.safetensors", shallow=False
    )
    splice.save_pretrained(model, tmp_path / "runtime", save_original_format=False)
    splice.save_pretrained(row_major, tmp_path / "runtime-row-major", save_original_format=False)
    assert filecmp.cmp(tmp_path / "runtime/model.safetensors", tmp_path / "runtime-row-major/model.safetensors", shallow=False)  # fmt: skip
    original = splice.original_state_dict(model)
    assert all(torch.equal(original[k], v) for k, v in splice.original_state_dict(row_major).items())


def test_a_tied_column_major_head_is_still_saved_once(tmp_path):
    model = tiny.causal_lm("llama", tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = copy.deepcopy(model)
    splice.kernels.use_column_major(model, r"^lm_head$")
    splice.save_pretrained(model, tmp_path / "tied")
    reference.save_pretrained(tmp_path / "reference")
    assert filecmp.cmp(
        tmp_path / "tied/model.safetensors", tmp_path / "reference/model.safetensors", shallow=False
    )


def test_enabled_false_goes_back_and_repeats_change_nothing():
    _, model = fused_pair("llama")
    fused = model.model.layers[1].self_attn.qkv_proj.weight
    values = fused.detach().clone()
    assert splice.kernels.use_column_major(model) == 4
    assert splice.kernels.use_column_major(model) == 0
    assert splice.kernels.use_column_major(model, enabled=False) == 4
    assert fused.is_contiguous() and torch.equal(fused, values)
    assert splice.kernels.use_column_major(model, enabled=False) == 0


def test_a_regex_chooses_any_linear_and_the_default_skips_narrow_ones():
    model = tiny.causal_lm("llama")
    assert splice.kernels.use_column_major(model, UNFUSED_PROJECTIONS) == 2 * 5
    assert column_major(model.model.layers[0].self_attn.k_proj.weight)
    assert model.model.layers[0].mlp.down_proj.weight.is_contiguous()
    narrow = tiny.causal_lm("llama", hidden_size=64, intermediate_size=16)  # gate_up 32 rows < 64 inputs
    splice.fuse(narrow, ["gate_up"])
    with pytest.raises(splice.FusionError) as error:
        splice.kernels.use_column_major(narrow)
    assert str(error.value) == (
        "use_column_major: the model has no fused projection (qkv_proj, gate_up_proj) at least as wide as "
        "its input; fuse first, or pass modules=<regex> to choose Linears"
    )


def test_a_regex_that_matches_no_linear_is_named():
    model = tiny.causal_lm("llama")
    with pytest.raises(splice.FusionError) as error:
        splice.kernels.use_column_major(model, r"qkv_proj$")
    assert str(error.value) == (
        "use_column_major: modules='qkv_proj$' matched no nn.Linear; Linears include "
        "['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj', "
        "'model.layers.0.self_attn.o_proj', 'model.layers.0.mlp.gate_proj']"
    )


def test_sharded_weights_are_refused(tmp_path):
    """A DTensor weight (one real gloo rank) is refused by name, before any weight changes."""
    script = textwrap.dedent(
        f"""
        import torch, torch.distributed as dist
        from torch.distributed.tensor import distribute_tensor, init_device_mesh, Shard
        import splice
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(4, 8))
        model[1].weight = torch.nn.Parameter(distribute_tensor(model[1].weight.detach(), mesh, [Shard(0)]))
        try:
            splice.kernels.use_column_major(model, r"^[01]$")
        except splice.FusionError as error:
            print(error)
        print(model[0].weight.is_contiguous())
        dist.destroy_process_group()
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "use_column_major: 1.weight is a DTensor of 2 dims; only plain 2-D weights of a model in one process "
        "can change layout",
        "True",
    ]


def test_every_demo_variant_gives_the_same_tokens(tmp_path):
    tiny.causal_lm("llama").save_pretrained(tmp_path)
    prompt = tiny.token_ids(batch=1, length=5)
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected = build_variant("unfused", tmp_path).generate(prompt, **greedy)
    for name in VARIANTS[1:]:
        assert torch.equal(build_variant(name, tmp_path).generate(prompt, **greedy), expected), name
