"""Eltwise: element-wise PROD, SUM (with coefficients) or MAX of >= 2 same-shape bottoms.

    SUM:  y = sum_i c_i x_i          dx_i = c_i dy          (c_i = 1 without coeff)
    PROD: y = prod_i x_i             dx_i = dy * prod_{j != i} x_j
                                     (or dy * y / x_i with stable_prod_grad: false)
    MAX:  y = max_i x_i              dx_i = dy where bottom i won, else 0

MAX breaks ties as Caffe's CPU code does: bottom 1 beats bottom 0 on a tie,
and a later bottom (2, 3, ...) replaces the winner only when strictly larger.

On a GPU the common SUM (two bottoms, no coefficients: ResNet's shortcut) is one kernel each
way: y = a + b forward, and backward one pass that reads dy once and writes both bottoms' diffs.
"""
from __future__ import annotations

import numpy as np

from ..kernels import fused_kernel
from ..proto import pb
from ..registry import register_layer
from .base import Layer, check_not_in_place

PROD = pb.EltwiseParameter.PROD
SUM = pb.EltwiseParameter.SUM
MAX = pb.EltwiseParameter.MAX


@register_layer("Eltwise")
class EltwiseLayer(Layer):
    num_bottom = (2, None)
    num_top = 1
    param_name = "eltwise_param"

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        self.op = self.param.operation
        coeff = [float(c) for c in self.param.coeff]
        if coeff and len(coeff) != len(bottom):
            raise self.error(f"has {len(coeff)} coeff values for {len(bottom)} bottoms",
                             hint="give one coeff per bottom, or none")
        if coeff and self.op == PROD:
            raise self.error("coeff is only used with operation SUM",
                             hint="remove coeff, or use operation: SUM")
        # Caffe accepts (and ignores) coeff with MAX; so do we.
        self.coeff = coeff or [1.0] * len(bottom)
        self.stable_prod_grad = self.param.stable_prod_grad

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != shape:
                raise self.error(f"bottom {i} has shape {b.shape} but bottom 0 has {shape}",
                                 hint="Eltwise needs bottoms of identical shape")
        top[0].reshape(shape)

    def _plain_pair_on_gpu(self) -> bool:
        return self.op == SUM and len(self.coeff) == 2 and self.coeff == [1.0, 1.0] and self.xp is not np

    def forward(self, bottom, top):
        xp = self.xp
        out = top[0].data
        if self._plain_pair_on_gpu():
            fused_kernel(xp, "T a, T b", "T y", "y = a + b", "caffelite_sum2")(bottom[0].data, bottom[1].data, out)
        elif self.op == SUM:
            self._weighted(bottom[0].data, self.coeff[0], out)
            for b, c in zip(bottom[1:], self.coeff[1:]):
                if c == 1.0:
                    out += b.data
                else:
                    out += c * b.data
        elif self.op == PROD:
            xp.multiply(bottom[0].data, bottom[1].data, out=out)
            for b in bottom[2:]:
                out *= b.data
        else:
            a, b = bottom[0].data, bottom[1].data
            # Caffe: a > b ? (a, 0) : (b, 1); NaN-safe the same way (NaN in a -> b wins).
            first_wins = a > b
            xp.copyto(out, b)
            xp.copyto(out, a, where=first_wins)
            self.max_idx = xp.logical_not(first_wins).astype(xp.int32)
            for i, blob in enumerate(bottom[2:], 2):
                later = blob.data
                wins = later > out
                xp.copyto(out, later, where=wins)
                xp.copyto(self.max_idx, i, where=wins)

    @staticmethod
    def _weighted(x, c: float, out) -> None:
        if c == 1.0:
            out[...] = x
        else:
            out[...] = c * x

    def backward(self, top, propagate_down, bottom):
        xp = self.xp
        dy = top[0].diff
        if self._plain_pair_on_gpu() and all(propagate_down):
            fused_kernel(xp, "T dy", "T d0, T d1", "d0 = dy; d1 = dy", "caffelite_sum2_backward")(
                dy, bottom[0].diff, bottom[1].diff)
            return
        for i, b in enumerate(bottom):
            if not propagate_down[i]:
                continue
            dx = b.diff
            if self.op == SUM:
                self._weighted(dy, self.coeff[i], dx)
            elif self.op == PROD:
                if self.stable_prod_grad:
                    others = [o.data for j, o in enumerate(bottom) if j != i]
                    xp.multiply(others[0], dy, out=dx)
                    for o in others[1:]:
                        dx *= o
                else:
                    xp.divide(top[0].data, b.data, out=dx)
                    dx *= dy
            else:
                xp.multiply(dy, self.max_idx == i, out=dx)
