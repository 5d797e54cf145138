"""Which modules a family fuses, and why not: discovery and the refusals raised before the model is touched.

A family fuses every module it claims or none (`ModuleFusionSpec.refusal`); when it finds nothing,
the error says what it looked for (`describe_candidates`), why the nearest module is not one
(`why_not`), and what the model's blocks hold.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from splice.errors import FusionError
from splice.fusion.spec import FusionOptions, ModuleFusionSpec


def require_module(model: Any, function: str) -> None:
    """A `FusionError` when ``model`` is not an ``nn.Module`` (a path or a name, passed where the model goes)."""
    if not isinstance(model, nn.Module):
        shown = repr(model) if len(repr(model)) <= 60 else repr(model)[:57] + "..."
        raise FusionError(
            f"{function}: expected the model, a torch.nn.Module, got {type(model).__name__} {shown}"
            + (
                "; load it first (splice.from_pretrained loads a path fused)"
                if isinstance(model, str)
                else ""
            )
        )


def discover(
    model: nn.Module, family: str, spec: ModuleFusionSpec, options: FusionOptions
) -> list[tuple[str, nn.Module]]:
    """The modules ``spec`` will fuse, or a FusionError saying what was looked for and where."""
    modules = [
        (path, m)
        for path, m in model.named_modules()
        if any(fnmatchcase(path, glob) for glob in spec.target_modules_patterns)
    ]
    if options.modules is not None:
        selected = [(p, m) for p, m in modules if re.search(options.modules, p)]
        if not selected:
            near = [p for p, m in modules if spec.is_fusable(m, options)][:5]
            raise FusionError(
                f"{family!r}: option modules={options.modules!r} matched no module; "
                f"fusable modules include {near or 'none'}"
            )
        modules = selected
    found = [(p, m) for p, m in modules if _is_fusable(spec, p, m, options)]
    if not found:
        scope = f" among modules matching {options.modules!r}" if options.modules else ""
        raise FusionError(
            f"{family!r}: found no {spec.describe_candidates(options)}{scope}{_why(spec, modules, options)}"
            f"{_blocks(model) if not options.modules else ''}"
        )
    _refuse_partial(family, spec, options, modules, found)
    return found


def _is_fusable(spec: ModuleFusionSpec, path: str, module: nn.Module, options: FusionOptions) -> bool:
    """``spec.is_fusable``; a refusal it raises names the module's path."""
    try:
        return spec.is_fusable(module, options)
    except FusionError as exc:
        raise FusionError(f"{exc} (at {path or '<root>'})") from None


def _refuse_partial(
    family: str,
    spec: ModuleFusionSpec,
    options: FusionOptions,
    modules: list[tuple[str, nn.Module]],
    found: list[tuple[str, nn.Module]],
) -> None:
    """A family fuses all the modules it claims (among those ``modules=`` selects) or none."""
    refused = [(p, why) for p, m in modules if (why := spec.refusal(m, options)) is not None]
    if refused:
        shown = "; ".join(f"{p or '<root>'}: {why}" for p, why in refused[:3])
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise FusionError(
            f"{family!r}: {len(refused)} of the {len(found) + len(refused)} modules it would fuse cannot be fused, "
            f"so none is: {shown}{more}; make them agree, or pass the option modules=<regex> to fuse only the others"
        )


def _why(spec: ModuleFusionSpec, modules: list[tuple[str, nn.Module]], options: FusionOptions) -> str:
    """The first reason the family gives (`ModuleFusionSpec.why_not`) for a module it looked at."""
    for path, module in modules:
        why = spec.why_not(module, options)
        if why is not None:
            return f"; e.g. {path or '<root>'} is not fusable: {why}"
    return ""


def check_not_carried_over(
    model: nn.Module, family: str, path: str, module: nn.Module, children: dict
) -> None:
    """Refuse when the model's own code moves a replaced child to another module (it would strand the fused one)."""
    from splice.fusion.adjacency import why_carried_over

    replaced = [n for n in children if module._modules.get(n) is not None]
    parts = path.split(".") if path else []
    lineage = [model] + [model.get_submodule(".".join(parts[: i + 1])) for i in range(len(parts))]
    why = why_carried_over([type(m) for m in lineage], replaced)
    if why is not None:
        raise FusionError(f"{family!r} at {path or '<root>'}: {why}")


def _blocks(model: nn.Module) -> str:
    """What the model's repeated blocks hold, so "nothing to fuse" can be checked at a glance (Mamba, RWKV, ...)."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and not isinstance(module[0], nn.ModuleList):
            block = module[0]
            children = ", ".join(f"{n}: {type(c).__name__}" for n, c in list(block.named_children())[:6])
            return f"; {type(model).__name__}'s blocks ({path}.*) are {type(block).__name__}({children}), so there is nothing for it to fuse"
    return ""
