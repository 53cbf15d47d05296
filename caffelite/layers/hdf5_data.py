"""HDF5Data: rows of HDF5 datasets, one top per dataset, optionally shuffled."""
from __future__ import annotations

import numpy as np

from ..data.hdf5_source import HDF5Source
from ..registry import register_layer
from .prefetching_layer import PrefetchingDataLayer


@register_layer("HDF5Data")
class HDF5DataLayer(PrefetchingDataLayer):
    """Rows of the datasets named like the tops, from the .h5 files of a list file.

    Tops: one per dataset, (batch_size, *dataset.shape[1:]), in the net's dtype. No
    transform. One worker reads the batches ahead (the source caches the file it read
    last); on a GPU they are copied as the Data layer's are.
    """

    param_name = "hdf5_data_param"
    num_top = (1, None)

    def setup(self, bottom, top):
        p = self.param
        if not p.source:
            raise self.error("hdf5_data_param.source is not set",
                             hint="give a text file listing the .h5 files")
        self.batch_size = self._check_batch_size(p.batch_size, "hdf5_data_param.batch_size")
        self._init_stream()
        names = list(self.layer_param.top) or [f"top{i}" for i in range(len(top))]
        self.hdf5 = HDF5Source(p.source, names, p.shuffle, seed_key=self._source_seed())
        self.names = names
        for blob, name in zip(top, names):
            blob.reshape((self.batch_size,) + self.hdf5.item_shapes[name])
        self._init_prefetch(0, workers=1)

    def _source_seed(self) -> tuple:
        # No rank in the key: every rank must see the same permutation to split it (the solver
        # seeds rank r with seed + r, so the shuffle uses the rank-0 seed).
        return self._seed - self.ctx.rank, self.ctx.net_key & 0xFFFFFFFF, self._key

    def reset_workers(self) -> None:
        # The workers (re)start at ``consumed``: after a restore, with the restored seed.
        self.hdf5.reseed(self._source_seed())

    def load_batch(self, index: int, batch) -> None:
        """Read batch ``index``'s rows into ``batch`` (runs in the worker thread)."""
        positions = (index * self.batch_size + np.arange(self.batch_size)) * self._world + self._rank
        shapes = self.hdf5.item_shapes
        self.hdf5.read(positions, {name: batch.array(name, (self.batch_size,) + shapes[name], self.dtype)
                                   for name in self.names})

    def batch_arrays(self, batch, tops: int) -> list:
        return [batch.buffer(name) for name in self.names[:tops]]
