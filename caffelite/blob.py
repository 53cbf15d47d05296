"""Blob: an N-d array of data and one of gradients (diff), on the CPU or a GPU.

Like Caffe's SyncedMemory, each of the two arrays remembers where its fresh
copy lives (``UNINIT``, ``CPU``, ``GPU`` or ``SYNCED``) and copies across only
when the other side is read. ``blob.data`` / ``blob.diff`` give the array on
the blob's own device and count as a write there; ``cpu_data()`` and
``gpu_data()`` read a side without moving the head.

``reshape`` keeps the allocation when the new shape fits in it, so nets whose
batch shrinks and grows again never reallocate.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .backend import CPU, Device, cupy_module
from .errors import ConfigError

UNINIT, HEAD_CPU, HEAD_GPU, SYNCED = "UNINIT", "CPU", "GPU", "SYNCED"


class SyncedMemory:
    """A flat buffer with a CPU and a GPU copy; ``head`` says which is fresh.

    ``capacity`` elements are allocated; blobs view the first ``count`` of them.
    """

    __slots__ = ("capacity", "dtype", "device", "head", "_cpu", "_gpu", "zero_pending")

    def __init__(self, capacity: int, dtype, device: Device):
        self.capacity = int(capacity)
        self.dtype = np.dtype(dtype)
        self.device = device
        self.head = UNINIT
        self._cpu = self._gpu = None
        #: Set by ``clear``: the values are zeros not yet written (see ``take_for_overwrite``).
        self.zero_pending = False

    def clear(self) -> None:
        """Make every value 0, lazily: the zeros are written on the next access, unless
        ``take_for_overwrite`` hands the memory to a writer that fills all of it."""
        self.zero_pending = True

    def _write_zeros(self) -> None:
        self.zero_pending = False
        self.mutable().fill(0)

    def take_for_overwrite(self):
        """(array on the device, True) when the values are pending zeros and the caller must
        write every element; else (array, False) and the caller adds to it."""
        if self.zero_pending:
            self.zero_pending = False
            return self.mutable(), True
        return self.mutable(), False

    def cpu(self) -> np.ndarray:
        """The CPU copy, brought up to date (head becomes SYNCED if it was GPU)."""
        if self.zero_pending:
            self._write_zeros()
        if self._cpu is None:
            self._cpu = np.zeros(self.capacity, self.dtype)
        if self.head == HEAD_GPU:
            self._gpu.get(out=self._cpu)
            self.head = SYNCED
        elif self.head == UNINIT:
            self.head = HEAD_CPU
        return self._cpu

    def gpu(self):
        """The GPU copy, brought up to date (head becomes SYNCED if it was CPU)."""
        if self.zero_pending:
            self._write_zeros()
        if self._gpu is None:
            cp = cupy_module()
            with cp.cuda.Device(self.device.id):
                self._gpu = cp.zeros(self.capacity, self.dtype)
        if self.head == HEAD_CPU:
            self._gpu.set(self._cpu)
            self.head = SYNCED
        elif self.head == UNINIT:
            self.head = HEAD_GPU
        return self._gpu

    def mutable_cpu(self) -> np.ndarray:
        array = self.cpu()
        self.head = HEAD_CPU
        return array

    def mutable_gpu(self):
        array = self.gpu()
        self.head = HEAD_GPU
        return array

    def mutable(self):
        return self.mutable_gpu() if self.device.is_gpu else self.mutable_cpu()

    def assign(self, flat) -> None:
        """Make the 1-d ``flat`` (on this device) the fresh copy."""
        self.zero_pending = False
        self.capacity = flat.size
        if self.device.is_gpu:
            self._gpu, self._cpu = flat, None
            self.head = HEAD_GPU
        else:
            self._cpu, self._gpu = flat, None
            self.head = HEAD_CPU


class Blob:
    """Data and diff of one shape (N, C, H, W or any N-d), on one device."""

    __slots__ = ("_data", "_diff", "_shape", "_count", "name")

    def __init__(self, shape: Sequence[int] = (), dtype=np.float32, device: Device = CPU,
                 name: str = ""):
        self._shape = _check_shape(shape)
        self._count = _prod(self._shape)
        self._data = SyncedMemory(self._count, dtype, device)
        self._diff = SyncedMemory(self._count, dtype, device)
        self.name = name

    # ---- shape -------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._data.dtype

    @property
    def device(self) -> Device:
        return self._data.device

    @property
    def num_axes(self) -> int:
        return len(self._shape)

    @property
    def count(self) -> int:
        return self._count

    def count_range(self, start: int, end: int | None = None) -> int:
        """Product of the dimensions in ``shape[start:end]``."""
        return _prod(self._shape[start:end])

    def canonical_axis(self, axis: int) -> int:
        n = self.num_axes
        if not -n <= axis < max(n, 1):
            raise ConfigError(f"axis {axis} out of range for a {n}-axis blob {self._shape}")
        return axis + n if axis < 0 else axis

    def reshape(self, shape: Sequence[int]) -> None:
        """Change the shape; memory is kept while the new count fits in it."""
        shape = _check_shape(shape)
        if shape == self._shape:
            return
        self._shape, self._count = shape, _prod(shape)
        # Outgrowing the buffer gives this blob fresh memory (and ends any sharing).
        if self._count > self._data.capacity:
            self._data = SyncedMemory(self._count, self._data.dtype, self._data.device)
        if self._count > self._diff.capacity:
            self._diff = SyncedMemory(self._count, self._diff.dtype, self._diff.device)

    def reshape_like(self, other: "Blob") -> None:
        self.reshape(other._shape)

    def _view(self, flat):
        return flat[:self._count].reshape(self._shape)

    # ---- arrays on the blob's device (reads and writes) --------------------
    @property
    def data(self):
        return self._view(self._data.mutable())

    @data.setter
    def data(self, array) -> None:
        self._data.assign(_fit(array, self))

    @property
    def diff(self):
        return self._view(self._diff.mutable())

    @diff.setter
    def diff(self, array) -> None:
        self._diff.assign(_fit(array, self))

    # ---- explicit sides (Caffe's cpu_data / mutable_gpu_diff ...) ----------
    def cpu_data(self) -> np.ndarray:
        return self._view(self._data.cpu())

    def cpu_diff(self) -> np.ndarray:
        return self._view(self._diff.cpu())

    def gpu_data(self):
        return self._view(self._data.gpu())

    def gpu_diff(self):
        return self._view(self._diff.gpu())

    def mutable_cpu_data(self) -> np.ndarray:
        return self._view(self._data.mutable_cpu())

    def mutable_cpu_diff(self) -> np.ndarray:
        return self._view(self._diff.mutable_cpu())

    def mutable_gpu_data(self):
        return self._view(self._data.mutable_gpu())

    def mutable_gpu_diff(self):
        return self._view(self._diff.mutable_gpu())

    @property
    def data_head(self) -> str:
        return self._data.head

    @property
    def diff_head(self) -> str:
        return self._diff.head

    # ---- sharing ------------------------------------------------------------
    def share_data(self, other: "Blob") -> None:
        """Use ``other``'s data memory (same count required), as Caffe's ShareData."""
        _check_same_count(self, other)
        self._data = other._data

    def share_diff(self, other: "Blob") -> None:
        _check_same_count(self, other)
        self._diff = other._diff

    def set_data(self, values) -> None:
        """Copy ``values`` (NumPy or CuPy, broadcastable) into data."""
        self.data[...] = _on_device(values, self.device)

    def set_diff(self, values) -> None:
        self.diff[...] = _on_device(values, self.device)

    def clear_diff(self) -> None:
        """diff = 0 without writing memory now: the next reader gets zeros, and a layer that
        produces a whole gradient writes it in place of adding (``diff_for_update``)."""
        self._diff.clear()

    def diff_for_update(self):
        """(diff, overwrite): when ``overwrite`` the diff holds pending zeros and the caller must
        write all of it (``diff[...] = g``); otherwise it adds (``diff += g``). Parameter
        gradients accumulate, so this saves the zeroing pass and a temporary per update."""
        array, overwrite = self._diff.take_for_overwrite()
        return self._view(array), overwrite

    def add_to_diff(self, values) -> None:
        """diff += values, or diff[...] = values when the diff is pending zeros."""
        diff, overwrite = self.diff_for_update()
        if overwrite:
            diff[...] = values
        else:
            diff += values

    def to(self, device: Device) -> None:
        """Move the blob to another device, keeping its values."""
        if device == self.device:
            return
        for mem_name in ("_data", "_diff"):
            mem = getattr(self, mem_name)
            fresh = SyncedMemory(mem.capacity, mem.dtype, device)
            if mem.head != UNINIT:
                fresh.mutable()[...] = _on_device(mem.cpu(), device)
            setattr(self, mem_name, fresh)

    def __repr__(self) -> str:
        label = f" '{self.name}'" if self.name else ""
        return f"Blob{label}{self._shape} {self.dtype} on {self.device}"


def _prod(shape: Sequence[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def _check_shape(shape: Sequence[int]) -> tuple:
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ConfigError(f"blob shape {shape} has a negative dimension")
    return shape


def _check_same_count(a: Blob, b: Blob) -> None:
    if a.count != b.count:
        raise ConfigError(f"cannot share memory between blobs of {a.shape} and {b.shape}")


def _on_device(values, device: Device):
    if device.is_gpu:
        return cupy_module().asarray(values)
    return values.get() if hasattr(values, "get") and not isinstance(values, np.ndarray) else values


def _fit(array, blob: Blob):
    array = _on_device(array, blob.device)
    if tuple(array.shape) != blob.shape:
        raise ConfigError(f"cannot assign an array of shape {tuple(array.shape)} "
                          f"to blob{' ' + blob.name if blob.name else ''} of shape {blob.shape}")
    if array.dtype != blob.dtype:
        array = array.astype(blob.dtype)
    return array.reshape(-1)
