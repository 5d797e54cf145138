"""Path safety for names read from files splice did not write: index shard names, ``splice-parallel.json``
file lists, and the side files copied from one checkpoint directory into another.

Every checkpoint file may be hostile. A name read from one (``"../../x.safetensors"`` in an index)
must not lead out of the directory the caller gave, and copying a directory must not read, through
a symbolic link, a file from elsewhere (``tokenizer.json -> /etc/shadow``) into a new, more readable
output. The rules:

- :func:`member` turns a name into a path inside a directory, or refuses it: the name must be a
  relative path with no ``..``, no empty or ``.`` component, no backslash or NUL, and every folder on
  the way must resolve inside the directory. The file itself may be a symbolic link, whatever it
  points to, because the Hugging Face cache is made of them (``snapshots/<rev>/model.safetensors ->
  ../../blobs/<sha256>``); the link was put there by whoever made the directory, not named by a file.
- :func:`copy_side_files` copies regular files (config, tokenizer, README, ...) from one directory
  into another, skipping with a warning each symbolic link that leads out of the directory (or into a
  directory, or nowhere). A link into the Hugging Face cache's own ``blobs/`` folder, from one of its
  ``snapshots/<rev>/`` folders, is followed: that is how every file of a downloaded model is stored.
  A copy is created with its source's permission bits (less the umask), so it is never more readable
  than what it was read from.

>>> member(Path("ckpt"), "model-00001-of-00002.safetensors", "ckpt/model.safetensors.index.json")  # doctest: +SKIP
PosixPath('ckpt/model-00001-of-00002.safetensors')
"""

from __future__ import annotations

import difflib
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

from splice.errors import CheckpointError

__all__ = ["copy_side_files", "member", "shown"]


def shown(name: object, limit: int = 80) -> str:
    """``repr`` of a name read from a file, cut to ``limit`` characters, for error messages."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def close_matches(key: str, names) -> str:
    """``"; did you mean 'a', 'b'?"`` for the names nearest ``key``, or nothing: the tail of a not-found message."""
    matches = difflib.get_close_matches(key, list(names), n=3)
    return f"; did you mean {', '.join(map(repr, matches))}?" if matches else ""


def member(directory: Path, name: object, where: str, what: str = "file name") -> Path:
    """``directory / name``, refusing a name that is not a plain relative path staying inside ``directory``.

    ``where`` (the file the name was read from) and ``what`` start the message. The last component
    may be a symbolic link (see the module docstring); the folders above it may not lead outside.
    """
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where}: {what} {shown(name)} must be a non-empty string")
    parts = PurePosixPath(name).parts
    bad = _unsafe(name, parts)
    if bad is not None:
        raise CheckpointError(
            f"{where}: {what} {shown(name)} is refused ({bad}); expected a name relative to {directory}, "
            "inside it: nothing outside the checkpoint directory is read"
        )
    path = directory.joinpath(*parts)
    if len(parts) > 1:
        root = Path(os.path.realpath(directory))
        folder = Path(os.path.realpath(path.parent))
        if folder != root and root not in folder.parents:
            raise CheckpointError(
                f"{where}: {what} {shown(name)} leads out of {directory} through a symbolic link "
                f"({path.parent} resolves to {folder}); refusing to read outside the checkpoint directory"
            )
    return path


def _unsafe(name: str, parts: tuple[str, ...]) -> str | None:
    """What makes a name unsafe to join to a directory, or None."""
    checks = (
        (name.startswith(("/", "\\")) or PureWindowsPath(name).drive != "", "an absolute path"),
        (".." in parts, "a '..' component"),
        ("\\" in name, "a backslash"),
        ("\0" in name, "a NUL byte"),
        (any(p in ("", ".") for p in name.split("/")), "an empty or '.' component"),
    )
    return next((why for failed, why in checks if failed), None)


def _hf_cache_blob(folder: Path, target: Path) -> bool:
    """True when ``folder`` is a Hugging Face cache snapshot and ``target`` is a file of that repo's ``blobs/``."""
    real = Path(os.path.realpath(folder))
    if real.parent.name != "snapshots":
        return False
    blobs = real.parent.parent / "blobs"
    return target.parent == blobs


def _side_file_source(path: Path, folder: Path) -> tuple[Path | None, str | None]:
    """``(what to copy, None)`` for a file of ``folder`` that may be copied, else ``(None, why not)``.

    The path returned is the resolved one, so the bytes copied are those of the file checked.
    """
    real_folder = Path(os.path.realpath(folder))
    real = Path(os.path.realpath(path))
    if not path.is_symlink():
        return (path, None) if path.is_file() else (None, None)
    if not real.is_file():
        return None, f"{path} is a symbolic link to {os.readlink(path)}, not to a file; not copied"
    if real_folder in real.parents or _hf_cache_blob(folder, real):
        return real, None
    return None, (
        f"{path} is a symbolic link to {os.readlink(path)}, outside {folder}; not copied "
        "(links out of the checkpoint directory are not followed; copy the file itself if it belongs there)"
    )


def _copy_no_wider(source: Path, target: Path) -> None:
    """Copy ``source`` (not a link: it was resolved) into a new file created no more readable than it is.

    The mode is set when the file is created, so there is no moment when the copy is more readable
    than its source; ``O_NOFOLLOW`` refuses a source swapped for a link since it was checked.
    """
    fd = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with open(fd, "rb") as src:
        mode = stat.S_IMODE(os.fstat(src.fileno()).st_mode) & 0o666
        with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def copy_side_files(
    folder: Path, staging: Path, skip: Callable[[str], bool], warn: Callable[[str], None]
) -> list[str]:
    """Copy the regular files of ``folder`` that ``skip`` does not name into ``staging`` (see the module doc).

    ``warn`` hears about every symbolic link not followed. Hidden files and subfolders are not copied.
    Returns the names copied.
    """
    copied = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or skip(path.name):
            continue
        source, why_not = _side_file_source(path, folder)
        if why_not is not None:
            warn(why_not)
        if source is None:
            continue
        try:
            _copy_no_wider(source, staging / path.name)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot copy it into the output: {exc.strerror or exc}") from None
        copied.append(path.name)
    return copied
