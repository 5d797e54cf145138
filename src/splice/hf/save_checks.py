"""Checks `save_pretrained` runs before writing: which model to save, and that a runtime layout reloads.

A checkpoint is the state dict of the model itself, so a wrapper changes what would be written:
- ``torch.compile``'s ``OptimizedModule`` adds nothing and keeps the model as ``_orig_mod``: it is
  looked through (transformers' ``save_pretrained`` reaches the model the same way);
- a ``PeftModel``, or PEFT tuner layers injected into the model, prefix every key with
  ``base_model.model.``, rename weights to ``base_layer.weight`` and add adapter tensors, so plain
  transformers would load every base weight as missing: refused, pointing to the two saves that
  work (the adapter in vanilla PEFT format, or the base after merging or unloading the adapter);
- a fused model held inside another module would be saved under the outer module's keys and
  without its fusion record: refused, naming where the fused model is.

A runtime-layout save records ``fusion_config`` in config.json, and loading rebuilds the layout from
it: :func:`check_runtime_layout_reloads` refuses the save when that would not give this layout back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn

from splice.errors import SaveError, SpliceError
from splice.fusion.surgery import SpliceState, fuse, get_state
from splice.loading.distributed import distributed_weights

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


def check_runtime_layout_reloads(
    model: nn.Module, state: SpliceState, build: Callable[[], nn.Module]
) -> None:
    """Refuse a runtime-layout save that ``from_pretrained`` would not rebuild, before anything is written.

    Loading builds a fresh model from the config and fuses it with the recorded ``fusion_config``;
    ``build`` does the first half (on meta). The result must have this model's keys and shapes, else
    the files would hold tensors the reloaded model has no place for (or lack ones it needs).
    """
    config = state.config
    try:
        fresh = build()
        fuse(fresh, config)
    except SpliceError as exc:
        raise SaveError(
            f"cannot save the runtime layout: its fusion_config {config} does not load back "
            f"(fusing a fresh {type(model).__name__} with it fails: {exc}); save in the original layout (the default)"
        ) from None
    ours = _shapes(model, state)
    theirs = _shapes(fresh, state)
    extra, lacking = [k for k in ours if k not in theirs], [k for k in theirs if k not in ours]
    differ = [k for k in ours if k in theirs and ours[k] != theirs[k]]
    if extra or lacking or differ:
        found = (
            f"this model has {extra[0]}, which the reloaded one would not"
            if extra
            else f"the reloaded model would have {lacking[0]}, which this one has not"
            if lacking
            else f"{differ[0]} has shape {list(ours[differ[0]])} here but {list(theirs[differ[0]])} in the reloaded model"
        )
        raise SaveError(
            f"cannot save the runtime layout: a fresh {type(model).__name__} fused with the recorded fusion_config "
            f"{config} would not have this model's layout ({found}; {len(extra) + len(lacking) + len(differ)} key(s) "
            "differ), so the checkpoint would not load back; save in the original layout (the default)"
        )


def _shapes(model: nn.Module, state: SpliceState) -> dict[str, tuple[int, ...] | None]:
    sharded = distributed_weights(model) is not None  # tensor-parallel padding may change local shapes
    return {k: None if sharded else tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
