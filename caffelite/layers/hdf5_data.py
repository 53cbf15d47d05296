"""HDF5Data: rows of HDF5 datasets, one top per dataset, optionally shuffled."""
from __future__ import annotations

import numpy as np

from ..data.hdf5_source import HDF5Source
from ..registry import register_layer
from .prefetching_layer import StreamLayer


@register_layer("HDF5Data")
class HDF5DataLayer(StreamLayer):
    """Rows of the datasets named like the tops, from the .h5 files of a list file.

    Tops: one per dataset, (batch_size, *dataset.shape[1:]). No transform.
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
        # No rank in the key: every rank must see the same permutation to split it (the solver
        # seeds rank r with seed + r, so the shuffle uses the rank-0 seed).
        self.hdf5 = HDF5Source(p.source, names, p.shuffle,
                               seed_key=(self._seed - self.ctx.rank, self.ctx.net_key & 0xFFFFFFFF,
                                         self._key))
        self.names = names
        for blob, name in zip(top, names):
            blob.reshape((self.batch_size,) + self.hdf5.item_shapes[name])

    def forward(self, bottom, top):
        positions = (self.consumed * self.batch_size + np.arange(self.batch_size)) * self._world + self._rank
        rows = self.hdf5.read(positions)
        for blob, name in zip(top, self.names):
            blob.reshape(rows[name].shape)
            blob.set_data(rows[name])
        self.consumed += 1

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.hdf5.reseed((self._seed - self.ctx.rank, *self.hdf5.seed_key[1:]))
