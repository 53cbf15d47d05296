"""Parameter (``parameter_param``): one learned blob exposed as the layer's top.

No bottoms; top = W of ``parameter_param.shape``, zero-initialised (Caffe's
ParameterLayer has no filler: set it with weights or by a solver). The top
shares W's data memory, so updates show without a copy; backward adds the
top diff into W's diff (Caffe shares the diff instead, which would let a
consumer's overwrite of the top diff drop accumulated gradients).
"""
from __future__ import annotations

from ..registry import register_layer
from .base import Layer, blob_shape_list


@register_layer("Parameter")
class ParameterLayer(Layer):
    num_bottom = 0
    num_top = 1
    param_name = "parameter_param"

    def setup(self, bottom, top):
        shape = blob_shape_list(self.param.shape)
        if any(d < 0 for d in shape):
            raise self.error(f"shape {shape} has a negative dimension",
                             hint="give parameter_param { shape { dim: ... } }")
        self.blobs = [self.make_blob(shape, f"{self.name}_w")]
        self.blobs[0].data[...] = 0

    def reshape(self, bottom, top):
        top[0].reshape(self.blobs[0].shape)
        top[0].share_data(self.blobs[0])

    def forward(self, bottom, top):
        # Re-shared every pass: parameter sharing or a device move may replace W's memory.
        top[0].share_data(self.blobs[0])

    def backward(self, top, propagate_down, bottom):
        if self.param_propagate_down[0]:
            diff = self.blobs[0].diff
            diff += top[0].diff
