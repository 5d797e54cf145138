"""The README and docs/ examples run, as written.

Per Markdown file, in order, in one fresh temporary working directory:
- fenced ```python blocks run in one shared namespace (```python no-run blocks are skipped);
- fenced ```console blocks run each line starting with ``$ `` in bash (the venv's bin first on PATH)
  and must exit 0;
- other fences (```json, ```text, ...) are illustrations and are not run.
Every module of ``src/splice`` with ``>>>`` examples runs them as doctests.
"""

from __future__ import annotations

import doctest
import importlib
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)
SRC = ROOT / "src" / "splice"
DOCTEST_MODULES = sorted(
    ".".join(("splice", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
    for path in SRC.rglob("*.py")
    if ">>>" in path.read_text()
)


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
            result = _run(command, env)
            if result.returncode != 0 and _rank_aborted(command, result):
                message = f"{where}: a rank of `{command}` aborted at exit (pytorch#190489); ran it again:\n"
                warnings.warn(message + result.stderr, stacklevel=2)
                result = _run(command, env)
            assert result.returncode == 0, (
                f"{where}: `{command}` exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
            )


def _run(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=600)


TORCH_EXIT_ABORT = "terminate called without an active exception"


def _rank_aborted(command: str, result: subprocess.CompletedProcess) -> bool:
    """A torchrun rank that died of torch's abort at interpreter exit: retried once, with a warning.

    With DTensor, ``destroy_process_group()`` leaves gloo's threads alive (DeviceMesh and DTensor caches hold
    the group; torch 2.13 has no gloo shutdown); a worker thread still holding an AsyncWork whose tensors
    have Python references takes the GIL while Python finalizes, and the process aborts with exactly
    TORCH_EXIT_ABORT (pytorch/pytorch#190489; the atexit fix pytorch/pytorch#179291 was abandoned). It hit
    CI in 2 of about 5 runs and never in 44 local ones. Only that message is retried, and only once; any
    other failure, or a second abort, fails the test. (faulthandler is left off: dumping stacks during
    finalization turned the abort into a segfault.)
    """
    return command.startswith("torchrun") and TORCH_EXIT_ABORT in result.stderr


def test_every_module_with_examples_is_collected():
    assert {"splice.weightmap", "splice.weightmap.growth", "splice.tensors", "splice.transforms"} <= set(
        DOCTEST_MODULES
    )


@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples(module):
    """Every ``>>>`` in the source runs, except those marked ``+SKIP`` (and modules whose optional extra is absent)."""
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "splice":
            raise
        pytest.skip(f"{module} needs {exc.name}, which is not installed")
    examples = [e for test in doctest.DocTestFinder().find(imported) for e in test.examples]
    runnable = [e for e in examples if not e.options.get(doctest.SKIP)]
    assert examples, f"{module} has '>>>' outside any docstring doctest finds"
    result = doctest.testmod(imported, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted == len(runnable)


def test_only_torchs_abort_at_exit_of_a_torchrun_example_is_retried():
    def result(stderr: str) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(["bash"], 1, "", stderr)

    assert _rank_aborted(
        "torchrun --nproc-per-node 2 x.py", result(f"...\n{TORCH_EXIT_ABORT}\nFatal Python error")
    )
    assert not _rank_aborted("torchrun --nproc-per-node 2 x.py", result("AssertionError: logits differ"))
    assert not _rank_aborted("splice consolidate a b", result(TORCH_EXIT_ABORT))
