"""splice.save_pretrained on wrapped models: torch.compile is looked through; PEFT and outer modules are refused."""

from __future__ import annotations

import filecmp

import pytest
import tiny
import torch
import transformers as T
from peft import LoraConfig
from peft import get_peft_model as plain_get_peft_model

import splice
import splice.peft
from splice.errors import SaveError

FUSED = {"qkv": True, "gate_up": True}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny.save(tiny.causal_lm("llama"), tmp_path_factory.mktemp("llama"))


def with_trained_lora(model):
    peft_model = splice.peft.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a trained adapter: merging it changes the outputs
    return peft_model


def test_a_peft_model_is_refused_pointing_to_the_saves_that_work(llama_dir, tmp_path):
    peft_model = with_trained_lora(
        splice.from_pretrained(T.AutoModelForCausalLM, llama_dir, fusion_config=FUSED)
    )
    with pytest.raises(
        SaveError,
        match=r"^splice.save_pretrained got a PeftModel .* keyed base_model.model.\*, so transformers would load none "
        r"of them; save the adapter with splice.peft.save_adapter\(peft_model, adapter_dir\) .* "
        r"splice.save_pretrained\(peft_model.merge_and_unload\(\), out_dir\)",
    ):
        splice.save_pretrained(peft_model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # LoRA layers injected without the PeftModel wrapper: the same refusal, naming the layer
    with pytest.raises(SaveError, match=r"model.layers.0.self_attn.q_proj is a PEFT VirtualLinearLora layer"):
        splice.save_pretrained(peft_model.base_model.model, tmp_path / "out")
    # the way out it names: merged, the base saves in the original layout and transformers loads it exactly
    expected = tiny.logits(peft_model)
    merged = peft_model.merge_and_unload()
    splice.save_pretrained(merged, tmp_path / "merged")
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(tiny.logits(reloaded), expected, rtol=1e-5, atol=1e-5)


def test_a_peft_model_of_an_unfused_model_is_refused_too(llama_dir, tmp_path):
    peft_model = plain_get_peft_model(T.AutoModelForCausalLM.from_pretrained(llama_dir), LoraConfig(r=4))
    with pytest.raises(SaveError, match=r"^splice.save_pretrained got a PeftModel"):
        splice.save_pretrained(peft_model, tmp_path / "out")


def test_a_compiled_model_saves_as_the_model_itself(llama_dir, tmp_path):
    model = splice.from_pretrained(T.AutoModelForCausalLM, llama_dir, fusion_config=FUSED)
    compiled = torch.compile(model)
    splice.save_pretrained(compiled, tmp_path / "out")
    assert filecmp.cmp(llama_dir / "model.safetensors", tmp_path / "out" / "model.safetensors", shallow=False)
    splice.save_pretrained(compiled, tmp_path / "runtime", save_original_format=False)
    again = splice.from_pretrained(T.AutoModelForCausalLM, tmp_path / "runtime")
    torch.testing.assert_close(tiny.logits(again), tiny.logits(model), rtol=0, atol=0)


def test_a_fused_model_inside_another_module_is_refused_naming_it(llama_dir, tmp_path):
    class Holder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    holder = Holder(splice.from_pretrained(T.AutoModelForCausalLM, llama_dir, fusion_config=FUSED))
    with pytest.raises(
        SaveError, match=r"got a Holder that holds a model fused by splice at 'inner'; save that model itself"
    ):
        splice.save_pretrained(holder, tmp_path / "out")


def test_a_runtime_layout_save_restricted_by_modules_reloads_the_same_layout(llama_dir, tmp_path):
    config = {"qkv": {"modules": r"layers\.0\."}, "gate_up": True}
    model = splice.from_pretrained(T.AutoModelForCausalLM, llama_dir, fusion_config=config)
    splice.save_pretrained(model, tmp_path / "runtime", save_original_format=False)
    again = splice.from_pretrained(T.AutoModelForCausalLM, tmp_path / "runtime")
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert hasattr(again.model.layers[0].self_attn, "qkv_proj") and not hasattr(
        again.model.layers[1].self_attn, "qkv_proj"
    )
    torch.testing.assert_close(tiny.logits(again), tiny.logits(model), rtol=0, atol=0)


def test_a_runtime_layout_save_that_would_not_reload_is_refused_before_writing(llama_dir, tmp_path):
    model = splice.from_pretrained(T.AutoModelForCausalLM, llama_dir, fusion_config=FUSED)
    fresh = T.AutoModelForCausalLM.from_pretrained(llama_dir)
    model.model.layers[1].self_attn = fresh.model.layers[1].self_attn  # an unfused attention put back by hand
    with pytest.raises(
        SaveError,
        match=r"^cannot save the runtime layout: a fresh LlamaForCausalLM fused with the recorded fusion_config "
        r"\{'qkv': True, 'gate_up': True\} would not have this model's layout \(this model has "
        r"model.layers.1.self_attn.q_proj.weight, which the reloaded one would not; 4 key\(s\) differ\)",
    ):
        splice.save_pretrained(model, tmp_path / "runtime", save_original_format=False)
    assert not (tmp_path / "runtime").exists()
