"""Suite-wide options.

``--runslow`` runs the tests marked ``slow`` (long scenarios, big shapes); ``--runcorpus`` (or
``SPLICE_RUNCORPUS=1``) runs the tests marked ``corpus``: the modular converter over every modular
file the installed transformers ships; ``--runarch`` (or ``SPLICE_RUNARCH=1``) runs the tests marked
``arch``: every causal-LM and image-text-to-text architecture of the installed transformers.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")
    parser.addoption(
        "--runcorpus",
        action="store_true",
        default=False,
        help="compare the modular converter with every modular file shipped in the installed transformers",
    )
    parser.addoption(
        "--runarch",
        action="store_true",
        default=False,
        help="run every transformers causal-LM and image-text-to-text architecture through splice",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skips = {}
    if not config.getoption("--runslow"):
        skips["slow"] = pytest.mark.skip(reason="slow: pass --runslow")
    if not (config.getoption("--runcorpus") or os.environ.get("SPLICE_RUNCORPUS") == "1"):
        skips["corpus"] = pytest.mark.skip(reason="full corpus: pass --runcorpus or set SPLICE_RUNCORPUS=1")
    if not (config.getoption("--runarch") or os.environ.get("SPLICE_RUNARCH") == "1"):
        skips["arch"] = pytest.mark.skip(reason="every architecture: pass --runarch or set SPLICE_RUNARCH=1")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
