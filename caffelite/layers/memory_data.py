"""MemoryData: batches from NumPy arrays handed to the layer with ``reset``."""
from __future__ import annotations

import numpy as np

from ..data.transform import DataTransformer
from ..registry import register_layer
from .prefetching_layer import StreamLayer


@register_layer("MemoryData")
class MemoryDataLayer(StreamLayer):
    """Batches from NumPy arrays given with ``reset(data, labels)``, wrapping around.

    data: (n, channels, height, width), labels: (n,). The transform_param applies.
    """

    param_name = "memory_data_param"
    num_top = (1, 2)

    def setup(self, bottom, top):
        p = self.param
        self.batch_size = self._check_batch_size(p.batch_size, "memory_data_param.batch_size")
        self.item_shape = (int(p.channels), int(p.height), int(p.width))
        if min(self.item_shape) <= 0:
            raise self.error("memory_data_param needs positive channels, height and width",
                             hint="set the shape of one item")
        self.transformer = DataTransformer(self.layer_param.transform_param, self.phase,
                                           self.dtype, layer=self.name)
        out_shape = self.transformer.output_shape(self.item_shape)
        top[0].reshape((self.batch_size,) + out_shape)
        if len(top) > 1:
            top[1].reshape((self.batch_size,))
        self._init_stream()
        self._data = self._labels = None
        self.pos = 0
        self._out = None

    def reset(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Serve ``data`` (n x C x H x W) and ``labels`` (n) from the start."""
        data = np.asarray(data)
        labels = np.asarray(labels).reshape(-1)
        if data.ndim != 4 or data.shape[1:] != self.item_shape or data.shape[0] == 0:
            raise self.error(f"reset() got data of shape {data.shape}; expected (n, "
                             f"{', '.join(map(str, self.item_shape))}) with n >= 1",
                             hint="match memory_data_param's channels/height/width")
        if labels.shape[0] != data.shape[0]:
            raise self.error(f"reset() got {labels.shape[0]} labels for {data.shape[0]} items",
                             hint="give one label per item")
        self._data, self._labels, self.pos = data, labels, 0

    def forward(self, bottom, top):
        if self._data is None:
            raise self.error("has no data", hint="call reset(data, labels) before forward")
        n, b = self._data.shape[0], self.batch_size
        if self.pos + b <= n:
            items, labels = self._data[self.pos:self.pos + b], self._labels[self.pos:self.pos + b]
        else:
            index = (self.pos + np.arange(b)) % n
            items, labels = self._data[index], self._labels[index]
        rng = self.batch_rng(self.consumed) if self.transformer.is_random else None
        self._out = self.transformer(items, rng, self._out)
        top[0].reshape(self._out.shape)
        top[0].set_data(self._out)
        if len(top) > 1:
            top[1].reshape((b,))
            top[1].set_data(labels.astype(self.dtype))
        self.pos = (self.pos + b) % n
        self.consumed += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pos = int(state.get("pos", 0))
