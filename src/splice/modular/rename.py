"""Renaming a parent file's code for the model being written, one definition at a time.

Identifiers, strings and comments are all renamed (``LlamaMLP`` -> ``Olmo2MLP``, ``"llama"`` ->
``"olmo2"``), except what comes from absolute or cross-package imports: those names refer to code that
is not being copied and must keep pointing at it.
"""

from __future__ import annotations

import io
import re
import tokenize

import libcst as cst

from splice.modular.index import Definition, ModuleIndex
from splice.modular.names import NameSwap
from splice.modular.resolve import FILE_TYPES

_COPIED_FROM = re.compile(r"#\s*Copied from")
_FSTRING_MIDDLE = getattr(tokenize, "FSTRING_MIDDLE", -1)
_DEF_LINE = re.compile(r"^(async[ \t]+)?def[ \t]", re.MULTILINE)
_SIBLING_FILE = re.compile(rf"^({'|'.join(FILE_TYPES)})_(\w+)$")


class Renamer(cst.CSTTransformer):
    """Applies a :class:`NameSwap` to names, strings and comments (or only strings and comments)."""

    def __init__(self, swap: NameSwap, *, only_text: bool = False, keep: frozenset[str] = frozenset()):
        super().__init__()
        self.swap = swap
        self.only_text = only_text
        self.keep = keep  # names bound by imports that are not renamed

    def leave_Name(self, original_node: cst.Name, updated_node: cst.Name) -> cst.Name:
        if self.only_text or updated_node.value in self.keep:
            return updated_node
        return updated_node.with_changes(value=self.swap(updated_node.value, identifier=True))

    def leave_SimpleString(
        self, original_node: cst.SimpleString, updated_node: cst.SimpleString
    ) -> cst.SimpleString:
        return updated_node.with_changes(value=self.swap(updated_node.value))

    def leave_Comment(self, original_node: cst.Comment, updated_node: cst.Comment):
        # "Copied from" markers point at the old model; in a generated file they would be false.
        if _COPIED_FROM.search(updated_node.value):
            return cst.RemoveFromParent()
        return updated_node.with_changes(value=self.swap(updated_node.value))

    def visit_Import(self, node: cst.Import) -> bool:
        return False

    def visit_ImportFrom(self, node: cst.ImportFrom) -> bool:
        return False


def rename_text(text: str, swap: NameSwap, keep: frozenset[str]) -> str | None:
    """What :class:`Renamer` does, done on source text token by token (several times faster than a
    libcst transform); None when the text has an f-string that needs renaming, which only the libcst
    path handles exactly."""
    if swap(text) == text:
        return text  # nothing of the old name anywhere
    offsets = [0]
    for line in text.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    edits: list[tuple[int, int, str]] = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            kind, value = token.type, token.string
            if kind == tokenize.NAME:
                new = value if value in keep else swap(value, identifier=True)
            elif kind == tokenize.STRING:
                prefix = value[: len(value) - len(value.lstrip("rRbBuUfF"))]
                if "f" in prefix.lower():
                    if swap(value) != value:
                        return None
                    continue
                new = swap(value)
            elif kind == tokenize.COMMENT:
                new = "" if _COPIED_FROM.search(value) else swap(value)
            elif kind == _FSTRING_MIDDLE:
                continue
            else:
                continue
            if new != value:
                (row, col), (end_row, end_col) = token.start, token.end
                edits.append((offsets[row - 1] + col, offsets[end_row - 1] + end_col, new))
    except (tokenize.TokenError, SyntaxError):
        return None
    for start, end, new in reversed(edits):
        text = text[:start] + new + text[end:]
    return text


def rename_node(
    node: cst.CSTNode, swap: NameSwap, *, only_text: bool = False, keep=frozenset()
) -> cst.CSTNode:
    if swap.is_identity:
        return node
    return node.visit(Renamer(swap, only_text=only_text, keep=keep))


def rename_sibling_import(statement: cst.CSTNode, swap: NameSwap, model_name: str, keep) -> cst.CSTNode:
    """``from .configuration_llama import LlamaConfig`` -> ``from .configuration_olmo2 import Olmo2Config``.

    Only imports of the parent's own sibling files (one leading dot) are renamed: they become imports of
    the files being generated. The file part always uses the model's real name, even when the classes
    use a longer prefix (``Emu3Text...`` still lives in ``modeling_emu3``).
    """

    def fix(node: cst.ImportFrom) -> cst.ImportFrom:
        if (
            len(node.relative) != 1
            or not isinstance(node.module, cst.Name)
            or isinstance(node.names, cst.ImportStar)
        ):
            return node
        match = _SIBLING_FILE.match(node.module.value)
        if match is None:
            return node
        names = [
            alias.with_changes(name=rename_node(alias.name, swap, keep=keep), asname=alias.asname)
            for alias in node.names
        ]
        return node.with_changes(module=cst.Name(f"{match.group(1)}_{model_name}"), names=names)

    if isinstance(statement, cst.SimpleStatementLine):
        return statement.with_changes(
            body=[fix(small) if isinstance(small, cst.ImportFrom) else small for small in statement.body]
        )
    if isinstance(statement, (cst.If, cst.Try)):
        body = [rename_sibling_import(inner, swap, model_name, keep) for inner in statement.body.body]
        return statement.with_changes(body=statement.body.with_changes(body=body))
    return statement


def _import_smalls(statement: cst.CSTNode) -> list[cst.Import | cst.ImportFrom]:
    """The import statements of a line, or of the lines directly inside an ``if``/``try`` block."""
    lines = statement.body.body if isinstance(statement, (cst.If, cst.Try)) else [statement]
    return [
        small
        for line in lines
        if isinstance(line, cst.SimpleStatementLine)
        for small in line.body
        if isinstance(small, (cst.Import, cst.ImportFrom))
    ]


def _bound_names(statement: cst.CSTNode) -> set[str]:
    names: set[str] = set()
    for small in _import_smalls(statement):
        if isinstance(small, cst.ImportFrom) and isinstance(small.names, cst.ImportStar):
            continue
        for alias in small.names:
            if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
                names.add(alias.asname.name.value)
            else:
                names.add(cst.Module([]).code_for_node(alias.name).split(".")[0])
    return names


def _is_sibling_import(statement: cst.CSTNode) -> bool:
    smalls = [s for s in _import_smalls(statement) if isinstance(s, cst.ImportFrom)]
    return bool(smalls) and all(
        len(s.relative) == 1 and isinstance(s.module, cst.Name) and _SIBLING_FILE.match(s.module.value)
        for s in smalls
    )


class ParentView:
    """A parent file seen through a rename: definitions are looked up by their new names."""

    def __init__(self, index: ModuleIndex, swap: NameSwap, model_name: str, provided: set[str] = frozenset()):
        """``provided``: names the modular file defines. A name imported from elsewhere keeps its
        spelling, unless the modular file defines its renamed form (``WavLMBaseModelOutput =
        Wav2Vec2BaseModelOutput``), which then takes over."""
        self.index = index
        self.swap = swap
        self.origin = index.origin
        kept: set[str] = set()
        for statement in index.imports:
            if not _is_sibling_import(statement):
                kept |= _bound_names(statement)
        # Top-level functions keep their names (`mamba2_chunk_scan` stays): they are shared helpers.
        kept |= {name for name, d in index.definitions.items() if d.kind == "function"}
        self.keep = frozenset(
            name
            for name in kept
            if swap(name, identifier=True) == name or swap(name, identifier=True) not in provided
        )
        self.by_new_name = {self._new(name): name for name in index.definitions}
        self.imports = [rename_sibling_import(s, swap, model_name, self.keep) for s in index.imports]
        self._renamed: dict[str, cst.CSTNode] = {}
        self._uses: dict[str, set[str]] = {}

    def _new(self, name: str) -> str:
        return name if name in self.keep else self.swap(name, identifier=True)

    def __contains__(self, new_name: str) -> bool:
        return new_name in self.by_new_name

    def meta(self, new_name: str) -> Definition:
        """The original (not yet renamed) definition behind ``new_name``: kind and position, no parsing."""
        return self.index.definitions[self.by_new_name[new_name]]

    def definition(self, new_name: str) -> Definition:
        old = self.index.definitions[self.by_new_name[new_name]]
        if new_name not in self._renamed:
            renamed_text = None
            if old.source is not None and not self.swap.is_identity:
                head, text = "", old.source
                if old.kind == "function":
                    # A function's decorators name external kernels (`"mamba_ssm"`): never renamed.
                    found = _DEF_LINE.search(text)
                    head, text = (text[: found.start()], text[found.start() :]) if found else ("", text)
                renamed = rename_text(text, self.swap, self.keep)
                renamed_text = head + renamed if renamed is not None else None
            if renamed_text is not None:
                self._renamed[new_name] = cst.parse_statement(renamed_text)
            else:
                self._renamed[new_name] = rename_node(old.node, self.swap, keep=self.keep)
        return Definition(new_name, old.kind, self._renamed[new_name], old.position, self.origin)

    def uses(self, new_name: str) -> set[str]:
        """What the renamed definition uses: the original's names, renamed the same way."""
        if new_name not in self._uses:
            old = self.by_new_name[new_name]
            self._uses[new_name] = {self._new(n) for n in self.index.uses(old)} - {new_name}
        return self._uses[new_name]
