"""Comparing the converter's output with the generated files transformers ships, definition by definition.

A definition is a top-level class, function or assignment. Two are identical when their ASTs are
(formatting, comments and import layout do not count). Run directly for a full report:

    python tests/modular/modular_corpus.py [--jobs 2] [--show N] [modular files...]
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "This file was automatically generated from "


def corpus_root() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "models"


def modular_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/modular_*.py"))


def shipped_outputs(modular: Path) -> dict[str, str]:
    """The files beside ``modular`` whose header says they were generated from it."""
    found = {}
    needle = f"{MARKER}src/transformers/models/{modular.parent.name}/{modular.name}."
    for candidate in sorted(modular.parent.glob("*.py")):
        if candidate == modular:
            continue
        text = candidate.read_text(encoding="utf-8")
        if needle in text[:2000]:
            found[candidate.name] = text
    return found


def definitions(source: str) -> dict[str, str]:
    """``name -> ast dump`` of every top-level class, function and simply-named assignment."""
    result = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            result[node.name] = ast.dump(node)
        elif (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ):
            result[node.targets[0].id] = ast.dump(node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            result[node.target.id] = ast.dump(node)
    return result


@dataclass
class FileReport:
    modular: str
    error: str | None = None
    total: int = 0
    identical: int = 0
    files_identical: int = 0
    files_total: int = 0
    mismatches: list[tuple[str, str, str]] = field(default_factory=list)  # (file, name, why)


def compare(modular: Path) -> FileReport:
    from splice.modular import convert_file

    report = FileReport(str(modular))
    shipped = shipped_outputs(modular)
    try:
        generated = convert_file(modular)
    except Exception as exc:  # the report counts crashes as mismatches of every shipped definition
        report.error = f"{type(exc).__name__}: {exc}"
        generated = {}
    for name in sorted(set(shipped) | set(generated)):
        ours = definitions(generated[name]) if name in generated else {}
        theirs = definitions(shipped[name]) if name in shipped else {}
        report.files_total += 1
        same_file = True
        for key in sorted(set(ours) | set(theirs)):
            report.total += 1
            if key in ours and key in theirs and ours[key] == theirs[key]:
                report.identical += 1
                continue
            same_file = False
            why = "missing" if key not in ours else "extra" if key not in theirs else "differs"
            report.mismatches.append((name, key, why))
        report.files_identical += same_file
    return report


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="*")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--show", type=int, default=40)
    args = parser.parse_args(argv)
    files = [Path(f) for f in args.files] or modular_files(corpus_root())
    with ProcessPoolExecutor(args.jobs) as pool:
        reports = list(pool.map(compare, files, chunksize=4))
    total = sum(r.total for r in reports)
    identical = sum(r.identical for r in reports)
    files_total = sum(r.files_total for r in reports)
    files_identical = sum(r.files_identical for r in reports)
    kinds = Counter(why for r in reports for _, _, why in r.mismatches)
    errors = [r for r in reports if r.error]
    for r in errors:
        print("ERROR", r.modular, r.error[:300])
    shown = 0
    for r in sorted(reports, key=lambda r: -len(r.mismatches)):
        for file, key, why in r.mismatches:
            if shown < args.show:
                print(f"  {why:8} {Path(r.modular).parent.name}/{file}::{key}")
                shown += 1
    print(f"definitions identical: {identical}/{total} = {100 * identical / max(total, 1):.2f}%")
    print(
        f"generated files identical: {files_identical}/{files_total}; modular files: {len(reports)}; errors: {len(errors)}"
    )
    print("mismatch kinds:", dict(kinds))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    sys.exit(main(sys.argv[1:]))
