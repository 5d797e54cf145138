"""Replacing a directory in one step: build a sibling staging directory, then swap it in.

On Linux the swap is ``renameat2(staging, out_dir, RENAME_EXCHANGE)``: ``out_dir`` names the old
checkpoint until the instant it names the new one. The old copy then sits at the staging path and is
deleted. Where ``RENAME_EXCHANGE`` is unavailable (other systems, or file systems that refuse it) the
old directory is renamed aside to ``.{name}.splice-old-XXXXXXXX`` and the staging directory renamed
into place; a crash between those two renames leaves no ``out_dir``, with the old checkpoint whole
under the aside name.

A crash at any other point leaves ``out_dir`` as it was (old or new) plus, at worst, a stale
``.{name}.splice-tmp-XXXXXXXX`` directory beside it, which is always safe to delete.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import sys
import warnings
from pathlib import Path

from splice.errors import CheckpointError

STAGING_MARKER = ".splice-tmp-"
ASIDE_MARKER = ".splice-old-"

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2_function = _load_renameat2()


def renameat2(source: Path, target: Path, flags: int) -> bool:
    """``renameat2(2)``; False when the system or the file system does not support ``flags``."""
    if _renameat2_function is None:
        return False
    if _renameat2_function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    if not hasattr(os, "O_DIRECTORY"):  # pragma: no cover - Windows cannot open directories
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sibling(out_dir: Path, marker: str) -> Path:
    return out_dir.parent / f".{out_dir.name}{marker}{secrets.token_hex(4)}"


def make_staging_dir(out_dir: Path) -> Path:
    """An empty directory beside ``out_dir`` (same file system), with ``out_dir``'s permissions if it exists."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        while True:
            staging = _sibling(out_dir, STAGING_MARKER)
            try:
                staging.mkdir()  # 0o777 minus the umask, as a plain mkdir of out_dir would get
                break
            except FileExistsError:  # pragma: no cover - 32 random bits collided
                continue
        if out_dir.is_dir():
            os.chmod(staging, out_dir.stat().st_mode & 0o7777)
    except OSError as e:
        raise CheckpointError(f"{out_dir}: cannot create a staging directory beside it: {e}") from e
    return staging


def replace_dir(staging: Path, out_dir: Path) -> None:
    """Make ``staging`` be ``out_dir``, replacing any directory there in one step where the system allows."""
    old = None
    try:
        if not out_dir.exists():
            if not renameat2(staging, out_dir, _RENAME_NOREPLACE):
                os.rename(staging, out_dir)
        elif not out_dir.is_dir():
            raise CheckpointError(f"{out_dir}: exists and is not a directory; refusing to replace it")
        elif renameat2(staging, out_dir, _RENAME_EXCHANGE):
            old = staging  # the old checkpoint now lives at the staging path
        else:
            old = _sibling(out_dir, ASIDE_MARKER)
            os.rename(out_dir, old)
            try:
                os.rename(staging, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{out_dir}: could not move the new checkpoint into place: {e}") from e
    try:
        fsync_dir(out_dir.parent)
    except OSError as e:
        raise CheckpointError(
            f"{out_dir}: the new checkpoint is in place, but syncing its parent failed: {e}"
        ) from e
    finally:
        if old is not None:
            remove_tree(old)


def refuse_foreign_dir(out_dir: Path, label: str) -> None:
    """Refuse to replace ``out_dir`` when it exists as a file, or as a directory of files but no checkpoint.

    Commands that write a whole new checkpoint directory (``convert``, ``consolidate``) replace the old
    one as a whole; a directory of something else is far more likely a typo than an old output.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{label} {out_dir} exists and is not a directory")
    if out_dir.is_dir() and not any(out_dir.glob("*.safetensors")) and any(out_dir.iterdir()):
        raise CheckpointError(
            f"refusing to replace {label} {out_dir}: it is a directory that holds files but no safetensors "
            "checkpoint; remove it or choose a new one"
        )


def remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        warnings.warn(f"splice: could not remove {path} ({e}); it is safe to delete", stacklevel=3)
