"""Positional reads and writes straight between a file and caller-owned memory, with no staging buffer."""

from __future__ import annotations

import ctypes
import io
import os
import threading

import torch

from splice.errors import CheckpointError

try:
    IOV_MAX = max(1, os.sysconf("SC_IOV_MAX"))
except (AttributeError, ValueError, OSError):
    IOV_MAX = 1024

HAVE_POSITIONAL_IO = hasattr(os, "preadv") and hasattr(os, "pwrite")
"""Linux and macOS. Elsewhere (Windows) reads and writes seek under a per-file lock instead."""


class RandomAccessFile:
    """An unbuffered file that reads into and writes from given memory at given offsets, safe across threads."""

    def __init__(self, path: os.PathLike | str, mode: str):
        self.path = path
        self._file: io.FileIO = io.FileIO(path, mode)
        self._seek_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.read_calls = 0
        """System calls made by :meth:`read_exactly` so far (one ``preadv`` each)."""

    def fileno(self) -> int:
        return self._file.fileno()

    def size(self) -> int:
        return os.fstat(self._file.fileno()).st_size

    def close(self) -> None:
        self._file.close()

    def read_exactly(self, buffers: list[memoryview], offset: int) -> int:
        """Fill ``buffers`` in order from the contiguous file range starting at ``offset``; return the byte count.

        One ``preadv`` scatters up to IOV_MAX buffers, so a contiguous file range that lands in many places of
        memory costs one system call per IOV_MAX pieces.
        """
        buffers = [buffer for buffer in buffers if len(buffer)]
        total, calls = 0, 0
        first, consumed = 0, 0  # the first unfilled buffer, and how much of it is filled
        while first < len(buffers):
            calls += 1
            window = buffers[first : first + IOV_MAX]
            if consumed:
                window[0] = window[0][consumed:]
            try:
                n = self._readv(window, offset)
            except OSError as e:
                raise CheckpointError(
                    f"{self.path}: reading at byte {offset} failed: {e.strerror or e}"
                ) from e
            if n == 0:
                raise CheckpointError(
                    f"{self.path}: unexpected end of file at byte {offset} (was the file changed after it was opened?)"
                )
            offset += n
            total += n
            n += consumed
            while first < len(buffers) and n >= len(buffers[first]):
                n -= len(buffers[first])
                first += 1
            consumed = n
        with self._count_lock:
            self.read_calls += calls
        return total

    def write_all(self, data: memoryview, offset: int) -> None:
        while data:
            try:
                n = self._write(data, offset)
            except OSError as e:
                raise CheckpointError(
                    f"{self.path}: writing at byte {offset} failed: {e.strerror or e}"
                ) from e
            data = data[n:]
            offset += n

    def _readv(self, buffers: list[memoryview], offset: int) -> int:
        if HAVE_POSITIONAL_IO:
            return os.preadv(self._file.fileno(), buffers, offset)
        with self._seek_lock:  # pragma: no cover - exercised on platforms without preadv
            self._file.seek(offset)
            n = 0
            for buffer in buffers:
                got = self._file.readinto(buffer) or 0
                n += got
                if got < len(buffer):
                    break
            return n

    def _write(self, data: memoryview, offset: int) -> int:
        if HAVE_POSITIONAL_IO:
            return os.pwrite(self._file.fileno(), data, offset)
        with self._seek_lock:  # pragma: no cover - exercised on platforms without pwrite
            self._file.seek(offset)
            return self._file.write(data) or 0


def memory_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of the memory a CPU tensor spans, from its first element to the end of its last.

    The view does not keep the tensor alive: the caller holds the tensor for as long as it uses the view.
    """
    if tensor.numel() == 0:
        return memoryview(bytearray())
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    raw = (ctypes.c_char * (span * tensor.element_size())).from_address(tensor.data_ptr())
    return memoryview(raw).cast("B")
