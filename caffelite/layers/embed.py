"""Embed (``embed_param``): a learned lookup table, the one-hot InnerProduct.

Bottom (...) of integer indices in [0, input_dim) -> top (..., num_output)::

    top[..., :] = W[x[...], :] + b        W (input_dim, num_output), b (num_output,)
    dW[k] += sum of dtop over the positions where x == k;   db += sum of dtop

The weight is stored (input_dim, num_output), transposed from InnerProduct,
so each lookup reads one contiguous row. The indices get no gradient.
"""
from __future__ import annotations

from ..fillers import fill
from ..registry import register_layer
from .base import Layer, check_not_in_place
from .selection import integer_indices, scatter_add_rows


@register_layer("Embed")
class EmbedLayer(Layer):
    num_bottom = 1
    num_top = 1
    param_name = "embed_param"

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        p = self.param
        self.num_output, self.input_dim = int(p.num_output), int(p.input_dim)
        if self.num_output <= 0:
            raise self.error("num_output must be positive", hint="add embed_param { num_output: ... }")
        if self.input_dim <= 0:
            raise self.error("input_dim (the vocabulary size) must be positive",
                             hint="add embed_param { input_dim: ... }")
        self.bias_term = p.bias_term
        self.blobs = [self.make_blob((self.input_dim, self.num_output), f"{self.name}_w")]
        fill(self.blobs[0], p.weight_filler, self.rng)
        if self.bias_term:
            self.blobs.append(self.make_blob((self.num_output,), f"{self.name}_b"))
            fill(self.blobs[1], p.bias_filler, self.rng)
        self._index = None

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape + (self.num_output,))

    def forward(self, bottom, top):
        self._index = integer_indices(self, bottom[0].data.reshape(-1), self.input_dim, "inputs")
        y = top[0].data.reshape(-1, self.num_output)
        self.xp.take(self.blobs[0].data, self._index, axis=0, out=y)
        if self.bias_term:
            y += self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(-1, self.num_output)
        if self.param_propagate_down[0]:
            scatter_add_rows(self.xp, self.blobs[0].diff, self._index, dy)
        if self.bias_term and self.param_propagate_down[1]:
            bias_diff = self.blobs[1].diff
            bias_diff += dy.sum(axis=0)
        if propagate_down[0]:
            bottom[0].diff[...] = 0  # indices have no gradient (Caffe refuses to be asked)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False
