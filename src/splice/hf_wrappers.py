"""Models that reach `save_pretrained` wrapped: which one to save, or why not.

A checkpoint is the state dict of the model itself, so a wrapper changes what would be written:
- ``torch.compile``'s ``OptimizedModule`` adds nothing and keeps the model as ``_orig_mod``: it is
  looked through (transformers' ``save_pretrained`` reaches the model the same way);
- a ``PeftModel``, or PEFT tuner layers injected into the model, prefix every key with
  ``base_model.model.``, rename weights to ``base_layer.weight`` and add adapter tensors, so plain
  transformers would load every base weight as missing: refused, pointing to the two saves that
  work (the adapter in vanilla PEFT format, or the base after merging or unloading the adapter);
- a fused model held inside another module would be saved under the outer module's keys and
  without its fusion record: refused, naming where the fused model is.
"""

from __future__ import annotations

import sys

from torch import nn

from splice.errors import SaveError
from splice.fusion.surgery import get_state

_ADAPTER_HELP = (
    "save the adapter with splice.peft.save_adapter(peft_model, adapter_dir) (vanilla PEFT format), and the "
    "base model with splice.save_pretrained(peft_model.merge_and_unload(), out_dir) to bake the adapter in, "
    "or splice.save_pretrained(peft_model.unload(), out_dir) for the base weights alone"
)


def model_to_save(model: nn.Module) -> nn.Module:
    """The model whose checkpoint ``splice.save_pretrained`` writes, or a SaveError saying why none."""
    while _is_compiled(model):
        model = model._orig_mod
    peft = sys.modules.get("peft")  # no PEFT object can exist before peft is imported
    if peft is not None and isinstance(model, peft.PeftModel):
        raise SaveError(
            f"splice.save_pretrained got a {type(model).__name__} (a model with a PEFT adapter attached): its "
            "weights are keyed base_model.model.*, so transformers would load none of them; " + _ADAPTER_HELP
        )
    tuner = sys.modules.get("peft.tuners.tuners_utils")
    for path, module in model.named_modules():
        if tuner is not None and isinstance(module, tuner.BaseTunerLayer):
            raise SaveError(
                f"splice.save_pretrained: {path} is a PEFT {type(module).__name__} layer, whose weights are keyed "
                "base_layer.* next to the adapter's, so transformers would load them as missing; "
                + _ADAPTER_HELP
            )
        if path and get_state(module) is not None and get_state(model) is None:
            raise SaveError(
                f"splice.save_pretrained got a {type(model).__name__} that holds a model fused by splice at "
                f"{path!r}; save that model itself (splice.save_pretrained(model.{path}, out_dir)), so that its "
                "keys and fusion record are the checkpoint's"
            )
    return model


def _is_compiled(model: nn.Module) -> bool:
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    return dynamo is not None and isinstance(model, dynamo.OptimizedModule)
