"""Finding and parsing the files a modular file inherits from, without importing any of them.

Absolute imports (``transformers.models.llama.modeling_llama``) are located through the top-level
package's import spec, which Python finds without executing the package; the rest of the dotted path
is walked on disk. Relative imports are walked from the modular file's own folder. Each file is parsed
once per process.
"""

from __future__ import annotations

import ast
import functools
import importlib.machinery
import importlib.util
import re
import sys
from pathlib import Path

import libcst as cst

from splice.modular.errors import ModularError

# A file another model's classes can be inherited from: `modeling_llama`, `configuration_llama`, ...
FILE_TYPES = (
    "modeling",
    "configuration",
    "tokenization",
    "processing",
    "image_processing_pil",
    "image_processing",
    "video_processing",
    "feature_extraction",
)
_SOURCE_FILE = re.compile(rf"^({'|'.join(FILE_TYPES)})_\w+$")
# Auto classes dispatch at run time; inlining them would be wrong.
_NEVER_INLINED = ("auto",)


def is_source_module(dotted: str, level: int) -> bool:
    """Whether ``from <level dots><dotted> import ...`` names another model's file, to be flattened.

    A model file sits in a model folder: ``..llama.modeling_llama`` or ``pkg.models.llama.modeling_llama``.
    Shared helpers such as ``...modeling_utils`` or ``transformers.modeling_utils`` are plain imports.
    """
    parts = dotted.split(".")
    if not _SOURCE_FILE.match(parts[-1]) or any(part in _NEVER_INLINED for part in parts[:-1]):
        return False
    return len(parts) >= 2 if level else len(parts) >= 3


def is_model_file(module: str) -> bool:
    """Whether a module's last part names a model file: ``configuration_llama``, ``modeling_olmo2``."""
    return _SOURCE_FILE.match(module) is not None


def package_of(path: Path) -> tuple[str, ...]:
    """The package a file belongs to, from the ``__init__.py`` files above it:
    ``("transformers", "models", "llama")``; empty for a file outside any package."""
    folder = path.resolve().parent
    parts: list[str] = []
    while (folder / "__init__.py").is_file():
        parts.append(folder.name)
        folder = folder.parent
    return tuple(reversed(parts))


def _module_file(folder: Path, parts: list[str]) -> Path | None:
    for part in parts[:-1]:
        folder = folder / part
    leaf = folder / parts[-1]
    if leaf.with_suffix(".py").is_file():
        return leaf.with_suffix(".py")
    if (leaf / "__init__.py").is_file():
        return leaf / "__init__.py"
    return None


@functools.lru_cache(maxsize=64)
def _package_roots(top_level: str) -> tuple[Path, ...]:
    """Folders holding ``top_level``, found without running its ``__init__``."""
    if top_level in sys.modules and getattr(sys.modules[top_level], "__path__", None):
        return tuple(Path(p) for p in sys.modules[top_level].__path__)
    spec = importlib.machinery.PathFinder.find_spec(top_level)
    if spec is None:
        return ()
    if spec.submodule_search_locations:
        return tuple(Path(p) for p in spec.submodule_search_locations)
    return (Path(spec.origin).parent,) if spec.origin else ()


def locate_absolute(dotted: str) -> Path | None:
    """The source file of an absolute dotted module name, or None."""
    top, *rest = dotted.split(".")
    if not rest:
        spec = importlib.machinery.PathFinder.find_spec(top)
        return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None
    for root in _package_roots(top):
        found = _module_file(root, rest)
        if found is not None:
            return found
    return None


def locate_relative(importer: Path, level: int, dotted: str) -> Path | None:
    """The source file of ``from <level dots><dotted> import ...`` written in ``importer``."""
    folder = importer.resolve().parent
    for _ in range(level - 1):
        folder = folder.parent
    return _module_file(folder, dotted.split(".")) if dotted else None


def read_source(path: Path) -> str:
    """A Python file's text; a user error, not a traceback, when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ModularError(
            f"not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save it as UTF-8", path
        ) from None


@functools.lru_cache(maxsize=512)
def _parse_cached(path: Path, mtime_ns: int) -> cst.Module:
    return parse_source(read_source(path), path)


def parse_file(path: Path) -> cst.Module:
    """Parse ``path`` once per process (re-parsed if the file changes)."""
    path = path.resolve()
    return _parse_cached(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=512)
def _index_cached(path: Path, mtime_ns: int):
    from splice.modular.index import ModuleIndex

    source = read_source(path)
    try:
        return ModuleIndex.from_source(source, str(path))
    except SyntaxError as exc:
        raise ModularError(f"not valid Python: {exc.msg}", path, exc.lineno) from None


def load_index(path: Path):
    """The :class:`~splice.modular.index.ModuleIndex` of a parent file, built once per process."""
    path = path.resolve()
    return _index_cached(path, path.stat().st_mtime_ns)


def parse_source(source: str, path: Path | str) -> cst.Module:
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        line, reason = exc.raw_line, exc.message
        try:  # CPython's own message is the one people know
            ast.parse(source)
        except SyntaxError as syntax:
            line, reason = syntax.lineno or line, syntax.msg
        raise ModularError(f"not valid Python: {reason}", path, line) from None


def dotted_name(node: cst.BaseExpression | None) -> str:
    """``a.b.c`` for a Name/Attribute chain; '' for anything else."""
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        head = dotted_name(node.value)
        return f"{head}.{node.attr.value}" if head else ""
    return ""
