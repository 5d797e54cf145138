"""``import splice`` is lazy (PEP 562): torch and transformers load on first use of a name that needs them,
so ``splice modular`` starts without them. Each check runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import splice

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch", "transformers", "safetensors", "numpy", "libcst")


def fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints a JSON value, which is returned."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


LOADED = f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"


def test_import_splice_loads_neither_torch_nor_transformers():
    assert fresh(f"import json, sys, splice\n{LOADED}") == []
    assert fresh(f"import json, sys\nfrom splice import SpliceError, CheckpointError\n{LOADED}") == []


def test_the_modular_cli_never_imports_torch(tmp_path):
    modular = tmp_path / "modular_tiny.py"
    modular.write_text("import torch.nn as nn\n\n\nclass TinyMLP(nn.Module):\n    pass\n")
    code = (
        "import json, sys\nfrom splice.cli import main\n"
        f"assert main(['modular', {str(modular)!r}, '--output-dir', {str(tmp_path / 'out')!r}]) == 0\n{LOADED}"
    )
    assert fresh(code) == ["libcst"]
    assert "class TinyMLP(nn.Module):" in (tmp_path / "out" / "modeling_tiny.py").read_text()


def test_every_public_name_resolves_as_documented():
    names = fresh(
        "import json, splice\n"
        "from splice import fuse, WeightMap, Rule, FusionReport, ModuleFusionSpec, from_pretrained\n"
        "import splice.fusion, splice.weightmap, splice.hf\n"
        "same = [fuse is splice.fusion.fuse, WeightMap is splice.weightmap.WeightMap,\n"
        "        splice.from_pretrained is splice.hf.from_pretrained, splice.save_pretrained is splice.hf.save_pretrained,\n"
        "        splice.peft.__name__ == 'splice.peft', splice.parallel.__name__ == 'splice.parallel',\n"
        "        splice.transforms.__name__ == 'splice.transforms']\n"
        "print(json.dumps({'same': same, 'all': [n for n in splice.__all__ if not hasattr(splice, n)],\n"
        "                  'dir': [n for n in splice.__all__ + ['peft', 'parallel', 'kernels'] if n not in dir(splice)]}))"
    )
    assert names == {"same": [True] * 7, "all": [], "dir": []}
    with pytest.raises(AttributeError, match="module 'splice' has no attribute 'fusee'"):
        splice.fusee  # noqa: B018
