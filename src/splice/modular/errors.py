"""Errors of the modular converter: each one names the file and line it is about."""

from __future__ import annotations

from pathlib import Path

from splice.errors import SpliceError


class ModularError(SpliceError, ValueError):
    """A modular file uses a construct the converter cannot flatten, or a parent it cannot find.

    The message reads ``path:line: sentence`` so that editors and CI logs can jump to the spot.
    """

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        self.reason = message
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(f"{where}{message}")
