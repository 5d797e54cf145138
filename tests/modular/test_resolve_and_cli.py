"""Parent resolution (relative and absolute), error messages with file:line, and the CLI."""

from __future__ import annotations

import argparse

import pytest
from modular_helpers import definitions, imports

from splice.cli import main
from splice.modular import ModularError, convert_file

PARENT = """
from torch import nn


class BaseBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)
"""

CHILD = """
from ..base.modeling_base import BaseBlock


class ChildBlock(BaseBlock):
    def forward(self, x):
        return super().forward(x)
"""


def test_relative_parent_in_a_user_package_tree(package):
    root = package({"models/base/modeling_base.py": PARENT, "models/child/modular_child.py": CHILD})
    found = definitions(convert_file(root / "models/child/modular_child.py")["modeling_child.py"])
    assert list(found) == ["ChildBlock"]
    assert "self.proj = nn.Linear(4, 4)" in found["ChildBlock"]


def test_relative_parent_two_levels_up(package):
    root = package(
        {
            "vendor/base/modeling_base.py": PARENT,
            "models/child/modular_child.py": CHILD.replace(
                "..base.modeling_base", "...vendor.base.modeling_base"
            ),
        }
    )
    found = definitions(convert_file(root / "models/child/modular_child.py")["modeling_child.py"])
    assert "self.proj = nn.Linear(4, 4)" in found["ChildBlock"]


PARENT_WITH_HELPER = """
from torch import nn

from ...utils import scale


class BaseBlock(nn.Module):
    def forward(self, x):
        return scale(x)
"""


def test_parent_relative_import_kept_when_it_reaches_the_same_module(package):
    # The transformers layout: `...utils` from models/base and from models/child is the same module.
    root = package(
        {
            "utils.py": "",
            "models/base/modeling_base.py": PARENT_WITH_HELPER,
            "models/child/modular_child.py": CHILD,
        }
    )
    out = convert_file(root / "models/child/modular_child.py")["modeling_child.py"]
    assert "from ...utils import scale" in imports(out)


def test_parent_relative_import_made_absolute_for_another_depth(package):
    root = package(
        {
            "utils.py": "",
            "models/base/modeling_base.py": PARENT_WITH_HELPER,
            "deep/a/b/modular_deep.py": CHILD.replace(
                "..base.modeling_base", "....models.base.modeling_base"
            ),
        }
    )
    out = convert_file(root / "deep/a/b/modular_deep.py")["modeling_deep.py"]
    assert "from mypkg.utils import scale" in imports(out)
    assert not any(line.startswith("from .") for line in imports(out))


def test_parent_relative_imports_of_transformers_become_absolute_outside_it(package):
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    root = package(
        {
            "models/foo/modular_foo.py": """
                from transformers.models.llama.modeling_llama import LlamaMLP


                class FooMLP(LlamaMLP):
                    pass
                """
        }
    )
    found = imports(convert_file(root / "models/foo/modular_foo.py")["modeling_foo.py"])
    assert "from transformers.activations import ACT2FN" in found
    assert not any(line.startswith("from .") for line in found)


def test_absolute_parent_from_an_importable_package(package, monkeypatch):
    # The parent package is on sys.path but never imported: its source is located, not executed.
    installed = package(
        {"models/base/modeling_base.py": PARENT + "\nraise RuntimeError('executed')\n"}, name="thirdparty"
    )
    monkeypatch.syspath_prepend(str(installed.parent))
    root = package(
        {
            "models/child/modular_child.py": CHILD.replace(
                "..base.modeling_base", "thirdparty.models.base.modeling_base"
            ),
        }
    )
    found = definitions(convert_file(root / "models/child/modular_child.py")["modeling_child.py"])
    assert "self.proj = nn.Linear(4, 4)" in found["ChildBlock"]


def test_parent_from_installed_transformers():
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "modular_tiny.py"
        path.write_text(
            "from transformers.models.llama.modeling_llama import LlamaMLP\n\n\n"
            "class TinyMLP(LlamaMLP):\n    pass\n",
            encoding="utf-8",
        )
        out = convert_file(path)
    mlp = definitions(out["modeling_tiny.py"])["TinyMLP"]
    assert "self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)" in mlp
    assert "from .configuration_tiny import TinyConfig" not in imports(out["modeling_tiny.py"])  # unused here


def test_missing_parent_names_the_import_and_line(package):
    root = package({"models/child/modular_child.py": "import torch\n\n" + CHILD.lstrip()})
    with pytest.raises(ModularError) as info:
        convert_file(root / "models/child/modular_child.py")
    message = str(info.value)
    assert message.endswith(
        "modular_child.py:3: cannot find the source of `..base.modeling_base`: it is "
        "neither an installed package nor a file of this package tree"
    )


def test_syntax_error_is_reported_with_file_and_line(package):
    root = package({"models/child/modular_child.py": "class Broken(:\n    pass\n"})
    with pytest.raises(ModularError, match=r"modular_child\.py:1: not valid Python"):
        convert_file(root / "models/child/modular_child.py")


def test_unknown_parent_class_is_an_error_not_a_traceback(package):
    root = package(
        {
            "models/base/modeling_base.py": PARENT,
            "models/child/modular_child.py": CHILD.replace("BaseBlock", "BaseMissing"),
        }
    )
    with pytest.raises(
        ModularError, match=r"modular_child\.py:4: BaseMissing is not a class of modeling_base\.py"
    ):
        convert_file(root / "models/child/modular_child.py")


# -- the CLI -----------------------------------------------------------------------------------------


@pytest.fixture
def child(package):
    root = package({"models/base/modeling_base.py": PARENT, "models/child/modular_child.py": CHILD})
    return root / "models/child/modular_child.py"


def test_cli_writes_beside_the_modular_file_then_check_passes(child, capsys):
    assert main(["modular", str(child)]) == 0
    written = child.with_name("modeling_child.py")
    assert "class ChildBlock(nn.Module):" in written.read_text(encoding="utf-8")
    assert "1 file(s) written" in capsys.readouterr().out
    assert main(["modular", str(child), "--check"]) == 0
    assert "all generated files are up to date" in capsys.readouterr().out


def test_cli_check_reports_stale_files_with_a_diff(child, capsys):
    assert main(["modular", str(child)]) == 0
    generated = child.with_name("modeling_child.py")
    generated.write_text(generated.read_text(encoding="utf-8").replace("nn.Linear(4, 4)", "nn.Linear(4, 8)"))
    capsys.readouterr()
    assert main(["modular", str(child), "--check"]) == 1
    captured = capsys.readouterr()
    assert "-        self.proj = nn.Linear(4, 8)" in captured.out
    assert "+        self.proj = nn.Linear(4, 4)" in captured.out
    assert "1 generated file(s) are stale" in captured.err
    # --check wrote nothing
    assert "nn.Linear(4, 8)" in generated.read_text(encoding="utf-8")


def test_cli_check_on_missing_output_is_stale(child, capsys):
    assert main(["modular", str(child), "--check"]) == 1
    assert "modeling_child.py (missing)" in capsys.readouterr().out


def test_cli_output_dir_and_folder_input_with_jobs(child, tmp_path, capsys):
    out_dir = tmp_path / "generated"
    assert main(["modular", str(child.parent.parent), "--output-dir", str(out_dir), "--jobs", "2"]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["modeling_child.py"]
    assert not child.with_name("modeling_child.py").exists()


def test_cli_unsupported_input_exits_2_with_file_line(package, capsys):
    root = package(
        {
            "models/base/modeling_base.py": PARENT + "\n\nclass BaseOther(nn.Module):\n    pass\n",
            "models/child/modular_child.py": """
            from ..base.modeling_base import BaseBlock, BaseOther


            class ChildBoth(BaseBlock, BaseOther):
                pass
        """,
        }
    )
    assert main(["modular", str(root / "models/child/modular_child.py")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splice modular: error: ")
    assert "modular_child.py:4: class ChildBoth inherits from more than one model-specific class" in err
    assert "Traceback" not in err


def test_cli_rejects_a_file_that_is_not_modular(tmp_path, capsys):
    other = tmp_path / "modeling_x.py"
    other.write_text("x = 1\n")
    assert main(["modular", str(other)]) == 2
    assert "expected a modular_<model>.py file" in capsys.readouterr().err


def test_run_validates_jobs(child):
    from splice.modular.cli import run

    args = argparse.Namespace(paths=[str(child)], output_dir=None, check=False, jobs=0)
    with pytest.raises(ModularError, match="--jobs must be at least 1, got 0"):
        run(args)


def test_output_without_ruff_is_the_same_code(child, monkeypatch):
    import ast

    from splice.modular import emit

    formatted = convert_file(child)["modeling_child.py"]
    emit.ruff_executable.cache_clear()
    monkeypatch.setattr(emit, "ruff_executable", lambda: None)
    plain = convert_file(child)["modeling_child.py"]
    assert ast.dump(ast.parse(plain)) == ast.dump(ast.parse(formatted))
    assert plain.startswith("#                🚨")


def test_cli_relays_warnings_from_worker_processes(package, capsys):
    root = package(
        {
            "models/base/modeling_base.py": PARENT + "\n\nclass BaseOther(nn.Module):\n    pass\n",
            "models/child/modular_child.py": """
            from ..base.modeling_base import BaseBlock, BaseOther

            class ChildTextBlock(BaseBlock):
                pass

            class ChildOther(BaseOther):
                pass
        """,
            "models/other/modular_other.py": CHILD.replace("ChildBlock", "OtherBlock"),
        }
    )
    assert main(["modular", str(root / "models"), "--jobs", "2"]) == 0
    err = capsys.readouterr().err
    assert "splice modular: warning: " in err
    assert "use several prefixes (Child, ChildText)" in err
    assert (root / "models/other/modeling_other.py").is_file()


def test_cli_refuses_two_inputs_generating_the_same_file_before_writing(package, tmp_path, capsys):
    first = package({"x/modular_child.py": "class ChildA:\n    pass\n"}, name="one")
    second = package({"x/modular_child.py": "class ChildB:\n    pass\n"}, name="two")
    out_dir = tmp_path / "out"
    assert main(["modular", str(first), str(second), "--output-dir", str(out_dir)]) == 2
    error = capsys.readouterr().err
    assert "one/x/modular_child.py and " in error and "two/x/modular_child.py both generate" in error
    assert not out_dir.exists()


def test_cli_output_dir_that_is_a_file_is_a_one_line_error(child, tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("")
    assert main(["modular", str(child), "--output-dir", str(a_file)]) == 2
    error = capsys.readouterr().err
    assert error.strip().endswith("afile: --output-dir must be a folder, and this is a file")
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1


def test_cli_check_into_a_closed_pipe_stops_quietly(child, tmp_path, monkeypatch, capsys):
    class ClosedPipe:
        def __init__(self):
            self.sink = (tmp_path / "sink").open("w")

        def write(self, text):
            raise BrokenPipeError

        writelines = write

        def flush(self):
            pass

        def fileno(self):
            return self.sink.fileno()

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["modular", str(child), "--check"]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_non_utf8_modular_file_is_a_user_error(package):
    root = package({"models/child/modular_child.py": ""})
    path = root / "models/child/modular_child.py"
    path.write_bytes("# caf\xe9\nclass ChildBlock:\n    pass\n".encode("latin-1"))
    with pytest.raises(ModularError, match=r"modular_child\.py: not UTF-8 \(byte 0xe9 at offset 5\)"):
        convert_file(path)
