"""The README and docs/ examples run, as written.

Per Markdown file, in order, in one fresh temporary working directory:
- fenced ```python blocks run in one shared namespace (```python no-run blocks are skipped);
- fenced ```console blocks run each line starting with ``$ `` in bash (the venv's bin first on PATH)
  and must exit 0;
- other fences (```json, ```text, ...) are illustrations and are not run.
Module docstrings with ``>>>`` examples run as doctests.
"""

from __future__ import annotations

import doctest
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)
DOCTEST_MODULES = ["splice.transforms", "splice.transforms.interleave", "splice.weightmap", "splice.weightmap.growth", "splice.weightmap.patterns", "splice.tensors"]


def blocks(path: Path) -> list[tuple[str, str, int]]:
    text = path.read_text()
    return [(m.group(1).strip(), m.group(2), text[: m.start()].count("\n") + 2) for m in FENCE.finditer(text)]


@pytest.mark.parametrize("path", DOCS, ids=[p.relative_to(ROOT).as_posix() for p in DOCS])
def test_markdown_examples_run(path, tmp_path, monkeypatch):
    runnable = [(info, code, line) for info, code, line in blocks(path) if info in ("python", "console")]
    if not runnable:
        pytest.skip(f"{path.name} has no runnable examples")
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    namespace: dict = {"__name__": "__docs__"}
    for info, code, line in runnable:
        where = f"{path.relative_to(ROOT)}:{line}"
        if info == "python":
            try:
                exec(compile(code, where, "exec"), namespace)
            except Exception as exc:
                raise AssertionError(
                    f"the python example at {where} failed: {type(exc).__name__}: {exc}"
                ) from exc
            continue
        for command in (ln[2:] for ln in code.splitlines() if ln.startswith("$ ")):
            result = subprocess.run(
                ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=600
            )
            assert result.returncode == 0, (
                f"{where}: `{command}` exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            )


@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
