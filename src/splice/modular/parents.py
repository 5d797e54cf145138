"""Which files a modular file inherits from, and which model prefix each of them is renamed to."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import libcst as cst

from splice.modular.errors import ModularError
from splice.modular.index import ModuleIndex
from splice.modular.merge import common_suffix
from splice.modular.resolve import dotted_name, is_source_module, locate_absolute, locate_relative

logger = logging.getLogger("splice.modular")

ErrorAt = Callable[[str, cst.CSTNode], ModularError]


@dataclass(frozen=True)
class ParentImport:
    path: Path  # the parent file
    name: str  # the name in the parent file (before any `as`)


def find_parent_imports(index: ModuleIndex, modular_path: Path, error: ErrorAt) -> dict[str, ParentImport]:
    """``{bound name: ParentImport}`` for every name imported from another model's file."""
    imported: dict[str, ParentImport] = {}
    for statement in index.imports:
        if not isinstance(statement, cst.SimpleStatementLine):
            continue
        for small in statement.body:
            if not isinstance(small, cst.ImportFrom) or small.module is None:
                continue
            level, dotted = len(small.relative), dotted_name(small.module)
            if level == 1 or not is_source_module(dotted, level):
                continue
            shown = "." * level + dotted
            found = locate_absolute(dotted) if level == 0 else locate_relative(modular_path, level, dotted)
            if found is None:
                raise error(
                    f"cannot find the source of `{shown}`: it is neither an installed "
                    "package nor a file of this package tree",
                    small,
                )
            if isinstance(small.names, cst.ImportStar):
                raise error(
                    f"`from {shown} import *` is not supported: name the classes you inherit from", small
                )
            for alias in small.names:
                original = dotted_name(alias.name)
                bound = alias.asname.name.value if alias.asname is not None else original
                imported[bound] = ParentImport(found.resolve(), original)
    return imported


def specific_base(node: cst.ClassDef, imported: dict[str, ParentImport], error: ErrorAt) -> str | None:
    """The one base of ``node`` imported from another model's file, if any."""
    specific = [dotted_name(b.value) for b in node.bases if dotted_name(b.value) in imported]
    if len(specific) > 1:
        raise error(
            f"class {node.name.value} inherits from more than one model-specific class "
            f"({', '.join(specific)}); flattening can follow only one",
            node,
        )
    return specific[0] if specific else None


def prefix_of(class_name: str, base_name: str, base_model_cased: str, default: str) -> str:
    """The model prefix a class name uses: ``Emu3TextMLP(LlamaMLP)`` -> ``Emu3Text``.

    Two readings: take off the part of the base's name after its own model's prefix (``MLP``), or take
    off the longest suffix both names share. They differ when a model name ends like a class name does
    (``Ernie4_5_Moe`` + ``MoeStatics``, ``DeformableDetr`` + ``DetrLayer``); then the model's own
    prefix wins if either reading gives it, else the first reading.
    """
    readings = []
    suffix = base_name[len(base_model_cased) :] if base_name.startswith(base_model_cased) else ""
    for candidate in (suffix, common_suffix(class_name, base_name)):
        if (
            candidate
            and candidate[0].isupper()
            and class_name.endswith(candidate)
            and class_name != candidate
        ):
            readings.append(class_name[: len(class_name) - len(candidate)])
    if not readings:
        return default
    return default if default in readings else readings[0]


def choose_prefix(
    modular_path: Path,
    parent_path: Path,
    prefixes: Counter[str],
    default: str,
    old_cased: str,
    parent_classes: set[str],
) -> str:
    """The prefix the parent's code is renamed to: the most common one (ties go to the model's own
    name, else to the last seen), unless it would collide with the parent's own class names."""
    if not prefixes:
        return default
    ranked = prefixes.most_common()
    top = [name for name, count in ranked if count == ranked[0][1]]
    chosen = default if default in top else top[-1]
    if len(prefixes) > 1:
        logger.warning(
            "%s: classes inheriting from %s use several prefixes (%s); using %r for the code pulled "
            "from it. Subclass the intermediate classes too if they need another prefix.",
            modular_path,
            parent_path.name,
            ", ".join(sorted(prefixes)),
            chosen,
        )
    old_prefix = chosen.replace(default, old_cased)
    if chosen != default and any(n.startswith(old_prefix) for n in parent_classes):
        logger.warning(
            "%s: prefix %r would collide with the classes %s... of %s; falling back to %r.",
            modular_path,
            chosen,
            old_prefix,
            parent_path.name,
            default,
        )
        chosen = default
    return chosen
