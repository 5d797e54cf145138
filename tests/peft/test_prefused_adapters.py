"""LoRA on q and v of models whose checkpoints ship q/k/v fused (falcon, gpt_neox, bloom, mpt, gpt2, ...).

After ``qkv_split``, a LoRA on the split ``q_proj``/``v_proj`` saves as a vanilla PEFT adapter for the
original fused Linear (``query_key_value``, ``Wqkv``, ``c_attn``), its B rows placed in that Linear's own
layout (per head, per kv group, ...); ``peft.PeftModel`` loads it on the unmodified model with equal
logits, and `splice.peft.load_adapter` brings it back onto q and v. A vanilla adapter trained on the
fused Linear loads onto the split model too.
"""

from __future__ import annotations

import json

import peft
import pytest
import tiny
import torch
from peft import LoraConfig, PeftModel
from prefused import CONFIGS, FUSED_NAME, REFERENCE, attentions, build
from safetensors.torch import load_file

import splice
import splice.peft as sp

KINDS = list(CONFIGS)


def lora(**overrides) -> LoraConfig:
    # init_lora_weights=False: B is random too, so a LoRA that lands on the wrong rows shows
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **overrides})


def split(kind: str):
    model = build(kind)
    splice.fuse(model, ["qkv_split"])
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tiny.token_ids(length=7)).logits


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("kind", KINDS)
def test_lora_on_split_q_and_v_saves_for_the_fused_original(kind, tmp_path):
    torch.manual_seed(1)
    trained = sp.get_peft_model(split(kind), lora(target_modules=["q_proj", "v_proj"]))
    expected = logits(trained)
    sp.save_adapter(trained, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == [FUSED_NAME[kind]]
    saved = load_file(tmp_path / "adapter_model.safetensors")
    B = next(v for k, v in saved.items() if "lora_B" in k)
    reference = attentions(build(kind))[0]
    q, k, v = REFERENCE[kind](
        reference, B.T.unsqueeze(0)
    )  # B's rows read as the model reads its fused output
    assert k.count_nonzero() == 0 and q.count_nonzero() and v.count_nonzero()

    vanilla = PeftModel.from_pretrained(build(kind), tmp_path)  # the unmodified model
    torch.testing.assert_close(logits(vanilla), expected, rtol=0, atol=1e-5)

    assert config["fan_in_fan_out"] is (kind in ("gpt2", "openai"))  # what PEFT wants for a Conv1D c_attn
    back = sp.load_adapter(split(kind), tmp_path)  # recorded in the file: LoRAs on q and v again
    assert back.peft_config["default"].fan_in_fan_out is False  # the split parts are nn.Linear
    before, after = lora_tensors(trained), lora_tensors(back)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    as_one = sp.load_adapter(split(kind), tmp_path, fuse_lora=True)  # one LoRA on the stand-in: exact too
    torch.testing.assert_close(logits(as_one), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["falcon_gqa", "gpt_neox", "bloom", "gpt2"])
def test_a_vanilla_adapter_on_the_fused_linear_loads_onto_the_split_model(kind, tmp_path):
    torch.manual_seed(2)
    vanilla = peft.get_peft_model(build(kind), lora(target_modules=[FUSED_NAME[kind]]))
    expected = logits(vanilla)
    vanilla.save_pretrained(tmp_path)
    loaded = sp.load_adapter(split(kind), tmp_path)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-5)
    loaded.merge_adapter()  # the delta goes into the rows of q, k and v the layout gives each
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-5)
    loaded.unmerge_adapter()
    sp.save_adapter(loaded, tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    original = load_file(tmp_path / "adapter_model.safetensors")
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)
