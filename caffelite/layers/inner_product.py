"""InnerProduct: a fully connected layer, one GEMM per pass.

The bottom is viewed as a matrix X of shape (M, K): M = count(:axis) rows
(usually N) and K = count(axis:) inputs, flattened. With W of shape
(num_output, K) (or (K, num_output) when ``transpose``) and bias b of shape
(num_output,)::

    top  = X W^T + b        (M, num_output); top shape = bottom.shape[:axis] + (num_output,)
    dX   = dtop W           (transpose: dtop W^T)
    dW  += dtop^T X         (transpose: X^T dtop)
    db  += column sums of dtop
"""
from __future__ import annotations

from ..fillers import fill
from ..kernels import gemm
from ..registry import register_layer
from .base import Layer, check_not_in_place


#: Weight gradients up to this many elements get a kept buffer when they must be
#: added (not written) to the diff.
KEEP_GRAD_BUFFER = 1 << 22


@register_layer("InnerProduct")
class InnerProductLayer(Layer):
    num_bottom = 1
    num_top = 1
    param_name = "inner_product_param"

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        p = self.param
        if p.num_output <= 0:
            raise self.error("num_output must be set to a positive number",
                             hint="add inner_product_param { num_output: ... }")
        self.num_output = int(p.num_output)
        self.bias_term = p.bias_term
        self.transpose = p.transpose
        self.axis = bottom[0].canonical_axis(p.axis)
        self.K = bottom[0].count_range(self.axis)
        shape = (self.K, self.num_output) if self.transpose else (self.num_output, self.K)
        self.blobs = [self.make_blob(shape, f"{self.name}_w")]
        fill(self.blobs[0], p.weight_filler, self.rng)
        if self.bias_term:
            self.blobs.append(self.make_blob((self.num_output,), f"{self.name}_b"))
            fill(self.blobs[1], p.bias_filler, self.rng)
        self._grad = None  # weight-gradient buffer, kept across passes

    def reshape(self, bottom, top):
        axis = bottom[0].canonical_axis(self.param.axis)
        K = bottom[0].count_range(axis)
        if K != self.K:
            raise self.error(
                f"input size incompatible with inner product parameters: the bottom "
                f"{bottom[0].shape} has {K} inputs from axis {axis} on, the weight was set up for {self.K}",
                hint="InnerProduct cannot change its input size after set-up; check the bottom's shape")
        self.axis = axis
        self.M = bottom[0].count_range(0, axis)
        top[0].reshape(bottom[0].shape[:axis] + (self.num_output,))

    def _weight_t(self, weight):
        """W^T as a (K, num_output) view, whichever way W is stored."""
        return weight if self.transpose else weight.T

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].data.reshape(self.M, self.K)
        y = top[0].data.reshape(self.M, self.num_output)
        if self.device.is_gpu:
            gemm.matmul(x, self._weight_t(self.blobs[0].data), y)
        else:
            xp.matmul(x, self._weight_t(self.blobs[0].data), out=y)
        if self.bias_term:
            y += self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        xp = self.xp
        dy = top[0].diff.reshape(self.M, self.num_output)
        if self.param_propagate_down[0]:
            x = bottom[0].data.reshape(self.M, self.K)
            a, b = (x.T, dy) if self.transpose else (dy.T, x)
            diff, overwrite = self.blobs[0].diff_for_update()
            if self.device.is_gpu:  # cuBLAS adds into the diff itself (beta = 1)
                gemm.matmul(a, b, diff, accumulate=not overwrite)
            elif overwrite:   # pending zeros: the GEMM writes the gradient in place
                xp.matmul(a, b, out=diff)
            elif diff.size <= KEEP_GRAD_BUFFER:
                # A kept buffer saves the allocation (and its page faults) per pass.
                if self._grad is None or self._grad.shape != diff.shape or self._grad.dtype != diff.dtype:
                    self._grad = xp.empty_like(diff)
                xp.matmul(a, b, out=self._grad)
                diff += self._grad
            else:   # a big weight (AlexNet's fc6: 151 MB) keeps no second copy: peak memory
                diff += xp.matmul(a, b)
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].add_to_diff(dy.sum(axis=0))
        if propagate_down[0]:
            dx = bottom[0].diff.reshape(self.M, self.K)
            if self.device.is_gpu:
                gemm.matmul(dy, self._weight_t(self.blobs[0].data).T, dx)
            else:
                xp.matmul(dy, self._weight_t(self.blobs[0].data).T, out=dx)
