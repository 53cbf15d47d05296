"""LMDB databases of Datum records: a forever-wrapping reader and an atomic writer.

Records are read in key order (Caffe's ``%08d_<name>`` keys keep insertion
order). The reader is positioned by record index, so a data layer can start
at any batch (exact resume) and take every ``world_size``-th record for data
parallelism. ``write_lmdb`` builds the database next to its target and swaps
it in at the end: a crash part-way leaves the previous database intact.
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
import threading
from typing import Iterable

import lmdb

from ..errors import DataError

CREATE_HINT = "run scripts/get_mnist.py or caffelite convert_imageset to create it"
_LMDB_FILES = {"data.mdb", "lock.mdb"}
_OPEN: dict = {}   # (real path, inode) -> (environment, number of users)
_KEYS: dict = {}   # id(environment) -> key in _OPEN
_OPEN_LOCK = threading.Lock()


def open_lmdb(path: str) -> "lmdb.Environment":
    """Open an existing LMDB read-only, without a lock file (it may sit on a read-only disk).

    LMDB allows one environment per database and process, so readers of the
    same database share it; give it back with ``close_lmdb``.
    """
    if not os.path.exists(path):
        raise DataError(f"LMDB '{path}' does not exist", hint=CREATE_HINT)
    data_file = os.path.join(path, "data.mdb")
    if not os.path.isdir(path) or not os.path.isfile(data_file):
        raise DataError(f"'{path}' is not an LMDB (a folder holding data.mdb)", hint=CREATE_HINT)
    # The inode tells a database replaced by write_lmdb from the one already open.
    key = (os.path.realpath(path), os.stat(data_file).st_ino)
    with _OPEN_LOCK:
        if key in _OPEN:
            env, users = _OPEN[key]
            _OPEN[key] = (env, users + 1)
            return env
        try:
            env = _open_env(path)
        except lmdb.Error as exc:
            raise DataError(f"cannot open LMDB '{path}': {exc}", hint=CREATE_HINT) from None
        _OPEN[key] = (env, 1)
        _KEYS[id(env)] = key
        return env


def _open_env(path: str) -> "lmdb.Environment":
    try:
        return lmdb.open(path, readonly=True, lock=False, readahead=False, max_readers=512)
    except lmdb.Error as exc:
        if "already open" not in str(exc):
            raise
    # An environment nobody closed (a reader dropped without close()) is still open until the
    # garbage collector finalises it; collect, then try once more.
    gc.collect()
    return lmdb.open(path, readonly=True, lock=False, readahead=False, max_readers=512)


def close_lmdb(env: "lmdb.Environment") -> None:
    """Give back an environment from ``open_lmdb``; the last user closes it."""
    with _OPEN_LOCK:
        key = _KEYS.get(id(env))
        if key is None:
            return
        env, users = _OPEN[key]
        if users > 1:
            _OPEN[key] = (env, users - 1)
            return
        del _OPEN[key], _KEYS[id(env)]
    env.close()


class LMDBReader:
    """Reads one LMDB's records by index in key order, wrapping around at the end.

    ``read(start, count, stride)`` returns the (key, value) pairs of records
    ``start, start + stride, ...`` (all modulo the record count). Consecutive
    reads continue where the last one stopped without seeking.
    """

    def __init__(self, path: str):
        self.path = path
        self.env = open_lmdb(path)
        self.num_records = self.env.stat()["entries"]
        if self.num_records == 0:
            close_lmdb(self.env)
            raise DataError(f"LMDB '{path}' holds no records", hint=CREATE_HINT)
        self._txn = None
        self._cursor = None
        self._pos = None  # record index under the cursor

    def first(self) -> tuple[bytes, bytes]:
        """The first record, without moving the reading position."""
        with self.env.begin() as txn:
            cursor = txn.cursor()
            cursor.first()
            return cursor.key(), cursor.value()

    def read(self, start: int, count: int, stride: int = 1) -> list[tuple[bytes, bytes]]:
        self._seek(start % self.num_records)
        records = []
        for _ in range(count):
            records.append(self._cursor.item())
            self._advance(stride)
        return records

    def close(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = self._cursor = None
        if self.env is not None:
            close_lmdb(self.env)
            self.env = None

    # ---- positioning ------------------------------------------------------
    def _seek(self, index: int) -> None:
        if self._cursor is None:
            self._txn = self.env.begin(buffers=False)
            self._cursor = self._txn.cursor()
            self._pos = None
        if self._pos == index:
            return
        ahead = (index - self._pos) % self.num_records if self._pos is not None else index + 1
        if ahead > index:
            # LMDB has no seek by position: restart from the first key and walk.
            self._cursor.first()
            self._pos, ahead = 0, index
        self._advance(ahead)

    def _advance(self, steps: int) -> None:
        steps %= self.num_records
        cursor = self._cursor
        for _ in range(steps):
            if not cursor.next():
                cursor.first()
        self._pos = (self._pos + steps) % self.num_records


def count_records(path: str) -> int:
    env = open_lmdb(path)
    try:
        return env.stat()["entries"]
    finally:
        close_lmdb(env)


def iter_records(path: str) -> Iterable[tuple[bytes, bytes]]:
    """Every (key, value) once, in key order."""
    env = open_lmdb(path)
    try:
        with env.begin() as txn:
            yield from txn.cursor()
    finally:
        close_lmdb(env)


def write_lmdb(path: str, records: Iterable[tuple[bytes, bytes]], commit_every: int = 1000,
               map_size: int = 1 << 30) -> int:
    """Write (key, value) pairs into a new LMDB at ``path``, replacing any old one atomically.

    The database is built in a temporary folder beside ``path`` (committing
    every ``commit_every`` records, growing the map as needed) and then moved
    into place; a crash leaves the previous database. Returns the record count.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path):
        if not os.path.isdir(path) or set(os.listdir(path)) - _LMDB_FILES:
            raise DataError(f"'{path}' exists and is not an LMDB; refusing to replace it",
                            hint="choose another output path or remove it")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    count = 0
    try:
        env = lmdb.open(tmp, map_size=map_size, mode=0o644, sync=False, metasync=False)
        try:
            pending = []
            for key, value in records:
                pending.append((key, value))
                if len(pending) >= commit_every:
                    _commit(env, pending)
                    count += len(pending)
                    pending.clear()
            _commit(env, pending)
            count += len(pending)
            env.sync(True)
        finally:
            env.close()
        os.chmod(tmp, 0o755)
        _install(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count


def _commit(env, pending: list, append: bool = False) -> None:
    if not pending:
        return
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in pending:
                    txn.put(key, value, append=append)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def _install(tmp: str, path: str) -> None:
    if not os.path.exists(path):
        os.rename(tmp, path)  # atomic: the folder appears complete or not at all
    else:
        # Replace the data file itself (atomic rename); readers of the old one keep their copy.
        os.replace(os.path.join(tmp, "data.mdb"), os.path.join(path, "data.mdb"))
        if os.path.exists(os.path.join(tmp, "lock.mdb")):
            os.replace(os.path.join(tmp, "lock.mdb"), os.path.join(path, "lock.mdb"))
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        fd = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class LMDBWriter:
    """``write_lmdb`` for producers that push records: the same temporary folder
    beside ``path``, and the swap into ``path`` on ``finish()``.

    Each ``put`` goes straight into an open write transaction, committed every
    ``commit_every`` records or ``commit_bytes`` bytes, whichever comes first,
    so writing keeps pace with the producer and memory stays bounded. With
    ``append`` the keys must come in increasing order (LMDB then skips the
    search). On POSIX the map is written in place (LMDB's ``writemap``: a
    third of the CPU time per record) and the file, which LMDB stretches to the
    map size, is cut back to its used pages at the end. Use it as a context manager: leaving the block by an exception
    removes the temporary folder and leaves ``path`` as it was::

        with LMDBWriter("features_lmdb") as db:
            db.put(b"0000000000", value)
    """

    def __init__(self, path: str, commit_every: int = 1000, map_size: int = 1 << 30,
                 append: bool = False, commit_bytes: int = 64 << 20):
        self.path = os.path.abspath(path)
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        if os.path.exists(self.path) and (not os.path.isdir(self.path)
                                          or set(os.listdir(self.path)) - _LMDB_FILES):
            raise DataError(f"'{self.path}' exists and is not an LMDB; refusing to replace it",
                            hint="choose another output path or remove it")
        self.commit_every = commit_every
        self.commit_bytes = commit_bytes
        self.append = append
        self.count = 0  # records committed
        self._pending: list = []  # records of the open transaction, replayed if the map must grow
        self._pending_bytes = 0
        self._txn = None
        self._tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=parent)
        try:
            self._writemap = os.name == "posix"
            self._env = lmdb.open(self._tmp, map_size=map_size, mode=0o644, sync=False, metasync=False,
                                  writemap=self._writemap)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    def __len__(self) -> int:
        """Records put so far, committed or not."""
        return self.count + len(self._pending)

    def put(self, key: bytes, value: bytes) -> None:
        if self._txn is None:
            self._txn = self._env.begin(write=True)
        self._pending.append((key, value))
        self._pending_bytes += len(value)
        try:
            self._txn.put(key, value, append=self.append)
        except lmdb.MapFullError:
            self._grow()
        if len(self._pending) >= self.commit_every or self._pending_bytes >= self.commit_bytes:
            self.commit()

    def commit(self) -> None:
        while self._txn is not None:
            try:
                self._txn.commit()
                self._txn = None
            except lmdb.MapFullError:
                self._grow()
        self.count += len(self._pending)
        self._pending.clear()
        self._pending_bytes = 0

    def _grow(self) -> None:
        """Double the map and redo the open transaction (LMDB aborts it when the map is full)."""
        while True:
            self._txn.abort()
            self._env.set_mapsize(self._env.info()["map_size"] * 2)
            self._txn = self._env.begin(write=True)
            try:
                for key, value in self._pending:
                    self._txn.put(key, value, append=self.append)
                return
            except lmdb.MapFullError:
                continue

    def finish(self) -> int:
        """Commit what is left and move the database into place; returns the record count."""
        try:
            self.commit()
            self._env.sync(True)
            used = (self._env.info()["last_pgno"] + 1) * self._env.stat()["psize"]
            self._env.close()
            self._env = None
            if self._writemap:
                _truncate(os.path.join(self._tmp, "data.mdb"), used)
            os.chmod(self._tmp, 0o755)
            _install(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.count

    def abort(self) -> None:
        """Drop everything written so far; ``path`` keeps its previous content."""
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        if self._env is not None:
            self._env.close()
            self._env = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "LMDBWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def _truncate(path: str, size: int) -> None:
    """Cut a closed LMDB's data file back to its used pages (what LMDB without writemap leaves)."""
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
            os.fsync(fd)
    finally:
        os.close(fd)
