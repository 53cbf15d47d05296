"""Atomic file writes: a file is either the old one or the complete new one.

Every snapshot, weights file and solver state goes through here. The new
content is written to a temporary file in the same folder (so the final
``os.replace`` is a rename on one file system), flushed and fsync'ed, then
renamed over the target. If anything raises on the way, the temporary file is
removed and the previous file, if any, is left untouched::

    with atomic_write("model.caffemodel") as f:
        f.write(data)

    with atomic_path("model.caffemodel.h5") as tmp:   # for libraries that want a name
        with h5py.File(tmp, "w") as h5: ...
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator


def _temp_in_folder(path: str) -> tuple[int, str]:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: str) -> None:
    """Make the rename itself durable (not possible on every platform)."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp: str, path: str) -> None:
    # mkstemp creates the file 0600; give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    _fsync_folder(path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces ``path``."""
    path = os.fspath(path)
    if "w" not in mode:
        raise ValueError(f"atomic_write needs a write mode, got '{mode}'")
    fd, tmp = _temp_in_folder(path)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary file name to write (and close) inside the block; then it replaces ``path``."""
    path = os.fspath(path)
    fd, tmp = _temp_in_folder(path)
    os.close(fd)
    try:
        yield tmp
        _fsync_file(tmp)
        _commit(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
