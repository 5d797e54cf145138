"""Tensor and module plumbing for the surgery: reading, detaching and setting tensors and children by key.

Keys are relative to one module (``q_proj.weight``). A step's outputs are fresh tensors, or, for a
pure rename, the same Parameter objects, so optimizers and hooks holding them stay valid.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from splice.errors import FusionError
from splice.weightmap import Step

SHARDED = "is sharded (a DTensor: fully_shard or tensor parallelism), and surgery needs whole tensors"


def is_dtensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict(keep_vars=True))


def _owner(module: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, leaf = key.rpartition(".")
    owner = module.get_submodule(path) if path else module
    return owner, leaf


def get_tensor(module: nn.Module, key: str) -> torch.Tensor:
    owner, leaf = _owner(module, key)
    tensor = owner._parameters.get(leaf)
    if tensor is None:
        tensor = owner._buffers.get(leaf)
    if tensor is None:
        raise FusionError(f"no tensor {key!r} in {type(module).__name__}")
    return tensor


def strip(module: nn.Module, key: str) -> None:
    owner, leaf = _owner(module, key)
    if leaf in owner._parameters:
        owner._parameters[leaf] = None
    else:
        owner._buffers[leaf] = None


def assign(module: nn.Module, key: str, tensor: torch.Tensor, requires_grad: bool, *, where: str) -> None:
    try:
        owner, leaf = _owner(module, key)
    except AttributeError:
        raise FusionError(f"{where}: the fused module has no submodule for {key!r}") from None
    if leaf in owner._parameters:
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=requires_grad)
        owner._parameters[leaf] = tensor
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        raise FusionError(f"{where}: the fused module has no parameter or buffer slot for {key!r}")


def set_children(module: nn.Module, children: dict[str, nn.Module]) -> None:
    """Set children, putting new ones where the first replaced child stood (keeps state_dict order natural)."""
    new = [n for n in children if n not in module._modules]
    ordered: OrderedDict[str, nn.Module | None] = OrderedDict()
    for name, child in module._modules.items():
        if name in children and new:
            for n in new:
                ordered[n] = children[n]
            new = []
        ordered[name] = children.get(name, child)
    for n in new:
        ordered[n] = children[n]
    module._modules = ordered


def get_module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def all_tensors(model: nn.Module) -> list[torch.Tensor]:
    tensors = [p for _, p in model.named_parameters(remove_duplicate=False)]
    return tensors + [b for _, b in model.named_buffers(remove_duplicate=False)]


def run_steps(module: nn.Module, steps: list[Step]) -> dict[str, tuple[torch.Tensor, str]]:
    """Run each step on the module's current tensors, then detach those tensors from the module.

    A pure rename moves the Parameter object itself, so optimizers and hooks holding it stay valid.
    """
    outputs: dict[str, tuple[torch.Tensor, str]] = {}
    with torch.no_grad():
        for step in steps:
            originals = [get_tensor(module, k) for k in step.sources]
            if step.is_rename:
                results = originals
            else:
                sources = [t.detach() for t in originals]
                results = [_own_memory(t, sources) for t in step.run(sources)]
                del sources
            for key in step.sources:
                strip(module, key)
            for key, tensor in zip(step.targets, results):
                outputs[key] = (tensor, step.sources[0])
            del originals, results
    return outputs


def _own_memory(tensor: torch.Tensor, sources: list[torch.Tensor]) -> torch.Tensor:
    """A view into a source would keep the whole source alive (and shared storage breaks saving)."""
    if tensor.is_meta:
        return tensor
    ptr = tensor.untyped_storage().data_ptr()
    if any(ptr == s.untyped_storage().data_ptr() for s in sources) or not tensor.is_contiguous():
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor
