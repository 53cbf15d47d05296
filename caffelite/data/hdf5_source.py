"""Rows of HDF5 files listed in a text file (Caffe's HDF5Data ``source``).

The list file names one .h5 file per line; a relative name is looked up next
to the list file first, then in the working directory. Every file holds one
dataset per top (named like the top), all with the same number of rows.

Rows form an endless stream: epoch e visits every row of every file once,
file after file. With ``shuffle`` the file order and the rows inside each file
are permuted anew each epoch, from Generators derived from (seed key, epoch),
so any stream position maps to a row without replaying the past (exact resume).
Like Caffe, one file at a time is held in memory.
"""
from __future__ import annotations

import os

import h5py
import numpy as np

from ..errors import DataError

HINT = "the list file names one .h5 file per line (relative to the list file's folder)"


def read_list_file(source: str) -> list[str]:
    """The .h5 paths named in ``source``, resolved (list file's folder first, then CWD)."""
    try:
        with open(source) as f:
            names = [line.strip() for line in f]
    except FileNotFoundError:
        raise DataError(f"HDF5 list file '{source}' does not exist", hint=HINT) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read HDF5 list file '{source}': {exc}", hint=HINT) from None
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise DataError(f"HDF5 list file '{source}' names no files", hint=HINT)
    folder = os.path.dirname(os.path.abspath(source))
    paths = []
    for name in names:
        candidates = [name] if os.path.isabs(name) else [os.path.join(folder, name), name]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None:
            raise DataError(f"HDF5 file '{name}' listed in '{source}' does not exist "
                            f"(looked in {' and '.join(repr(os.path.dirname(os.path.abspath(c)) or '.') for c in candidates)})",
                            hint=HINT)
        paths.append(found)
    return paths


class HDF5Source:
    """Reads rows of the datasets ``names`` from the files of a list file, by stream position."""

    def __init__(self, source: str, names: list[str], shuffle: bool = False,
                 seed_key: tuple[int, ...] = (0,)):
        self.source = source
        self.names = list(names)
        self.shuffle = shuffle
        self.seed_key = [int(k) for k in seed_key]
        self.files = read_list_file(source)
        self.rows = np.zeros(len(self.files), np.int64)
        self.item_shapes: dict[str, tuple] = {}
        for i, path in enumerate(self.files):
            self.rows[i] = self._inspect(path)
        self.total_rows = int(self.rows.sum())
        if self.total_rows == 0:
            raise DataError(f"the HDF5 files of '{source}' hold no rows")
        self._cached_file = -1
        self._cached: dict[str, np.ndarray] = {}
        self._epoch_cache: dict = {}
        self._perm_cache: dict = {}

    def _inspect(self, path: str) -> int:
        """Check one file's datasets; returns its row count."""
        try:
            return self._inspect_open(path)
        except H5_ERRORS as exc:
            raise _damaged(path, exc) from None

    def _inspect_open(self, path: str) -> int:
        counts = {}
        with _open(path) as f:
            for name in self.names:
                if name not in f or not isinstance(f[name], h5py.Dataset):
                    have = ", ".join(sorted(k for k in f if isinstance(f[k], h5py.Dataset))) or "none"
                    raise DataError(f"HDF5 file '{path}' has no dataset '{name}' (it holds: {have})",
                                    hint="HDF5Data reads one dataset per top, named like the top")
                shape = f[name].shape
                if len(shape) < 1:
                    raise DataError(f"dataset '{name}' of '{path}' is a scalar; it needs a row axis")
                counts[name] = shape[0]
                if self.item_shapes.setdefault(name, shape[1:]) != shape[1:]:
                    raise DataError(f"dataset '{name}' of '{path}' has rows of shape {shape[1:]}, "
                                    f"other files {self.item_shapes[name]}",
                                    hint="every file needs rows of the same shape")
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise DataError(f"the datasets of HDF5 file '{path}' have different row counts ({detail})",
                            hint="every dataset of a file needs one row per item")
        return next(iter(counts.values()))

    def reseed(self, seed_key: tuple[int, ...]) -> None:
        """Use another shuffle seed (a restored run's)."""
        self.seed_key = [int(k) for k in seed_key]
        self._epoch_cache.clear()
        self._perm_cache.clear()

    # ---- stream positions -> rows ----------------------------------------------
    def _epoch_order(self, epoch: int):
        """(file order, row offsets of the files in that order) for one epoch."""
        if epoch not in self._epoch_cache:
            if self.shuffle:
                order = np.random.default_rng([*self.seed_key, epoch]).permutation(len(self.files))
            else:
                order = np.arange(len(self.files))
            if len(self._epoch_cache) > 4:
                self._epoch_cache.clear()
            self._epoch_cache[epoch] = (order, np.cumsum(self.rows[order]))
        return self._epoch_cache[epoch]

    def _row_permutation(self, epoch: int, file: int) -> np.ndarray:
        key = (epoch, file)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 8:
                self._perm_cache.clear()
            rng = np.random.default_rng([*self.seed_key, epoch, file + 1])
            self._perm_cache[key] = rng.permutation(int(self.rows[file]))
        return self._perm_cache[key]

    def read(self, positions: np.ndarray, out: dict | None = None) -> dict[str, np.ndarray]:
        """The rows at stream ``positions`` (ints), one array per dataset name: into the arrays
        of ``out`` (name -> (len(positions), *item shape), any dtype: the values are cast)."""
        positions = np.asarray(positions, np.int64)
        epochs, within = np.divmod(positions, self.total_rows)
        files = np.empty_like(positions)
        local = np.empty_like(positions)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            order, ends = self._epoch_order(int(epoch))
            slot = np.searchsorted(ends, within[sel], side="right")
            files[sel] = order[slot]
            local[sel] = within[sel] - (ends[slot] - self.rows[order[slot]])
            if self.shuffle:
                for f in np.unique(files[sel]):
                    pick = sel & (files == f)
                    local[pick] = self._row_permutation(int(epoch), int(f))[local[pick]]
        if out is None:
            out = {name: np.empty((len(positions),) + self.item_shapes[name],
                                  self._dtype(name)) for name in self.names}
        # Visit files in stream order so the file in memory changes as rarely as possible.
        _, first = np.unique(files, return_index=True)
        for f in files[np.sort(first)]:
            pick = files == f
            data = self._load(int(f))
            for name in self.names:
                out[name][pick] = data[name][local[pick]]
        return out

    def _dtype(self, name: str):
        if self._cached:
            return self._cached[name].dtype
        return self._load(0)[name].dtype

    def _load(self, file: int) -> dict[str, np.ndarray]:
        if file != self._cached_file:
            path = self.files[file]
            with _open(path) as f:
                try:
                    self._cached = {name: f[name][()] for name in self.names}
                except H5_ERRORS as exc:
                    raise _damaged(path, exc) from None
            self._cached_file = file
        return self._cached


# What h5py raises on a damaged file, besides its OSError for unreadable ones.
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


def _damaged(path: str, exc: Exception) -> DataError:
    return DataError(f"HDF5 file '{path}' is damaged: {exc}", hint="re-create the file")


def _open(path: str) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"cannot open HDF5 file '{path}': {exc}",
                        hint="check that it is an HDF5 file (written with h5py or Caffe)") from None
