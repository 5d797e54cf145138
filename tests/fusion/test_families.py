"""Every built-in family on the architectures it targets: logits, greedy tokens, gradients, exact undo."""

from __future__ import annotations

import copy

import pytest
import tiny
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import splice
from splice.errors import FusionError
from splice.fusion import FusedLayout, get_state
from splice.fusion.linear import LinearSlice
from splice.transforms import bitwise_equal

CAUSAL = [
    ("llama", ["qkv", "gate_up", "norm_mlp"]),
    ("mistral", ["qkv", "gate_up"]),
    ("qwen2", ["qkv", "gate_up"]),  # q/k/v biases
    ("qwen3", ["qkv", "gate_up", "norm_mlp"]),  # q/k norms, head_dim 24
    ("gemma", ["qkv", "gate_up", "norm_mlp"]),
    ("gemma2", ["qkv", "gate_up", "norm_mlp"]),  # pre_feedforward_layernorm is the norm before the MLP
    ("phi3", ["qkv_split"]),  # ships qkv_proj natively; split it into q/k/v
]

VISION = [
    ("qwen2_vl", tiny.qwen2_vl, tiny.qwen2_vl_inputs, ["patch_embeddings", "qkv", "gate_up"]),
    (
        "sam",
        tiny.sam_vision,
        lambda: {"pixel_values": torch.randn(1, 3, 64, 64, generator=_g())},
        ["qkv_split", "patch_embeddings"],
    ),
    (
        "vit",
        tiny.vit,
        lambda: {"pixel_values": torch.randn(2, 3, 32, 32, generator=_g())},
        ["patch_embeddings", "qkv"],
    ),
    (
        "siglip",
        tiny.siglip_vision,
        lambda: {"pixel_values": torch.randn(2, 3, 30, 30, generator=_g())},
        ["patch_embeddings", "qkv"],
    ),
]


def _g():
    return torch.Generator().manual_seed(3)


def output(model, inputs):
    out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(actual, expected):
    assert list(actual) == list(expected)
    for key in expected:
        assert bitwise_equal(actual[key], expected[key]), key


def check_undo(model, before, modules_before):
    splice.unfuse(model)
    assert get_state(model) is None
    assert_state_equal(model.state_dict(), before)
    after = dict(model.named_modules())
    assert list(after) == list(modules_before)
    assert all(after[p] is m for p, m in modules_before.items()), (
        "unfuse must restore the same module objects"
    )


def check_gradients(ref, model, inputs):
    """One training step's gradients, mapped back to the original layout, match the unfused model's."""
    ref.train(), model.train()
    output(ref, inputs).float().pow(2).mean().backward()
    output(model, inputs).float().pow(2).mean().backward()
    fused_grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    original = get_state(model).weight_map().invert().to_runtime(fused_grads)
    ref_grads = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    assert set(original) == set(ref_grads)
    for key, grad in ref_grads.items():
        torch.testing.assert_close(original[key], grad, rtol=1e-4, atol=1e-5, msg=key)
    ref.eval(), model.eval()
    ref.zero_grad(), model.zero_grad()


@pytest.mark.parametrize("kind, families", CAUSAL, ids=[k for k, _ in CAUSAL])
def test_causal_lm(kind, families):
    model = tiny.causal_lm(kind)
    ref = copy.deepcopy(model)
    before, modules_before = snapshot(model), dict(model.named_modules())
    ids = tiny.token_ids()

    report = splice.fuse(model, families)
    assert report.counts == {f: 2 for f in families}

    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    prompt = ids[:1, :5]
    expected = ref.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(
        model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False), expected
    )
    check_gradients(ref, model, {"input_ids": ids})
    assert_state_equal(splice.original_state_dict(model), before)
    check_undo(model, before, modules_before)


@pytest.mark.parametrize("name, build, inputs, families", VISION, ids=[v[0] for v in VISION])
def test_vision(name, build, inputs, families):
    model = build()
    ref = copy.deepcopy(model)
    before, modules_before = snapshot(model), dict(model.named_modules())
    x = inputs()
    report = splice.fuse(model, families)
    assert set(report.counts) == set(families)
    with torch.no_grad():
        torch.testing.assert_close(output(model, x), output(ref, x), rtol=0, atol=1e-5)
    check_gradients(ref, model, x)
    assert_state_equal(splice.original_state_dict(model), before)
    check_undo(model, before, modules_before)


def test_runtime_names_follow_conventions():
    model = tiny.qwen2_vl()
    splice.fuse(model, ["patch_embeddings", "qkv", "gate_up"])
    keys = set(model.state_dict())
    assert "model.visual.patch_embed.linear_proj.weight" in keys
    assert "model.language_model.layers.0.self_attn.qkv_proj.weight" in keys
    assert "model.language_model.layers.0.self_attn.qkv_proj.bias" in keys  # Qwen2 q/k/v biases
    assert "model.language_model.layers.1.mlp.gate_up_proj.weight" in keys
    assert not any(k.endswith(("q_proj.weight", "gate_proj.weight", "patch_embed.proj.weight")) for k in keys)


def test_qkv_is_gqa_aware_and_keeps_biases():
    model = tiny.causal_lm("qwen2")
    attn = model.model.layers[0].self_attn
    q, k, v = (getattr(attn, n).weight.detach().clone() for n in ("q_proj", "k_proj", "v_proj"))
    qb = attn.q_proj.bias.detach().clone()
    splice.fuse(model, ["qkv"])
    assert attn.qkv_proj.weight.shape == (64 + 32 + 32, 64)
    assert bitwise_equal(attn.qkv_proj.weight.detach(), torch.cat([q, k, v]))
    assert isinstance(attn.k_proj, LinearSlice) and attn.k_proj.out_features == 32
    assert bitwise_equal(attn.q_proj.bias.detach(), qb)  # slices expose views of the fused parameters
    record = get_state(model).records[0]
    assert record.layout == FusedLayout(
        "qkv_proj", ("q_proj", "k_proj", "v_proj"), (64, 32, 32), attention=True, head_dim=16, heads=(4, 2, 2)
    )


class CountLinear(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def count_linears(model, ids):
    with torch.no_grad(), CountLinear() as mode:
        model(ids)
    return mode.calls


class WeightsOfLinears(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.storages = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.storages.append(args[1].untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def test_slices_multiply_by_their_rows_of_the_fused_weight():
    """No output is shared between sibling calls (it could go stale): each slice runs on its own rows."""
    model = tiny.causal_lm("llama", num_hidden_layers=3)
    ids = tiny.token_ids()
    assert count_linears(model, ids) == 3 * 7 + 1  # q, k, v, o, gate, up, down per layer, plus lm_head
    splice.fuse(model, ["qkv", "gate_up"])
    fused = {
        p.untyped_storage().data_ptr()
        for n, p in model.named_parameters()
        if "qkv_proj" in n or "gate_up" in n
    }
    with torch.no_grad(), WeightsOfLinears() as mode:
        model(ids)
    assert len(mode.storages) == 3 * 4 + 1  # fused forwards: qkv_proj, o, gate_up_proj, down per layer
    # through the slices (a global hook makes the fused forwards fall back): one GEMM per slice, on a
    # view of the fused weight
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        with torch.no_grad(), WeightsOfLinears() as mode:
            model(ids)
    finally:
        handle.remove()
    assert len(mode.storages) == 3 * 7 + 1
    assert (
        sum(ptr in fused for ptr in mode.storages) == 3 * 5
    )  # q, k, v, gate, up: views of the fused weights


def test_slices_fall_back_to_a_new_gemm_for_a_different_input():
    """Cross-attention style use (k/v on other states) stays correct, just not fused."""
    model = tiny.causal_lm("llama")
    attn = model.model.layers[0].self_attn
    x, y = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    expected_q, expected_k = attn.q_proj(x), attn.k_proj(y)
    splice.fuse(model, ["qkv"])
    torch.testing.assert_close(attn.q_proj(x), expected_q)
    torch.testing.assert_close(attn.k_proj(y), expected_k)  # y is not x: a fresh GEMM, correct result
    torch.testing.assert_close(attn.k_proj(x), F.linear(x, attn.qkv_proj.weight[64:96]))


def test_fusing_frees_the_originals_and_is_layer_by_layer():
    model = tiny.causal_lm("llama")
    q = model.model.layers[0].self_attn.q_proj
    splice.fuse(model, ["qkv"])
    assert q.weight is None  # the original module holds no tensor while fused (restored by unfuse)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == len(list(model.parameters())) - int(model.config.tie_word_embeddings)


def test_fused_model_deepcopies_and_pickles(tmp_path):
    model = tiny.causal_lm("llama")
    splice.fuse(model, ["qkv", "gate_up", "norm_mlp"])
    ids = tiny.token_ids()
    with torch.no_grad():
        expected = model(ids).logits
        clone = copy.deepcopy(model)
        torch.testing.assert_close(clone(ids).logits, expected, rtol=0, atol=0)
        assert clone.model.layers[0].self_attn.q_proj.shared.parent is clone.model.layers[0].self_attn
        torch.save(model, tmp_path / "m.pt")
        loaded = torch.load(tmp_path / "m.pt", weights_only=False)
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


def test_bf16_fusion_is_exact_too():
    model = tiny.causal_lm("mistral").to(torch.bfloat16)
    before = snapshot(model)
    splice.fuse(model, {"qkv": True, "gate_up": True})
    assert model.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.bfloat16
    assert_state_equal(splice.original_state_dict(model), before)


def test_unfuse_one_family_keeps_the_others():
    model = tiny.causal_lm("llama")
    before = snapshot(model)
    splice.fuse(model, ["qkv", "gate_up"])
    assert splice.unfuse(model, family="qkv") == 2
    assert hasattr(model.model.layers[0].mlp, "gate_up_proj")
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert get_state(model).config == {"gate_up": True}
    assert_state_equal(splice.original_state_dict(model), before)
    splice.unfuse(model)
    assert_state_equal(model.state_dict(), before)


def test_unfuse_one_family_is_blocked_only_by_fusions_over_it():
    model = tiny.causal_lm("llama")
    before = snapshot(model)
    splice.fuse(model, ["qkv"])
    splice.fuse(model, ["norm_mlp"])  # moves the norm and the MLP, not self_attn
    assert splice.unfuse(model, family="qkv") == 2
    splice.unfuse(model)
    assert_state_equal(model.state_dict(), before)

    model = tiny.causal_lm("llama", num_hidden_layers=11)
    splice.fuse(model, {"gate_up": {"modules": r"layers\.10\."}})
    splice.fuse(model, {"norm_mlp": {"modules": r"layers\.1$"}})  # layer 1 is no prefix of layer 10
    assert splice.unfuse(model, family="gate_up") == 1

    model = tiny.causal_lm("llama")
    splice.fuse(model, ["gate_up"])
    splice.fuse(model, ["norm_mlp"])  # moves the MLP that gate_up fused into the chain
    with pytest.raises(
        FusionError, match=r"^undo 'norm_mlp' at model\.layers\.0 first: it was applied on top of 'gate_up'$"
    ):
        splice.unfuse(model, family="gate_up")


def test_fused_model_compiles_without_recompiling():
    """Under torch.compile each slice multiplies by its own rows: no Python-side cache for dynamo to guard on."""
    import torch._dynamo

    model = tiny.causal_lm("llama")
    splice.fuse(model, {"qkv": True, "gate_up": True})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(tiny.token_ids(seed=0))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed in (1, 2):
                ids = tiny.token_ids(seed=seed)
                torch.testing.assert_close(compiled(ids).logits, model(ids).logits)
    torch._dynamo.reset()
