"""Options and fixtures of the modular converter's tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest


@pytest.fixture
def package(tmp_path: Path):
    """Writes a small package tree: ``package({"models/base/modeling_base.py": "..."})`` -> root path.

    Every folder on the way gets an ``__init__.py`` so relative imports resolve as in a real package.
    """

    def write(files: dict[str, str], name: str = "mypkg") -> Path:
        root = tmp_path / name
        for relative, text in files.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            folder = path.parent
            while folder != tmp_path:
                (folder / "__init__.py").touch()
                folder = folder.parent
            path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return root

    return write
