"""Converting one modular file into its generated files.

The modular file's classes are visited in order. A class with a model-specific base (a class imported
from another model's file) is merged into that base's renamed code; any other class is copied as is.
What a class then uses and the modular file does not define -- classes, functions, constants -- is
pulled from the parent file it came from (renamed, recursively, dependencies before their users).
Each class goes to the file its name's suffix asks for; a use across files becomes an import.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from splice.modular.emit import format_code, render
from splice.modular.errors import ModularError
from splice.modular.imports import needed_imports, reanchor
from splice.modular.index import UNNAMED, Definition, ModuleIndex, names_used
from splice.modular.merge import merge_class
from splice.modular.names import NameBook, NameSwap, config_mapping
from splice.modular.parents import ParentImport, choose_prefix, find_parent_imports, prefix_of, specific_base
from splice.modular.rename import ParentView
from splice.modular.resolve import find_all, load_index, package_of, parse_file, read_source
from splice.modular.split import FILE_TYPE_ORDER, MODULAR_NAME, file_type, output_name, split_all

logger = logging.getLogger("splice.modular")

# Top-level constants the modular file always wins on; `*_DOCSTRING = None` means "keep the parent's".
_DOCSTRING_CONSTANT = re.compile(r"_DOCSTRING$")
# Kept at the top of a file whatever uses them first.
_FIRST = ("logger", "_CHECKPOINT_FOR_DOC", "_CONFIG_FOR_DOC")
# Module-level hooks that no class uses but the module needs.
_MODULE_HOOKS = ("__getattr__", "__dir__")


@dataclass
class _Output:
    kind: str
    definitions: dict[str, Definition] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    copies: set[str] = field(default_factory=set)  # classes of another file defined here again
    cross_imports: dict[str, list[str]] = field(default_factory=dict)  # kind -> class names
    uses: set[str] = field(default_factory=set)  # every name the file's definitions read


class Conversion:
    """All the state of converting one modular file; use :func:`convert_file`."""

    def __init__(self, path: Path):
        self.path = path.resolve()
        match = MODULAR_NAME.match(self.path.name)
        if match is None:
            raise ModularError("a modular file must be named modular_<model>.py", path)
        self.model_name = match["model"]
        self.module = parse_file(self.path)
        self.source = read_source(self.path)
        self.index = ModuleIndex.build(self.module, str(self.path))
        self.package = package_of(self.path)  # where the generated files live, for relative imports
        self.book = _name_book(self.path.parent.parent)
        self.cased_name = self._cased(self.model_name, self.index.class_names)
        self.imported: dict[str, ParentImport] = {}
        self.views: dict[Path, ParentView] = {}
        self.outputs: dict[str, _Output] = {}
        self._lines: dict[cst.CSTNode, int] | None = None
        self._flattened: dict[str, tuple[Definition, set[str], ParentView | None]] = {}
        self._codes: dict[int, tuple[cst.CSTNode, str]] = {}
        self._explicit: dict[str, bool] = {}

    # -- names -------------------------------------------------------------------------------------
    def _cased(self, snake: str, hints: set[str]) -> str:
        return self.book.cased(snake, hints)

    def _snake(self, cased: str) -> str:
        return self.book.snake(cased)

    def line_of(self, node: cst.CSTNode) -> int | None:
        if self._lines is None:
            wrapper = MetadataWrapper(self.module, unsafe_skip_copy=True)
            self._lines = {n: p.start.line for n, p in wrapper.resolve(PositionProvider).items()}
        return self._lines.get(node)

    def _note(self, node: cst.CSTNode, message: str) -> None:
        """A debug-level note: corpus files rely on these behaviours on purpose."""
        if logger.isEnabledFor(logging.DEBUG):
            line = self.line_of(node)
            logger.debug("%s%s: %s", self.path, f":{line}" if line else "", message)

    def error(self, message: str, node: cst.CSTNode | None = None) -> ModularError:
        return ModularError(message, self.path, self.line_of(node) if node is not None else None)

    # -- parents -----------------------------------------------------------------------------------
    def _specific_base(self, node: cst.ClassDef) -> str | None:
        return specific_base(node, self.imported, self.error)

    def build_views(self) -> None:
        """One renamed view per parent file, with the prefix its inheriting classes agree on."""
        votes: dict[Path, Counter[str]] = {}
        for definition in self.index.definitions.values():
            if definition.kind != "class":
                continue
            base = self._specific_base(definition.node)
            if base is None:
                continue
            source = self.imported[base]
            prefix = prefix_of(definition.name, source.name, self._parent_cased(source.path), self.cased_name)
            votes.setdefault(source.path, Counter())[prefix] += 1
        for source in self.imported.values():
            if source.path not in self.views:
                self.views[source.path] = self._view(source.path, votes.get(source.path, Counter()))

    def _parent_cased(self, path: Path) -> str:
        return self._cased(path.parent.name, load_index(path).class_names)

    def _view(self, path: Path, prefixes: Counter[str]) -> ParentView:
        index = load_index(path)
        old_snake = path.parent.name
        old_cased = self._parent_cased(path)
        chosen = choose_prefix(self.path, path, prefixes, self.cased_name, old_cased, index.class_names)
        new_snake = self._snake(chosen) if chosen != self.cased_name else self.model_name
        swap = NameSwap(old_snake, new_snake, old_cased, chosen)
        view = ParentView(index, swap, self.model_name, set(self.index.definitions))
        parent_package = package_of(path)
        view.imports = [reanchor(statement, parent_package, self.package) for statement in view.imports]
        return view

    def _doc_swap(self, old_cased: str, new_cased: str) -> NameSwap | None:
        old_snake, new_snake = self._snake(old_cased), self._snake(new_cased)
        if not old_snake:
            return None
        return NameSwap(old_snake, new_snake, self._cased(old_snake, set()), self._cased(new_snake, set()))

    # -- lookups -----------------------------------------------------------------------------------
    def _locate(self, name: str, context: ParentView | None) -> tuple[ParentView | None, str] | None:
        """Where ``name`` is defined for code in ``context``: ``(None, name)`` for the modular file, else
        ``(view, name in that view)``. The modular file wins, then what it imports, then the parent."""
        definition = self.index.definitions.get(name)
        if definition is not None and name != "__all__":
            if definition.kind == "assignment" and _DOCSTRING_CONSTANT.search(name):
                value = getattr(definition.node.body[0], "value", None)
                if isinstance(value, cst.Name) and value.value == "None":
                    for view in self.views.values():
                        if name in view:
                            return view, name
            return None, name
        if name in self.imported:
            source = self.imported[name]
            view = self.views[source.path]
            if name in view and view._new(source.name) == name:
                return view, name
            if source.name in view and view.meta(source.name).kind != "class":
                return view, source.name
            return None
        if context is not None and name in context:
            return context, name
        return None

    def _meta(self, view: ParentView | None, key: str) -> Definition:
        return self.index.definitions[key] if view is None else view.meta(key)

    def _order(self, name: str, context: ParentView | None) -> tuple:
        found = self._locate(name, context)
        if found is None:
            return (2, 0, name)
        view, key = found
        return (0 if view is not None else 1, self._meta(view, key).position, name)

    def require(self, out: _Output, name: str, context: ParentView | None) -> None:
        if name in out.definitions or name in out.pending:
            return
        found = self._locate(name, context)
        if found is None:
            return
        view, key = found
        if self._meta(view, key).kind == "class":
            kind = file_type(name, self.cased_name)
            if kind != out.kind and _copied_across(name, out.kind):
                out.copies.add(name)
            elif kind != out.kind:
                out.cross_imports.setdefault(kind, [])
                if name not in out.cross_imports[kind]:
                    out.cross_imports[kind].append(name)
                return
            if view is None and name not in out.copies:
                return  # a modular class: emitted in its own turn
        if view is None and self.index.definitions[key].kind == "class":
            self.add(out, *self._flatten(self.index.definitions[key]))
        elif view is None:
            self.add(out, self.index.definitions[key], self.index.uses(key), None)
        else:
            self.add(out, view.definition(key), view.uses(key), view)

    def add(self, out: _Output, definition: Definition, uses: set[str], context: ParentView | None) -> None:
        out.pending.add(definition.name)
        for dependency in sorted(uses - {definition.name}, key=lambda n: self._order(n, context)):
            self.require(out, dependency, context)
        out.definitions[definition.name] = definition
        out.uses |= uses

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> dict[str, str]:
        self._check_syntax_version()
        self.imported = find_parent_imports(self.index, self.path, self.error)
        self.build_views()
        all_per_file: dict[str, cst.SimpleStatementLine] = {}
        for definition in self.index.definitions.values():
            if definition.name == "__all__":
                all_per_file = split_all(definition.node, self.cased_name)
            elif definition.kind == "class":
                self._convert_class(definition)
        for name in _MODULE_HOOKS:
            if name in self.index.definitions:
                self._place_hook(self.index.definitions[name])
        self._keep_own_definitions(all_per_file)
        return self._render(all_per_file)

    def _check_syntax_version(self) -> None:
        """Which names a definition uses comes from CPython's parser: it must read the file's syntax."""
        if sys.version_info >= (3, 12):
            return
        for statement in self.module.body:
            smalls = statement.body if isinstance(statement, cst.SimpleStatementLine) else ()
            if any(isinstance(small, cst.TypeAlias) for small in smalls) or getattr(
                statement, "type_parameters", None
            ):
                raise self.error(
                    "PEP 695 type parameters (`class X[T]`, `type X = ...`) need Python 3.12 or later "
                    f"to flatten; this is Python {sys.version_info.major}.{sys.version_info.minor}",
                    statement,
                )

    def _keep_own_definitions(self, all_per_file: dict[str, cst.SimpleStatementLine]) -> None:
        """What the modular file writes for its own sake, even if no class uses it: the names its
        ``__all__`` exports, and top-level statements that bind no name (``REGISTRY["x"] = f``)."""
        for kind, statement in all_per_file.items():
            for element in statement.body[0].value.elements:
                name = element.value.evaluated_value
                definition = self.index.definitions.get(name)
                if definition is not None and definition.kind != "class":
                    self.require(self.outputs.setdefault(kind, _Output(kind)), name, None)
        for name, definition in self.index.definitions.items():
            if definition.kind == "statement" and name == UNNAMED.format(position=definition.position):
                self.require(self.outputs.setdefault("modeling", _Output("modeling")), name, None)

    def _place_hook(self, definition: Definition) -> None:
        """A module ``__getattr__`` goes with the classes it names (it serves their old names)."""
        named = [
            s.evaluated_value for s in find_all(definition.node, lambda n: isinstance(n, cst.SimpleString))
        ]
        named += sorted(self.index.uses(definition.name), key=lambda n: self._order(n, None))
        kinds = [
            file_type(n, self.cased_name)
            for n in named
            if isinstance(n, str)
            and n.isidentifier()
            and n[:1].isupper()
            and (n.startswith(self.cased_name) or n in self.index.definitions)
        ]
        kind = kinds[0] if kinds else "modeling"
        self.add(
            self.outputs.setdefault(kind, _Output(kind)), definition, self.index.uses(definition.name), None
        )

    def _flatten(self, definition: Definition) -> tuple[Definition, set[str], ParentView | None]:
        """A modular class merged into its parent (once), with the names it uses and their context."""
        if definition.name in self._flattened:
            return self._flattened[definition.name]
        node: cst.ClassDef = definition.node
        base = self._specific_base(node)
        context = None
        if base is not None:
            source = self.imported[base]
            context = self.views[source.path]
            parent_name = context._new(source.name)
            if parent_name not in context or context.meta(parent_name).kind != "class":
                raise self.error(f"{base} is not a class of {source.path.name}", node)
            node = merge_class(
                node,
                context.definition(parent_name).node,
                base,
                self._doc_swap,
                self._note,
                self._explicit_calls,
            )
        merged = Definition(definition.name, "class", node, definition.position, str(self.path))
        uses = names_used(node, self._code(node)) if base is not None else self.index.uses(definition.name)
        self._flattened[definition.name] = (merged, uses, context)
        return self._flattened[definition.name]

    def _convert_class(self, definition: Definition) -> None:
        kind = file_type(definition.name, self.cased_name)
        self.add(self.outputs.setdefault(kind, _Output(kind)), *self._flatten(definition))

    def _explicit_calls(self, method: str) -> bool:
        """Whether the modular source has a ``Base.<method>(`` call anywhere (else no need to look)."""
        if method not in self._explicit:
            pattern = re.compile(rf"[A-Z][\w.]*\.{re.escape(method)}\s*\(")
            self._explicit[method] = pattern.search(self.source) is not None
        return self._explicit[method]

    def _code(self, node: cst.CSTNode) -> str:
        """A top-level node's code, rendered once."""
        key = id(node)
        if key not in self._codes:
            self._codes[key] = (node, _RENDER.code_for_node(node))
        return self._codes[key][1]

    def _render(self, all_per_file: dict[str, cst.SimpleStatementLine]) -> dict[str, str]:
        license_header = cst.Module(body=[], header=self.module.header).code
        pool = list(self.index.imports)
        for view in self.views.values():
            pool.extend(view.imports)
        results: dict[str, str] = {}
        for kind in sorted(
            self.outputs, key=lambda k: (FILE_TYPE_ORDER.index(k) if k in FILE_TYPE_ORDER else 99, k)
        ):
            out = self.outputs[kind]
            # One statement binding several names is indexed under each of them: emit it once.
            unique: dict[int, Definition] = {}
            for definition in out.definitions.values():
                unique.setdefault(id(definition.node), definition)
            definitions = sorted(unique.values(), key=lambda d: 0 if d.name in _FIRST else 1)
            body = [_spaced(self._code(d.node)) for d in definitions]
            if kind in all_per_file:
                body.append("\n\n" + self._code(all_per_file[kind]))
            extra = [
                cst.parse_statement(
                    f"from .{output_name(other, self.model_name)[:-3]} import {', '.join(names)}"
                )
                for other, names in out.cross_imports.items()
            ]
            imports = needed_imports(pool + extra, out.uses, set(out.definitions))
            target = self.path.with_name(output_name(kind, self.model_name))
            results[target.name] = format_code(render(self.path, license_header, imports, body), target)
        return results


@functools.lru_cache(maxsize=8)
def _name_book(models_dir: Path) -> NameBook:
    return NameBook(config_mapping(models_dir))


def _copied_across(class_name: str, kind: str) -> bool:
    """The PIL image processor must import without torchvision, so it gets its own copy of the kwargs."""
    return kind == "image_processing_pil" and class_name.endswith("ImageProcessorKwargs")


def _spaced(code: str) -> str:
    """Two blank lines before every top-level definition, whatever it had in its source."""
    lines = code.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n\n" + "\n".join(lines)


_RENDER = cst.Module([])


def convert_file(path: str | Path) -> dict[str, str]:
    """``{"modeling_x.py": source, ...}`` for the modular file at ``path`` (nothing is written)."""
    try:
        return Conversion(Path(path)).run()
    except ModularError:
        raise
    except RecursionError:
        raise ModularError("the inheritance or dependency graph is too deep to flatten", path) from None
    except (cst.CSTValidationError, cst.ParserSyntaxError, SyntaxError) as exc:
        # Code the converter produced or read did not hold together: say where, not how.
        raise ModularError(
            f"cannot flatten this file ({type(exc).__name__}: {exc}); please report it", path
        ) from exc
