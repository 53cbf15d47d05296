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

Interrupts: code that must not be cut in the middle (a write, or a snapshot
made of several files) runs inside ``critical()``. A signal handler that wants
to abort at once calls ``interrupt()``: outside a critical section it raises
KeyboardInterrupt there and then; inside one it is remembered and raised when
the outermost section ends, so a second Ctrl-C never leaves half a snapshot.
(A KeyboardInterrupt raised by Python's default handler inside a write still
removes the temporary file and leaves the previous file in place.)
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from typing import IO, Iterator

_state = threading.local()
_pending_interrupt = False


def _depth() -> int:
    return getattr(_state, "depth", 0)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A section that ``interrupt()`` does not cut; a deferred interrupt is raised at its end."""
    global _pending_interrupt
    _state.depth = _depth() + 1
    try:
        yield
    finally:
        _state.depth -= 1
        if _state.depth == 0 and _pending_interrupt and threading.current_thread() is threading.main_thread():
            _pending_interrupt = False
            raise KeyboardInterrupt


def in_critical() -> bool:
    return _depth() > 0


def interrupt() -> None:
    """Raise KeyboardInterrupt now, or at the end of the current critical section.

    Meant for signal handlers (they run in the main thread, between bytecodes)."""
    global _pending_interrupt
    if in_critical():
        _pending_interrupt = True
        return
    raise KeyboardInterrupt


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


def fsync_folder(path: str) -> None:
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
    fsync_folder(path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces ``path``."""
    path = os.fspath(path)
    if "w" not in mode:
        raise ValueError(f"atomic_write needs a write mode, got '{mode}'")
    with critical():
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
    with critical():
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


def is_temp_file(name: str) -> bool:
    """Whether a file name is one of this module's temporary files (``.<name>.XXXX.tmp``)."""
    base = os.path.basename(name)
    return base.startswith(".") and base.endswith(".tmp")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
