"""ArgMax (``argmax_param``): the indices (and optionally values) of the top_k largest entries.

Without ``axis`` every item (N, ...) is flattened to (N, D):
    top (N, 1, top_k) holds the indices; with ``out_max_val`` top (N, 2, top_k)
    holds the indices in row 0 and the values in row 1. (Axes padded with 1s
    to at least 3, as Caffe: a 4-D bottom gives (N, 1, top_k, 1).)
With ``axis`` a: top is the bottom's shape with dim a replaced by top_k and
    holds the indices along a, or the values with ``out_max_val``.
Order is Caffe's: largest first, and among equal values the larger index first
(its sort compares (value, index) pairs). Indices are written as floats.
No gradient: Caffe has none; backward writes zeros if asked.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..registry import register_layer
from .base import Layer, check_not_in_place


@register_layer("ArgMax")
class ArgMaxLayer(Layer):
    num_bottom = 1
    num_top = 1
    param_name = "argmax_param"

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        p = self.param
        self.out_max_val = p.out_max_val
        self.top_k = int(p.top_k)
        self.has_axis = p.HasField("axis")
        if self.top_k < 1:
            raise self.error(f"top_k must be at least 1, got {self.top_k}", hint="e.g. top_k: 1")

    def reshape(self, bottom, top):
        b = bottom[0]
        if self.has_axis:
            try:
                self.axis = b.canonical_axis(self.param.axis)
            except ConfigError:
                raise self.error(f"axis {self.param.axis} is out of range for bottom {b.shape}",
                                 hint=f"use an axis in [-{b.num_axes}, {b.num_axes})") from None
            dim = b.shape[self.axis]
            shape = list(b.shape)
            shape[self.axis] = self.top_k
        else:
            dim = b.count_range(1)
            shape = [1] * max(b.num_axes, 3)
            shape[0] = b.shape[0]
            shape[1] = 2 if self.out_max_val else 1
            shape[2] = self.top_k
        if self.top_k > dim:
            where = f"axis {self.axis}" if self.has_axis else "one item"
            raise self.error(f"top_k {self.top_k} is larger than the {dim} values of {where} "
                             f"of bottom {b.shape}", hint=f"use top_k <= {dim}")
        top[0].reshape(shape)

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].data
        # Values to rank along the last axis: (..., D).
        ranked = xp.moveaxis(x, self.axis, -1) if self.has_axis else x.reshape(x.shape[0], -1)
        dim = ranked.shape[-1]
        if self.top_k == 1:
            # The last maximum: the first one of the reversed row.
            index = (dim - 1) - xp.argmax(ranked[..., ::-1], axis=-1)[..., None]
        else:
            # A stable ascending sort reversed is descending with ties by larger index first.
            index = xp.argsort(ranked, axis=-1, kind="stable")[..., ::-1][..., :self.top_k]
        if self.has_axis:
            out = xp.take_along_axis(ranked, index, axis=-1) if self.out_max_val else index
            top[0].data[...] = xp.moveaxis(out, -1, self.axis)
            return
        y = top[0].data.reshape(x.shape[0], -1, self.top_k)
        y[:, 0] = index
        if self.out_max_val:
            y[:, 1] = xp.take_along_axis(ranked, index, axis=-1)

    def backward(self, top, propagate_down, bottom):
        # Caffe has no backward here; the gradient is 0 almost everywhere.
        if propagate_down[0]:
            bottom[0].diff[...] = 0

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False
