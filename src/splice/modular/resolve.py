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
import io
import re
import sys
import tokenize
from collections.abc import Callable
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
    return ModuleIndex.from_source(source, str(path), check_source(source, path))


def load_index(path: Path):
    """The :class:`~splice.modular.index.ModuleIndex` of a parent file, built once per process."""
    path = path.resolve()
    return _index_cached(path, path.stat().st_mtime_ns)


MAX_NESTING = 100
"""Deepest syntax tree `splice modular` parses. Code in transformers nests at most ~25 levels; libcst's
parser crashes the process on 5,000 nested parentheses and takes seconds per thousand chained calls."""


def check_source(source: str, path: Path | str, *, newer_syntax: bool = False) -> ast.Module | None:
    """CPython's parse of ``source``, refusing what libcst cannot parse safely, as a `ModularError` at file:line.

    ``ast`` rejects pathological nesting cleanly (a SyntaxError, RecursionError or MemoryError), where
    libcst's native parser can overflow its stack and kill the process; what ``ast`` accepts is then
    refused past ``MAX_NESTING`` levels, so no input reaches libcst that can crash it or stall it.
    With ``newer_syntax``, a file this Python cannot parse (``class X[T]`` before 3.12; libcst can) gives
    None once its tokens show nothing libcst could choke on: no bracket nested past ``MAX_NESTING``, no
    statement longer than ``20 * MAX_NESTING`` tokens.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        if newer_syntax and "too many" not in exc.msg:  # CPython's "too many nested parentheses", ...
            _check_tokens(source, path)
            return None
        raise ModularError(f"not valid Python: {exc.msg}", path, exc.lineno) from None
    except (RecursionError, MemoryError):
        raise ModularError(
            f"nested too deeply for Python's parser; splice modular refuses code nested more than {MAX_NESTING} "
            "levels deep: split the expression",
            path,
            _token_shape(source)[0],
        ) from None
    except ValueError as exc:  # null bytes
        raise ModularError(f"not valid Python: {exc}", path) from None
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise ModularError(
                f"nested more than {MAX_NESTING} levels deep; splice modular refuses such code (libcst cannot "
                "parse it safely): split the expression",
                path,
                getattr(node, "lineno", None),
            )
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return tree


def _check_tokens(source: str, path: Path | str) -> None:
    longest_at, longest, deepest_at, deepest = _token_shape(source)
    if deepest > MAX_NESTING:
        raise ModularError(f"brackets nested more than {MAX_NESTING} levels deep", path, deepest_at)
    if longest > 20 * MAX_NESTING:
        raise ModularError(
            f"a statement of {longest} tokens, in syntax this Python cannot check; split it", path, longest_at
        )


def _token_shape(source: str) -> tuple[int | None, int, int | None, int]:
    """``(first line of the statement with the most tokens, its token count, line of the deepest bracket,
    its depth)``: where Python's parser ran out of stack, which it does not say."""
    longest_at, longest, deepest_at, deepest = None, 0, None, 0
    count, line, depth = 0, 1, 0
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
                if count > longest:
                    longest_at, longest = line, count
                count, line = 0, token.end[0] + 1
            elif token.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
                count += 1
                if token.string in ("(", "[", "{"):
                    depth += 1
                    if depth > deepest:
                        deepest_at, deepest = token.start[0], depth
                elif token.string in (")", "]", "}"):
                    depth -= 1
    except (tokenize.TokenError, SyntaxError):
        pass
    return longest_at, longest, deepest_at, deepest


def parse_source(source: str, path: Path | str) -> cst.Module:
    tree = check_source(source, path, newer_syntax=True)
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        line, reason = exc.raw_line, exc.message
        if tree is None:  # CPython's own message is the one people know
            try:
                ast.parse(source)
            except SyntaxError as syntax:
                line, reason = syntax.lineno or line, syntax.msg
        raise ModularError(f"not valid Python: {reason}", path, line) from None


def find_all(node: cst.CSTNode, wanted: Callable[[cst.CSTNode], bool]) -> list[cst.CSTNode]:
    """Every node under ``node`` (itself included) that ``wanted`` accepts, in source order.

    What ``libcst.matchers.findall`` does for the few shapes the converter looks for, without importing
    ``libcst.matchers`` (0.3-0.8 s per process, more than the rest of a conversion).
    """
    found: list[cst.CSTNode] = []

    class _Find(cst.CSTVisitor):
        def on_visit(self, child: cst.CSTNode) -> bool:
            if wanted(child):
                found.append(child)
            return True

    node.visit(_Find())
    return found


def dotted_name(node: cst.BaseExpression | None) -> str:
    """``a.b.c`` for a Name/Attribute chain; '' for anything else."""
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        head = dotted_name(node.value)
        return f"{head}.{node.attr.value}" if head else ""
    return ""
