"""Source files libcst cannot parse safely: refused at file:line with exit 2, never a crash or a stall.

Each case runs the CLI in a fresh process, so a segfault inside libcst's native parser (exit 139)
would show as such instead of killing the test run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from splice.modular import ModularError, convert_file
from splice.modular.resolve import MAX_NESTING

SRC = str(Path(__file__).resolve().parents[2] / "src")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = "import sys; from splice.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize(
    ("source", "line", "reason"),
    [
        ("x = 1\ny = " + "(" * 5000 + "1" + ")" * 5000 + "\n", 2, "not valid Python: too many nested parentheses"),
        ("x = 1\ny = " + "+".join(["1"] * 3000) + "\n", 2, "nested too deeply for Python's parser"),
        ("x = 1\n\ny = " + "+".join(["1"] * 300) + "\n", 3, f"nested more than {MAX_NESTING} levels deep"),
        ("y = f" + "(1)" * 3000 + "\n", 1, "nested too deeply"),
        ("def f():\n    return a" + ".b" * 3000 + "\n", 2, "nested too deeply"),
    ],
    ids=["5000-parentheses", "3000-additions", "300-additions", "3000-calls", "3000-attributes"],
)  # fmt: skip
def test_deeply_nested_code_is_an_error_at_file_and_line_not_a_crash(tmp_path, source, line, reason):
    path = tmp_path / "modular_bomb.py"
    path.write_text(source)
    result = run_cli("modular", str(path))
    assert result.returncode == 2, (result.returncode, result.stderr[-500:])
    err = result.stderr
    assert err.startswith("splice modular: error: ") and err.count("\n") == 1, err
    assert f"{path.resolve()}:{line}: {reason}" in err
    assert not (tmp_path / "modeling_bomb.py").exists()


def test_a_parent_file_nested_too_deeply_is_refused_too(package):
    root = package(
        {
            "models/base/modeling_base.py": "X = "
            + "+".join(["1"] * 500)
            + "\n\nclass BaseBlock:\n    pass\n",
            "models/child/modular_child.py": "from ..base.modeling_base import BaseBlock\n\n\nclass ChildBlock(BaseBlock):\n    pass\n",
        }
    )
    with pytest.raises(
        ModularError, match=rf"modeling_base\.py:1: nested more than {MAX_NESTING} levels deep"
    ):
        convert_file(root / "models/child/modular_child.py")


def test_real_code_nests_far_below_the_limit():
    """The limit leaves room: transformers' deepest modeling file nests about 25 levels."""
    transformers = pytest.importorskip("transformers")
    from splice.modular.resolve import check_source

    folder = Path(transformers.__file__).parent / "models"
    for name in (
        "llama/modeling_llama.py",
        "clvp/modeling_clvp.py",
        "qwen3_omni_moe/modular_qwen3_omni_moe.py",
    ):
        path = folder / name
        if path.is_file():
            check_source(path.read_text(encoding="utf-8"), path)


def test_syntax_newer_than_this_python_is_left_to_libcst_only_when_its_tokens_are_tame(tmp_path):
    """On 3.11 ``class X[T]`` is a SyntaxError for ``ast`` and fine for libcst: the token check guards that path."""
    path = tmp_path / "modular_bomb.py"
    path.write_text("class X[T]:\n    pass\n\n\ny = " + "(" * 5000 + "1" + ")" * 5000 + "\n")
    result = run_cli("modular", str(path))
    assert result.returncode == 2, (result.returncode, result.stderr[-500:])
    assert f"{path.resolve()}:5: " in result.stderr and "nested" in result.stderr
