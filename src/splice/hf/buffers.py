"""Computed buffers (rotary ``inv_freq``, ``position_ids``, Falcon-H1's ``mup_vector``, ...), filled before any weight exists.

A checkpoint holds parameters and persistent buffers; everything else a model needs is computed by
transformers' ``_init_weights``, which is also the code that writes random values into parameters.
Transformers runs it after loading and relies on an "already initialized" flag on each loaded tensor,
which a fused model's derived tensors (a stand-in's ``.weight`` view of a fused parameter) do not
carry, so a loaded weight could be re-initialized. splice never runs it after loading: it computes
the buffers on the freshly built model, while every parameter is still on the meta device (writing
to one does nothing), before fusing and before anything is read from the checkpoint. A loaded tensor
therefore cannot be touched by weight initialization at all.

Which code computes a buffer is the model's business: Falcon-H1 fills each layer's ``mup_vector`` from
the init of the model that owns the layers, not of the mixer that owns the buffer. So ``_init_weights``
runs, children before parents as ``PreTrainedModel.initialize_weights`` does it, on every module that
owns a buffer to compute and on all its ancestors, each with the init of its nearest
``PreTrainedModel``. A buffer that no init fills is an error naming it, never uninitialized memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splice.errors import LoadError


def materialize_computed_buffers(model: nn.Module) -> list[str]:
    """Give every non-persistent meta buffer of ``model`` its computed value; returns their names.

    Nothing may be loaded yet: a parameter the model built with real data is put back on meta (the
    checkpoint fills it), so weight init can only ever write into meta tensors.
    """
    from transformers import PreTrainedModel

    for module in model.modules():
        for name, param in module._parameters.items():
            # built off meta by the model itself (DiffLlama draws its lambdas with torch.normal): nothing has
            # been loaded yet, and the checkpoint fills every parameter strictly, so drop the construction value
            if param is not None and not param.is_meta:
                module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    owners: dict[int, Any] = {}
    ancestors: dict[int, list[nn.Module]] = {}
    post_order: list[nn.Module] = []

    def visit(module: nn.Module, owner: Any, path: list[nn.Module]) -> None:
        owner = module if isinstance(module, PreTrainedModel) else owner
        owners[id(module)] = owner
        ancestors[id(module)] = path
        for child in module.children():
            visit(child, owner, [*path, module])
        post_order.append(module)

    visit(model, model if isinstance(model, PreTrainedModel) else None, [])
    computed: dict[str, tuple[nn.Module, str]] = {}
    selected: set[int] = set()
    for path, module in model.named_modules():
        for name, buffer in module._buffers.items():
            # persistent buffers are read from the checkpoint like parameters (strictly: a missing one is an error)
            if buffer is not None and buffer.is_meta and name in module._non_persistent_buffers_set:
                module._buffers[name] = _sentinel_like(buffer)
                computed[f"{path}.{name}" if path else name] = (module, name)
                selected.add(id(module))
                selected.update(id(a) for a in ancestors[id(module)])
    if not computed:
        return []
    with torch.no_grad():
        for module in post_order:
            owner = owners[id(module)]
            if id(module) in selected and owner is not None:
                owner._init_weights(module)
    left = [key for key, (module, name) in computed.items() if _untouched(module._buffers[name])]
    if left:
        raise LoadError(
            f"{', '.join(left[:5])}: computed buffer(s) that the model's _init_weights does not compute; "
            "refusing to leave them holding uninitialized memory"
        )
    return list(computed)


def _sentinel_like(buffer: torch.Tensor) -> torch.Tensor:
    """A buffer whose every element says "not written yet": NaN, or the dtype's minimum for integers."""
    out = torch.empty_like(buffer, device="cpu")
    if out.is_floating_point() or out.is_complex():
        out.fill_(float("nan"))
    elif out.dtype != torch.bool:
        out.fill_(torch.iinfo(out.dtype).min)
    return out


def _untouched(buffer: torch.Tensor) -> bool:
    if buffer.numel() == 0 or buffer.dtype == torch.bool:
        return False
    if buffer.is_floating_point() or buffer.is_complex():
        return bool(torch.isnan(buffer).all())
    return bool((buffer == torch.iinfo(buffer.dtype).min).all())


__all__ = ["materialize_computed_buffers"]
