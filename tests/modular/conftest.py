"""Options and fixtures of the modular converter's tests."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runcorpus",
        action="store_true",
        default=False,
        help="compare the converter with every modular file shipped in the installed transformers",
    )


def corpus_requested(config: pytest.Config) -> bool:
    """``pytest tests/modular --runcorpus``, or SPLICE_RUNCORPUS=1 from anywhere."""
    return bool(config.getoption("--runcorpus", default=False)) or os.environ.get("SPLICE_RUNCORPUS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if corpus_requested(config):
        return
    skip = pytest.mark.skip(
        reason="full corpus: pass --runcorpus (pytest tests/modular) or set SPLICE_RUNCORPUS=1"
    )
    for item in items:
        if "corpus" in item.keywords:
            item.add_marker(skip)


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
