"""LoRA (PEFT) by the *original* module names on models fused or split by splice, exact both ways.

    peft_model = splice.peft.get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], r=8))
    splice.peft.save_adapter(peft_model, adapter_dir)     # vanilla PEFT format, for the unmodified model
    peft_model = splice.peft.load_adapter(model, adapter_dir)            # a vanilla adapter, exactly
    peft_model = splice.peft.load_adapter(model, adapter_dir, fuse_lora=True)  # one LoRA per fused Linear
    runtime_config = splice.peft.adapt_peft_config(model, lora_config)
    original_config = splice.peft.to_original_peft_config(model, runtime_config)

How it works: `addresses` (each module by runtime and original path), `config` (PEFT's own target
matching run over original paths, written back for the runtime tree), `layer` (the LoRA layer for
splice's parameterless stand-ins), `algebra` and `plan` (exact LoRA moves between a fused layer and its
parts), `adapters` (the three entry points). See docs/peft.md.
"""

from splice.peft.adapters import get_peft_model, load_adapter, save_adapter
from splice.peft.config import adapt_peft_config, to_original_peft_config
from splice.peft.errors import AdapterError
from splice.peft.layer import VirtualLinearLora

__all__ = [
    "AdapterError",
    "VirtualLinearLora",
    "adapt_peft_config",
    "get_peft_model",
    "load_adapter",
    "save_adapter",
    "to_original_peft_config",
]
