"""HDF5Output: saves its two bottoms (data, label) to an HDF5 file.

Every forward appends its rows to the datasets "data" (N x ...) and "label"
(N x ...) of ``hdf5_output_param.file_name``, in the net's dtype. The file is
built under a temporary name beside the target and renamed over it when the
layer closes (``net.close()``, or at interpreter exit), so ``file_name`` is
always either the previous file or a complete new one, never half-written; a
net that fails to build leaves nothing.
(Caffe writes the datasets once per forward and fails on the second forward;
appending is what the layer is for.) No tops, nothing to propagate.
"""
from __future__ import annotations

import os
import tempfile
import weakref

import h5py
import numpy as np

from ..errors import DataError
from ..registry import register_layer
from .base import Layer

NAMES = ("data", "label")


class _Writer:
    """The temporary HDF5 file and its installation; separate from the layer for the finalizer."""

    def __init__(self, target: str):
        self.target = os.path.abspath(target)
        folder = os.path.dirname(self.target)
        try:
            os.makedirs(folder, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.target)}.",
                                            suffix=".tmp", dir=folder)
            os.close(fd)
            self.file = h5py.File(self.tmp, "w")
        except OSError as exc:
            raise DataError(f"cannot write HDF5 output file '{target}': {exc}",
                            hint="check that its folder exists and is writable") from None

    def append(self, name: str, rows: np.ndarray) -> None:
        if name not in self.file:
            self.file.create_dataset(name, data=rows, maxshape=(None,) + rows.shape[1:],
                                     chunks=True)
            return
        dataset = self.file[name]
        if dataset.shape[1:] != rows.shape[1:]:
            raise DataError(f"HDF5 output '{self.target}': rows of {name} changed shape from "
                            f"{dataset.shape[1:]} to {rows.shape[1:]}",
                            hint="one file holds rows of one shape")
        old = dataset.shape[0]
        dataset.resize(old + rows.shape[0], axis=0)
        dataset[old:] = rows

    def flush(self) -> None:
        self.file.flush()

    def install(self) -> None:
        """Close the file and rename it over the target (runs once)."""
        if self.file is None:
            return
        self.file.close()
        self.file = None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)
        os.replace(self.tmp, self.target)

    def __call__(self) -> None:  # the finalizer
        try:
            self.install()
        except Exception:  # noqa: BLE001 - at interpreter exit there is no one to tell
            pass


@register_layer("HDF5Output")
class HDF5OutputLayer(Layer):
    """Bottoms: data (N x ...), label (N x ...); appended to file_name's "data" and "label"."""

    param_name = "hdf5_output_param"
    num_bottom = 2
    num_top = 0

    def setup(self, bottom, top):
        if not self.param.file_name:
            raise self.error("hdf5_output_param.file_name is not set",
                             hint="give the .h5 file to write")
        self.file_name = self.param.file_name
        folder = os.path.dirname(os.path.abspath(self.file_name))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot write HDF5 output file '{self.file_name}': {exc}",
                            hint="check that its folder can be created") from None
        if not os.access(folder, os.W_OK):
            raise DataError(f"cannot write HDF5 output file '{self.file_name}': "
                            f"folder '{folder}' is not writable")
        # The file is started by the first forward, so a net that fails to build leaves nothing.
        self._writer = None
        self._finalizer = None
        self._closed = False

    def reshape(self, bottom, top):
        if bottom[0].shape[:1] != bottom[1].shape[:1]:
            raise self.error(f"data has {bottom[0].shape[:1]} rows but label {bottom[1].shape[:1]}",
                             hint="both bottoms need one row per item")

    def forward(self, bottom, top):
        if self._closed:
            raise self.error("is closed", hint="build the net again to write another file")
        if self._writer is None:
            self._writer = _Writer(self.file_name)
            self._finalizer = weakref.finalize(self, self._writer)
        for name, blob in zip(NAMES, bottom):
            rows = blob.cpu_data()
            self._writer.append(name, rows.reshape(rows.shape if rows.ndim else (1,)))
        self._writer.flush()

    def backward(self, top, propagate_down, bottom):
        pass  # an output layer: Caffe does not propagate through it either

    def close(self) -> None:
        """Install the file (an empty one if nothing was written: the net ran no forward)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if self._writer is None:
            self._writer = _Writer(self.file_name)
        elif self._finalizer is not None:
            self._finalizer.detach()
        self._writer.install()
