"""Reduction (``reduction_param``): SUM, ASUM, SUMSQ or MEAN over the tail axes.

Bottom (d0, ..., dk) with axis a -> top (d0, ..., d(a-1)) (a scalar for a = 0).
The bottom is viewed as (num, dim), num = count(:a), dim = count(a:)::

    SUM    y = coeff * sum(x)          dx = coeff * dy
    ASUM   y = coeff * sum(|x|)        dx = coeff * dy * sign(x)
    SUMSQ  y = coeff * sum(x^2)        dx = 2 * coeff * dy * x
    MEAN   y = coeff / dim * sum(x)    dx = coeff / dim * dy
"""
from __future__ import annotations

from ..errors import ConfigError
from ..registry import register_layer
from .base import Layer, check_not_in_place

SUM, ASUM, SUMSQ, MEAN = 1, 2, 3, 4  # ReductionParameter.ReductionOp
_NAMES = {SUM: "SUM", ASUM: "ASUM", SUMSQ: "SUMSQ", MEAN: "MEAN"}


@register_layer("Reduction")
class ReductionLayer(Layer):
    num_bottom = 1
    num_top = 1
    param_name = "reduction_param"

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        self.op = self.param.operation
        if self.op not in _NAMES:
            raise self.error(f"unknown reduction operation {self.op}",
                             hint="use SUM, ASUM, SUMSQ or MEAN")

    def reshape(self, bottom, top):
        b = bottom[0]
        try:
            axis = b.canonical_axis(self.param.axis)
        except ConfigError:
            raise self.error(f"axis {self.param.axis} is out of range for bottom {b.shape}",
                             hint=f"use an axis in [-{b.num_axes}, {b.num_axes})") from None
        top[0].reshape(b.shape[:axis])
        self.num, self.dim = b.count_range(0, axis), b.count_range(axis)
        self.coeff = float(self.param.coeff)
        if self.op == MEAN:
            self.coeff /= self.dim

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].data.reshape(self.num, self.dim)
        y = top[0].data.reshape(self.num)
        if self.op in (SUM, MEAN):
            x.sum(axis=1, out=y)
        elif self.op == ASUM:
            xp.abs(x).sum(axis=1, out=y)
        else:
            y[...] = xp.einsum("ij,ij->i", x, x)
        if self.coeff != 1:
            y *= self.coeff

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = self.xp
        scale = top[0].diff.reshape(self.num, 1) * self.coeff
        dx = bottom[0].diff.reshape(self.num, self.dim)
        if self.op in (SUM, MEAN):
            dx[...] = scale
        elif self.op == ASUM:
            xp.sign(bottom[0].data.reshape(self.num, self.dim), out=dx)
            dx *= scale
        else:
            scale *= 2
            xp.multiply(bottom[0].data.reshape(self.num, self.dim), scale, out=dx)
