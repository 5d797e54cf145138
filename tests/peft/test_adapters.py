"""splice.peft: LoRA by original module names on fused and split models, against vanilla PEFT.

Same initial LoRA weights: both sides are seeded the same way right before PEFT creates the LoRA
layers. PEFT creates them in module order, and fusing keeps the order of the targeted modules, so
the draws match; every test that relies on it first asserts that the LoRA tensors are equal by name.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import tiny
import torch
import transformers as T
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import splice
import splice.peft as sp
from splice.errors import SpliceError
from splice.fusion.linear import LinearSlice
from splice.peft.algebra import LoraSpec, LoraWeights, stack, stacked_spec, take_rows

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FUSED = {"qkv": True, "gate_up": True}


def lora(**overrides) -> LoraConfig:
    # init_lora_weights=False: B is random too, so an adapter that lands on the wrong rows shows
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **overrides})


def llama(fusion=None, seed: int = 0):
    model = tiny.causal_lm("llama", seed=seed)
    if fusion:
        splice.fuse(model, fusion)
    return model


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def paired(fusion, config: dict, *, fused_model=None, to_original=lambda key: key):
    """(vanilla PeftModel on the unfused model, splice PeftModel on the fused one) from one init."""
    unfused, fused = llama(), fused_model if fused_model is not None else llama(fusion)
    torch.manual_seed(11)
    vanilla = peft.get_peft_model(unfused, lora(**config))
    torch.manual_seed(11)
    fused = sp.get_peft_model(fused, lora(**config))
    a, b = lora_tensors(vanilla), {to_original(k): v for k, v in lora_tensors(fused).items()}
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the two sides did not start from the same LoRA weights"
    return vanilla, fused


def logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny.token_ids() if ids is None else ids).logits


# --------------------------------------------------------------------------------------------------
# training on a fused model is training vanilla LoRA


def test_five_steps_match_vanilla_peft_and_the_adapter_loads_into_vanilla(tmp_path):
    # PEFT's default init (B = 0), as for a real fine-tune
    vanilla, fused = paired(
        FUSED, dict(target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=True)
    )
    assert isinstance(fused.base_model.model.model.layers[0].self_attn.q_proj.base_layer, LinearSlice)
    assert fused.get_nb_trainable_parameters() == vanilla.get_nb_trainable_parameters()
    k_before = fused.base_model.model.model.layers[0].self_attn.qkv_proj.weight[64:96].clone()

    ids = tiny.token_ids(batch=2, length=12, seed=3)
    opt_v = torch.optim.AdamW([p for p in vanilla.parameters() if p.requires_grad], lr=1e-2)
    opt_f = torch.optim.AdamW([p for p in fused.parameters() if p.requires_grad], lr=1e-2)
    losses_v, losses_f = [], []
    for step in range(5):
        for model, losses in ((vanilla, losses_v), (fused, losses_f)):
            model.train()
            loss = model(ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
        if step == 0:  # same gradients, parameter by parameter
            grads_v = {n: p.grad for n, p in vanilla.named_parameters() if p.requires_grad}
            grads_f = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
            assert grads_v.keys() == grads_f.keys()
            for name in grads_v:
                torch.testing.assert_close(grads_f[name], grads_v[name], atol=1e-6, rtol=1e-5)
        for opt in (opt_v, opt_f):
            opt.step()
            opt.zero_grad()
    assert losses_f == pytest.approx(losses_v, abs=1e-5)
    assert losses_f[-1] < losses_f[0] - 0.1  # it did train
    layer = fused.base_model.model.model.layers[0].self_attn
    assert isinstance(layer.k_proj, LinearSlice)  # k untouched: no LoRA, base rows unchanged
    assert torch.equal(layer.qkv_proj.weight[64:96], k_before)

    fused.eval(), vanilla.eval()
    sp.save_adapter(fused, tmp_path / "splice")
    vanilla.save_pretrained(tmp_path / "vanilla")
    ours, theirs = (
        load_file(tmp_path / "splice/adapter_model.safetensors"),
        load_file(tmp_path / "vanilla/adapter_model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    for key in ours:  # Adam at lr 1e-2 amplifies float rounding a little over five steps
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=1e-4)
    config = json.loads((tmp_path / "splice/adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "up_proj", "v_proj"] and config["r"] == 4
    reloaded = PeftModel.from_pretrained(llama(), tmp_path / "splice")
    torch.testing.assert_close(logits(reloaded), logits(vanilla), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(reloaded), logits(fused), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fuse_lora", [False, True])
def test_vanilla_adapter_loads_into_the_fused_model_exactly(tmp_path, fuse_lora):
    vanilla = peft.get_peft_model(llama(), lora(target_modules=["q_proj", "v_proj", "up_proj"]))
    vanilla.save_pretrained(tmp_path / "a")
    loaded = sp.load_adapter(llama(FUSED), tmp_path / "a", fuse_lora=fuse_lora)
    torch.testing.assert_close(logits(loaded), logits(vanilla), atol=1e-5, rtol=1e-5)
    attn = loaded.base_model.model.model.layers[0].self_attn
    if fuse_lora:  # one LoRA on qkv_proj: A stacked (rank 4 + 4), alpha 16 keeps alpha/r = 2
        assert isinstance(attn.q_proj, LinearSlice) and isinstance(attn.v_proj, LinearSlice)
        assert attn.qkv_proj.r["default"] == 8 and attn.qkv_proj.lora_alpha["default"] == 16
        assert (
            attn.qkv_proj.scaling["default"]
            == vanilla.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
        )
        B = attn.qkv_proj.lora_B["default"].weight
        assert not B[64:96].any()  # k rows: zero
    else:
        assert isinstance(attn.q_proj.base_layer, LinearSlice)
    # and back: the same tensors as the vanilla file, bit for bit
    sp.save_adapter(loaded, tmp_path / "b")
    before, after = (
        load_file(tmp_path / "a/adapter_model.safetensors"),
        load_file(tmp_path / "b/adapter_model.safetensors"),
    )
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fuse_lora_is_for_inference_and_refuses_unequal_scalings(tmp_path):
    config = lora(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})  # alpha 8: 8/4 vs 8/2
    peft.get_peft_model(llama(), config).save_pretrained(tmp_path)
    with pytest.raises(SpliceError, match=r"qkv_proj.*different scalings"):
        sp.load_adapter(llama(FUSED), tmp_path, fuse_lora=True)
    with pytest.raises(SpliceError, match="for inference"):
        sp.load_adapter(llama(FUSED), tmp_path, fuse_lora=True, is_trainable=True)
    loaded = sp.load_adapter(llama(FUSED), tmp_path)  # unfused LoRAs: fine
    assert loaded.base_model.model.model.layers[0].self_attn.v_proj.r["default"] == 2


def test_rank_pattern_keeps_alpha_over_r_when_fusing(tmp_path):
    config = lora(
        target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 4}
    )
    vanilla = peft.get_peft_model(llama(), config)
    vanilla.save_pretrained(tmp_path / "a")
    loaded = sp.load_adapter(llama(FUSED), tmp_path / "a", fuse_lora=True)
    qkv = loaded.base_model.model.model.layers[1].self_attn.qkv_proj
    assert (qkv.r["default"], qkv.lora_alpha["default"]) == (6, 12)
    torch.testing.assert_close(logits(loaded), logits(vanilla), atol=1e-5, rtol=1e-5)
    sp.save_adapter(loaded, tmp_path / "b")
    saved = json.loads((tmp_path / "b/adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["rank_pattern"], saved["alpha_pattern"]) == (
        4,
        8,
        {"v_proj": 2},
        {"v_proj": 4},
    )


# --------------------------------------------------------------------------------------------------
# targets: lists, regexes, all-linear


@pytest.mark.parametrize(
    "targets",
    [
        ["q_proj", "v_proj"],
        r".*\.layers\.1\.self_attn\.(q|v)_proj",
        "all-linear",
        ["o_proj", "gate_proj", "down_proj"],
    ],
)
def test_targets_mean_what_they_mean_on_the_original_model(targets):
    vanilla, fused = paired(FUSED, dict(target_modules=targets))
    torch.testing.assert_close(logits(fused), logits(vanilla), atol=1e-5, rtol=1e-5)
    if targets == "all-linear":  # the original Linears, not the fused ones, and never lm_head
        names = {k.split(".lora_A")[0].rpartition(".")[2] for k in lora_tensors(fused) if ".lora_A." in k}
        assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_layers_to_transform_and_exclude_modules():
    config = dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1], exclude_modules=["up_proj"])
    vanilla, fused = paired(FUSED, config)
    assert {k.split(".lora_")[0] for k in lora_tensors(fused)} == {
        "base_model.model.model.layers.1.self_attn.q_proj"
    }
    torch.testing.assert_close(logits(fused), logits(vanilla), atol=1e-5, rtol=1e-5)


def test_targeting_the_fused_linear_saves_one_lora_per_part(tmp_path):
    fused = sp.get_peft_model(llama(FUSED), lora(target_modules=["qkv_proj"]))
    sp.save_adapter(fused, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    attn = "base_model.model.model.layers.0.self_attn"
    A = fused.base_model.model.model.layers[0].self_attn.qkv_proj.lora_A["default"].weight
    assert all(torch.equal(saved[f"{attn}.{p}.lora_A.weight"], A) for p in ("q_proj", "k_proj", "v_proj"))
    vanilla = PeftModel.from_pretrained(llama(), tmp_path)
    torch.testing.assert_close(logits(vanilla), logits(fused), atol=1e-5, rtol=1e-5)
    back = sp.load_adapter(llama(FUSED), tmp_path)  # recorded in the file: back to one LoRA on qkv_proj
    assert back.base_model.model.model.layers[0].self_attn.qkv_proj.r["default"] == 4
    assert torch.equal(back.base_model.model.model.layers[0].self_attn.qkv_proj.lora_A["default"].weight, A)


# --------------------------------------------------------------------------------------------------
# the split direction: SAM and Phi-3


@pytest.fixture(scope="module")
def sam_default():
    torch.manual_seed(0)
    model = T.SamModel(T.SamConfig())
    count = sum(p.numel() for p in model.parameters())
    splice.fuse(model, {"qkv_split": True})
    return model, count


def test_sam_qkv_split_lora_on_q_and_v_counts(sam_default, capsys):
    model, unmodified = sam_default
    peft_model = sp.get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q", "v"]))
    capsys.readouterr()
    peft_model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    total = unmodified + 589_824
    assert (
        line
        == f"trainable params: 589,824 || all params: {total:,} || trainable%: {100 * 589_824 / total:.4f}"
    )
    attn = peft_model.base_model.model.vision_encoder.layers[0].attn
    assert type(attn.k) is torch.nn.Linear  # k untouched
    original = sp.to_original_peft_config(peft_model, peft_model.peft_config["default"])
    assert (set(original.target_modules), original.r, original.lora_alpha) == ({"qkv"}, 32, 64)
    peft_model.unload()


def _sam_vision_split():
    model = tiny.sam_vision()
    splice.fuse(model, {"qkv_split": True})
    return model


def test_sam_split_adapter_round_trips_through_the_original_layout(tmp_path):
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    split = sp.get_peft_model(_sam_vision_split(), lora(r=4, lora_alpha=8, target_modules=["q", "v"]))
    out = split(pixel_values=pixels).last_hidden_state
    sp.save_adapter(split, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["target_modules"], config["r"], config["lora_alpha"]) == (["qkv"], 8, 16)
    vanilla = PeftModel.from_pretrained(tiny.sam_vision(), tmp_path)  # the unmodified model
    torch.testing.assert_close(vanilla(pixel_values=pixels).last_hidden_state, out, atol=1e-5, rtol=1e-5)
    back = sp.load_adapter(_sam_vision_split(), tmp_path)  # onto the split model: q and v again
    before, after = lora_tensors(split), lora_tensors(back)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    as_is = sp.load_adapter(_sam_vision_split(), tmp_path, fuse_lora=True)  # one LoRA on qkv: exact too
    assert as_is.base_model.model.vision_encoder.layers[0].attn.qkv.r["default"] == 8
    torch.testing.assert_close(as_is(pixel_values=pixels).last_hidden_state, out, atol=1e-5, rtol=1e-5)
    all_linear = sp.get_peft_model(_sam_vision_split(), lora(target_modules="all-linear"))
    targeted = {k.split(".lora_A")[0].rpartition(".")[2] for k in lora_tensors(all_linear) if ".lora_A." in k}
    assert targeted == {"qkv", "proj", "lin1", "lin2"}  # the original Linears: qkv, not its parts


def phi3_and_llama_twin():
    """A tiny Phi-3 and a Llama with the same weights (q/k/v and gate/up split out): the same function."""
    phi = tiny.causal_lm("phi3")
    c = phi.config
    twin = T.LlamaForCausalLM(
        tiny.llama_config(rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters)
    ).eval()
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    state = {}
    for key, value in phi.state_dict().items():
        if "qkv_proj" in key:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.split([c.hidden_size, kv, kv])):
                state[key.replace("qkv_proj", name)] = part
        elif "gate_up_proj" in key:
            for name, part in zip(("gate_proj", "up_proj"), value.chunk(2)):
                state[key.replace("gate_up_proj", name)] = part
        else:
            state[key] = value
    twin.load_state_dict(state, strict=True)
    return phi, twin


def test_phi3_split_lora_on_q_and_v_matches_the_llama_reference(tmp_path):
    phi, twin = phi3_and_llama_twin()
    assert torch.equal(logits(phi), logits(twin))
    splice.fuse(phi, {"qkv_split": True})
    torch.manual_seed(4)
    reference = peft.get_peft_model(twin, lora(target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(4)
    split = sp.get_peft_model(phi, lora(target_modules=["q_proj", "v_proj"]))
    a, b = lora_tensors(reference), lora_tensors(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(logits(split), logits(reference), atol=1e-5, rtol=1e-5)

    sp.save_adapter(split, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    B = saved["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"]
    assert B.shape == (128, 8) and not B[64:96].any()  # k rows stay zero
    unmodified = PeftModel.from_pretrained(tiny.causal_lm("phi3"), tmp_path)
    torch.testing.assert_close(logits(unmodified), logits(reference), atol=1e-5, rtol=1e-5)
    phi_again = tiny.causal_lm("phi3")
    splice.fuse(phi_again, {"qkv_split": True})
    back = sp.load_adapter(phi_again, tmp_path)
    c = lora_tensors(back)
    assert c.keys() == b.keys() and all(torch.equal(b[k], c[k]) for k in b)


# --------------------------------------------------------------------------------------------------
# chain fusion moves modules: adapters keep the original paths


@pytest.mark.parametrize("fusions", [["norm_mlp"], ["gate_up", "norm_mlp"]])
def test_chain_fused_lora_is_saved_under_original_names(tmp_path, fusions):
    fused = llama()
    for family in fusions:
        splice.fuse(fused, [family])
    assert fused.model.layers[0].mlp.mlp.up_proj is not None  # the path really moved
    config = dict(
        target_modules=r"model\.layers\.\d+\.mlp\.up_proj", modules_to_save=["post_attention_layernorm"]
    )
    vanilla, chain = paired(
        None, config, fused_model=fused, to_original=lambda key: key.replace(".mlp.mlp.", ".mlp.")
    )
    for model in (vanilla, chain):  # a trained modules_to_save copy, so that losing it would show
        for name, param in model.named_parameters():
            if "modules_to_save.default" in name:
                param.data.mul_(1.5)
    torch.testing.assert_close(logits(chain), logits(vanilla), atol=1e-5, rtol=1e-5)
    sp.save_adapter(chain, tmp_path)
    vanilla.save_pretrained(tmp_path / "vanilla")
    assert (
        load_file(tmp_path / "adapter_model.safetensors").keys()
        == load_file(tmp_path / "vanilla/adapter_model.safetensors").keys()
    )
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == [
        "post_attention_layernorm"
    ]
    reloaded = PeftModel.from_pretrained(llama(), tmp_path)
    torch.testing.assert_close(logits(reloaded), logits(vanilla), atol=1e-5, rtol=1e-5)
    fused_again = llama()
    for family in fusions:
        splice.fuse(fused_again, [family])
    back = sp.load_adapter(fused_again, tmp_path)
    torch.testing.assert_close(logits(back), logits(vanilla), atol=1e-5, rtol=1e-5)
    assert not torch.equal(logits(back), logits(llama()))


def test_config_mapping_both_ways():
    model = llama(FUSED)
    splice.fuse(model, ["norm_mlp"])
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], modules_to_save=["lm_head", "post_attention_layernorm"],
        rank_pattern={r"layers\.1\.mlp\.up_proj": 8}, alpha_pattern={"q_proj": 4},
    )  # fmt: skip
    runtime = sp.adapt_peft_config(model, config)
    assert set(runtime.target_modules) == {"q_proj", "up_proj"}
    assert runtime.rank_pattern == {r"model\.layers\.1\.mlp\.mlp\.up_proj": 8} and runtime.alpha_pattern == {
        "q_proj": 4
    }
    assert runtime.modules_to_save == [  # the leaf name would also pick the pass-throughs at the old slots
        "lm_head", "model.layers.0.mlp.post_attention_layernorm", "model.layers.1.mlp.post_attention_layernorm",
    ]  # fmt: skip
    original = sp.to_original_peft_config(model, runtime)
    assert set(original.target_modules) == {"q_proj", "up_proj"}
    assert original.rank_pattern == {r"model\.layers\.1\.mlp\.up_proj": 8} and original.alpha_pattern == {
        "q_proj": 4
    }
    assert sorted(original.modules_to_save) == ["lm_head", "post_attention_layernorm"]
    assert (
        config.target_modules == {"q_proj", "up_proj"} and config._custom_modules is None
    )  # input untouched


# --------------------------------------------------------------------------------------------------
# several adapters, switching, merging


def test_multiple_adapters_and_set_adapter(tmp_path):
    vanilla, fused = paired(FUSED, dict(target_modules=["q_proj", "v_proj"]))
    for model in (vanilla, fused):
        torch.manual_seed(8)
        model.add_adapter("other", lora(target_modules=["k_proj", "up_proj"], r=2))  # vanilla PEFT's API
    for name in ("other", "default"):
        vanilla.set_adapter(name), fused.set_adapter(name)
        torch.testing.assert_close(logits(fused), logits(vanilla), atol=1e-5, rtol=1e-5)
    with fused.disable_adapter(), vanilla.disable_adapter():
        torch.testing.assert_close(logits(fused), logits(vanilla), atol=1e-5, rtol=1e-5)
    sp.save_adapter(fused, tmp_path)
    assert (tmp_path / "other/adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(llama(), tmp_path)
    reloaded.load_adapter(tmp_path / "other", adapter_name="other")
    reloaded.set_adapter("other"), fused.set_adapter("other")
    torch.testing.assert_close(logits(reloaded), logits(fused), atol=1e-5, rtol=1e-5)
    fused.load_adapter(tmp_path / "other", adapter_name="third")  # PeftModel API on the fused model
    fused.set_adapter("third")
    torch.testing.assert_close(logits(fused), logits(reloaded), atol=1e-5, rtol=1e-5)
    assert sp.get_peft_model(fused, lora(target_modules=["gate_proj"]), adapter_name="fourth") is fused
    assert list(fused.peft_config) == ["default", "other", "third", "fourth"]
    runtime = fused.peft_config["fourth"]
    assert sp.adapt_peft_config(fused, runtime) is runtime  # already in the runtime layout


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_and_unload_gives_the_fused_weights_of_merge_then_fuse(safe_merge):
    vanilla, fused = paired(FUSED, dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    expected = vanilla.merge_and_unload(safe_merge=safe_merge)
    splice.fuse(expected, FUSED)
    merged = fused.merge_and_unload(safe_merge=safe_merge)
    want, got = expected.state_dict(), merged.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert isinstance(merged.model.layers[0].self_attn.q_proj, LinearSlice)
    torch.testing.assert_close(logits(merged), logits(expected))


@pytest.mark.parametrize("case", ["qwen2 slices", "sam concat"])
def test_merge_with_lora_bias_writes_the_rows_of_the_real_weights(case):
    """LoRA (with a LoRA bias) around a LinearSlice and around a ConcatLinears, merged: bit for bit."""
    if case == "qwen2 slices":  # q/k/v have biases
        make, fusion, targets = (lambda: tiny.causal_lm("qwen2")), FUSED, ["q_proj", "k_proj"]
        run = logits
    else:
        make, fusion, targets = tiny.sam_vision, ["qkv_split"], ["qkv", "lin1"]
        pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

        def run(model):
            with torch.no_grad():
                return model(pixel_values=pixels).last_hidden_state

    unfused, fused = make(), make()
    splice.fuse(fused, fusion)
    torch.manual_seed(1)
    vanilla = peft.get_peft_model(unfused, lora(target_modules=targets, lora_bias=True))
    torch.manual_seed(1)
    ours = sp.get_peft_model(fused, lora(target_modules=targets, lora_bias=True))
    torch.testing.assert_close(run(ours), run(vanilla), atol=1e-5, rtol=1e-5)
    expected = vanilla.merge_and_unload()
    splice.fuse(expected, fusion)
    merged = ours.merge_and_unload()
    want, got = expected.state_dict(), merged.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_merge_of_a_fuse_lora_adapter(tmp_path):
    vanilla = peft.get_peft_model(llama(), lora(target_modules=["q_proj", "v_proj"]))
    vanilla.save_pretrained(tmp_path)
    loaded = sp.load_adapter(llama(FUSED), tmp_path, fuse_lora=True)
    expected = vanilla.merge_and_unload()
    splice.fuse(expected, FUSED)
    merged = loaded.merge_and_unload()
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# errors: what cannot be exact says so, and names the module


def test_a_target_that_matches_nothing_lists_candidates():
    with pytest.raises(SpliceError, match=r"matched no module.*'q', .*'v'"):
        sp.get_peft_model(_sam_vision_split(), lora(target_modules=["q_proj"]))
    with pytest.raises(SpliceError, match=r"matched no module.*q_proj"):
        sp.get_peft_model(llama(FUSED), lora(target_modules=["query"]))


def test_lossy_requests_raise_naming_the_module():
    with pytest.raises(SpliceError, match=r"q_proj.*use_dora"):
        sp.get_peft_model(llama(FUSED), lora(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(SpliceError, match=r"layers\.0\.attn\.qkv.*different scalings"):
        sp.get_peft_model(_sam_vision_split(), lora(target_modules=["q", "v"], rank_pattern={"q": 2}))
    with pytest.raises(SpliceError, match=r"qkv_proj and .*q_proj"):
        sp.get_peft_model(llama(FUSED), lora(target_modules=["qkv_proj", "q_proj"]))
    with pytest.raises(SpliceError, match=r"init_lora_weights='pissa'"):
        sp.get_peft_model(llama(FUSED), lora(target_modules=["q_proj"], init_lora_weights="pissa"))
    model = llama()
    splice.fuse_modules(
        model, ["model.layers.*.post_attention_layernorm", "model.layers.*.mlp"], kernel="rms_norm_gated_mlp"
    )
    with pytest.raises(SpliceError, match=r"up_proj is inside the fused chain.*rms_norm_gated_mlp"):
        sp.get_peft_model(model, lora(target_modules=["up_proj"]))


@pytest.mark.parametrize(
    "make, fusion, config, message",
    [
        # bias="lora_only" trains each adapted Linear's bias: q's rows of a fused bias cannot train alone
        (
            "qwen2",
            FUSED,
            dict(target_modules=["q_proj"], bias="lora_only"),
            r"q_proj: bias='lora_only'.*slice",
        ),
        ("qwen2", FUSED, dict(target_modules=["o_proj"], bias="all"), r"qkv_proj: bias='all'.*fused Linear"),
        ("sam", ["qkv_split"], dict(target_modules=["q"], bias="lora_only"), r"attn\.q: bias='lora_only'"),
        # modules_to_save copies a module's own weight: a slice has none, qkv_proj is not in the original
        ("llama", FUSED, dict(target_modules=["v_proj"], modules_to_save=["q_proj"]), r"q_proj is a slice"),
        ("llama", FUSED, dict(target_modules=["v_proj"], modules_to_save=["qkv_proj"]), r"exists only in"),
    ],
)
def test_trained_biases_and_copies_of_fused_modules_raise(make, fusion, config, message):
    model = _sam_vision_split() if make == "sam" else tiny.causal_lm(make)
    if make != "sam":
        splice.fuse(model, fusion)
    with pytest.raises(SpliceError, match=message):
        sp.get_peft_model(model, lora(**config))


def test_bias_options_that_touch_no_fused_bias_still_match_vanilla():
    # Llama has no biases: bias="all" trains nothing more, on either side
    vanilla, fused = paired(FUSED, dict(target_modules=["q_proj", "v_proj"], bias="all"))
    assert fused.get_nb_trainable_parameters() == vanilla.get_nb_trainable_parameters()
    torch.testing.assert_close(logits(fused), logits(vanilla), atol=1e-5, rtol=1e-5)


def test_a_regex_reads_original_names_only():
    # gate_up_proj also ends in "up_proj"; on the original model the regex adapts q_proj and up_proj
    vanilla, fused = paired({"gate_up": True}, dict(target_modules=r".*(q_proj|up_proj)"))
    assert lora_tensors(fused).keys() == lora_tensors(vanilla).keys()
    torch.testing.assert_close(logits(fused), logits(vanilla), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["v_proj"], ["up_proj"]])
def test_disable_adapter_on_a_merged_model_gives_the_base_model_at_once(targets):
    """PEFT unmerges lazily, layer by layer: a sibling slice must not serve the GEMM it ran while merged."""
    base = logits(llama(FUSED))
    _, fused = paired(FUSED, dict(target_modules=targets))
    fused.merge_adapter()
    with fused.disable_adapter():
        torch.testing.assert_close(logits(fused), base, atol=1e-5, rtol=0)  # the first forward


@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules=["q_proj", "embed_tokens"]),  # PEFT saves the embedding's base_layer.weight too
        dict(target_modules=["q_proj", "lm_head"]),
        dict(target_modules=["v_proj"], trainable_token_indices=[3, 5]),
        dict(target_modules=["v_proj"], modules_to_save=["lm_head"]),
    ],
)
def test_vanilla_adapters_with_tensors_beside_the_lora_load(tmp_path, config):
    torch.manual_seed(3)
    vanilla = peft.get_peft_model(llama(), lora(**config))
    vanilla.save_pretrained(tmp_path)
    loaded = sp.load_adapter(llama(FUSED), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(vanilla), atol=1e-5, rtol=1e-5)
    sp.save_adapter(loaded, tmp_path / "again")
    again = PeftModel.from_pretrained(llama(), tmp_path / "again")
    torch.testing.assert_close(logits(again), logits(vanilla), atol=1e-5, rtol=1e-5)


def test_a_vanilla_adapter_with_a_bias_of_a_fused_linear_raises(tmp_path):
    peft.get_peft_model(tiny.causal_lm("qwen2"), lora(target_modules=["q_proj"], bias="all")).save_pretrained(
        tmp_path
    )
    model = tiny.causal_lm("qwen2")
    splice.fuse(model, FUSED)
    with pytest.raises(SpliceError, match=r"holds its own 'bias' for .*k_proj.*slice"):
        sp.load_adapter(model, tmp_path)


def test_an_adapter_deleted_and_added_again_has_no_stale_blocks(tmp_path):
    peft.get_peft_model(llama(), lora(target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path)
    model = sp.load_adapter(llama(FUSED), tmp_path, fuse_lora=True)  # "default": one stacked LoRA on qkv_proj
    model.load_adapter(tmp_path, "other")
    model.set_adapter("other")
    model.delete_adapter("default")
    torch.manual_seed(5)
    model.add_adapter("default", lora(target_modules=["qkv_proj"], r=8))  # a plain rank-8 LoRA, same name
    model.set_adapter("default")
    sp.save_adapter(model, tmp_path / "again", selected_adapters=["default"])
    again = PeftModel.from_pretrained(llama(), tmp_path / "again")
    torch.testing.assert_close(logits(again), logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [["gate_up_proj"], ["gate_proj", "up_proj"]])
def test_a_kernel_plugged_in_after_lora_runs_the_lora(targets):
    """The built-in kernel reads the fused weight directly only when nothing wraps the projections."""
    model = llama(["gate_up", "norm_mlp"])
    ours = sp.get_peft_model(model, lora(target_modules=targets))
    expected = logits(ours)
    with ours.disable_adapter():
        assert not torch.allclose(logits(ours), expected, atol=1e-3)  # the LoRA changes the output
    assert splice.kernels.use_kernel(ours, "rms_norm_gated_mlp") == 2
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=1e-5)


def test_an_adapter_for_modules_the_model_lacks_raises(tmp_path):
    peft.get_peft_model(llama(), lora(target_modules=["q_proj"])).save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    state = {k.replace("layers.1.", "layers.7."): v for k, v in state.items()}
    save_file(state, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SpliceError, match=r"layers\.7\.self_attn\.q_proj.*close module names"):
        sp.load_adapter(llama(FUSED), tmp_path)


def test_dora_on_unfused_modules_still_round_trips(tmp_path):
    vanilla, fused = paired(FUSED, dict(target_modules=["o_proj", "down_proj"], use_dora=True))
    torch.testing.assert_close(logits(fused), logits(vanilla), atol=1e-5, rtol=1e-5)
    sp.save_adapter(fused, tmp_path)
    reloaded = PeftModel.from_pretrained(llama(), tmp_path)
    torch.testing.assert_close(logits(reloaded), logits(vanilla), atol=1e-5, rtol=1e-5)


def test_no_global_state_changes():
    sp.get_peft_model(llama(FUSED), lora(target_modules=["q_proj"]))
    assert LoraConfig(target_modules=["q_proj"])._custom_modules is None
    with warnings.catch_warnings(), pytest.raises(ValueError, match="not supported"):
        warnings.simplefilter("ignore")
        peft.get_peft_model(llama(FUSED), LoraConfig(target_modules=["q_proj"]))  # plain PEFT: still refuses


# --------------------------------------------------------------------------------------------------
# the LoRA algebra (pure)


def test_stacked_spec_keeps_the_scaling_exactly():
    assert stacked_spec([LoraSpec(16, 32), LoraSpec(16, 32)], where="x") == LoraSpec(32, 64)
    assert stacked_spec([LoraSpec(3, 16)] * 2, where="x").scaling == LoraSpec(3, 16).scaling
    rs = stacked_spec([LoraSpec(8, 16, True), LoraSpec(8, 16, True)], where="x")
    assert rs.r >= 16 and rs.scaling == LoraSpec(8, 16, True).scaling
    with pytest.raises(SpliceError, match="different scalings"):
        stacked_spec([LoraSpec(4, 8), LoraSpec(2, 8)], where="x")


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 7), min_size=2, max_size=4),
    ranks=st.lists(st.one_of(st.none(), st.integers(1, 5)), min_size=4, max_size=4),
    in_features=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_stack_is_block_diagonal_and_take_rows_inverts_it(sizes, ranks, in_features, seed):
    ranks = ranks[: len(sizes)]
    if all(r is None for r in ranks):
        ranks[0] = 1
    g = torch.Generator().manual_seed(seed)
    parts = [
        None
        if r is None
        else LoraWeights(torch.randn(r, in_features, generator=g), torch.randn(n, r, generator=g))
        for n, r in zip(sizes, ranks)
    ]
    spec = stacked_spec([LoraSpec(r, 2 * r) for r in ranks if r is not None], where="x")
    fused, cols = stack(parts, sizes, spec)
    delta = fused.B @ fused.A
    row = 0
    for part, size, block in zip(parts, sizes, cols):
        rows = (row, row + size)
        if part is None:
            assert not delta[row : row + size].any() and block is None
        else:
            torch.testing.assert_close(delta[row : row + size], part.B @ part.A)
            back = take_rows(fused, rows, block, where="x")
            assert torch.equal(back.A, part.A) and torch.equal(back.B, part.B)
        row += size


def test_take_rows_refuses_a_trained_off_block():
    fused = LoraWeights(torch.ones(4, 3), torch.ones(5, 4))
    with pytest.raises(SpliceError, match="past its block-diagonal form"):
        take_rows(fused, (0, 2), (0, 2), where="x")


def test_save_writes_metadata_only_when_it_stacked(tmp_path):
    sp.save_adapter(sp.get_peft_model(llama(FUSED), lora(target_modules=["q_proj"])), tmp_path / "plain")
    with safe_open(str(Path(tmp_path / "plain/adapter_model.safetensors")), "pt") as f:
        assert f.metadata() == {"format": "pt"}
