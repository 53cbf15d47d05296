"""LRN: local response normalisation (Caffe's two regions), bottom and top (N, C, H, W).

ACROSS_CHANNELS, with n = local_size and the window of n channels centred on c
(channels outside [0, C) count as zero)::

    scale[c] = k + alpha / n * sum_{c' in window(c)} x[c']^2
    y = x * scale^-beta
    dx = dy * scale^-beta - (2 alpha beta / n) * x * sum_{c' in window(c)} dy[c'] y[c'] / scale[c']

WITHIN_CHANNEL, as Caffe builds it (Power x^2 -> AVE Pooling n x n, stride 1,
pad (n-1)/2 -> Power with shift 1): Caffe's average pool divides by the window
clipped to the padded image, which with stride 1 and that pad is always n^2,
and k is not used::

    scale[h, w] = 1 + alpha / n^2 * sum_{n x n window around (h, w)} x^2
    y = x * scale^-beta
    dx = dy * scale^-beta - (2 alpha beta / n^2) * x * sum_{window} dy y / scale

Both window sums add n shifted slices of a zero-padded buffer (scratch from the
arena all layers share, im2col.ARENA; only ``scale`` is kept for backward): vectorised over
the images, and exact (a running or cumulative sum over a long axis loses the small
terms in float32). Images are independent, so the CPU runs them in parts on all cores
(cpu_threads.py). On a GPU both regions run caffelite.kernels.lrn instead: one pass
forward, one backward.
"""
from __future__ import annotations

import math

from ..registry import register_layer
from .base import Layer, check_not_in_place
from .cpu_threads import run_parts, split
from .im2col import ARENA, fill_outside

ACROSS_CHANNELS = 0
WITHIN_CHANNEL = 1


@register_layer("LRN")
class LRNLayer(Layer):
    num_bottom = 1
    num_top = 1
    param_name = "lrn_param"

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        p = self.param
        self.size = int(p.local_size)
        if self.size % 2 == 0 or self.size < 1:
            raise self.error(f"local_size must be odd, got {self.size}",
                             hint="the window is centred on each element, e.g. local_size: 5")
        self.pre_pad = (self.size - 1) // 2
        self.alpha, self.beta, self.k = float(p.alpha), float(p.beta), float(p.k)
        self.region = p.norm_region
        if self.region not in (ACROSS_CHANNELS, WITHIN_CHANNEL):
            raise self.error(f"unknown norm_region {self.region}",
                             hint="use ACROSS_CHANNELS or WITHIN_CHANNEL")
        self.scale = None   # (N, C, H, W), kept for backward

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"needs a 4-axis bottom (N, C, H, W), got {bottom[0].shape}",
                             hint="reshape the bottom to N x C x H x W")
        top[0].reshape_like(bottom[0])
        shape = bottom[0].shape
        if self.scale is None or self.scale.shape != shape:
            self.scale = self.xp.empty(shape, self.dtype)

    def _window_buffers(self, shape) -> tuple:
        """Scratch for ``_window_sum`` over images of ``shape``: the zero-padded values and,
        within a channel, the rows' window sums."""
        b, c, h, w = shape
        p = 2 * self.pre_pad
        if self.region == ACROSS_CHANNELS:
            return (ARENA.get((b, c + p, h, w), self.dtype),)
        return ARENA.get((b, c, h + p, w + p), self.dtype), ARENA.get((b, c, h + p, w), self.dtype)

    def _window_sum(self, values, out, buf, rows=None):
        """out = sum of ``values`` over each element's window (zero outside), in the scratch of
        ``_window_buffers``."""
        n, p = self.size, self.pre_pad
        c, h, w = values.shape[1:]
        if self.region == ACROSS_CHANNELS:
            fill_outside(buf, (slice(None), slice(p, p + c)), 0)
            buf[:, p:p + c] = values
            out[...] = buf[:, 0:c]
            for i in range(1, n):
                out += buf[:, i:i + c]
        else:
            fill_outside(buf, (slice(None), slice(None), slice(p, p + h), slice(p, p + w)), 0)
            buf[:, :, p:p + h, p:p + w] = values
            # Separable: sum the rows' windows into the (still zero-padded) columns, then the columns.
            rows[...] = buf[:, :, :, 0:w]
            for i in range(1, n):
                rows += buf[:, :, :, i:i + w]
            out[...] = rows[:, :, 0:h]
            for i in range(1, n):
                out += rows[:, :, i:i + h]

    def _window_count(self) -> int:
        return self.size if self.region == ACROSS_CHANNELS else self.size * self.size

    def _shift(self) -> float:
        return self.k if self.region == ACROSS_CHANNELS else 1.0

    def _in_parts(self, step, *arrays, scratch=()) -> None:
        """step(*its images of arrays, *its images of scratch) for parts of the images at once,
        on all cores; ``scratch(shape)`` gives the whole batch's scratch arrays."""
        shape = arrays[0].shape
        with ARENA.scope():
            whole = arrays + (scratch(shape) if scratch else ())
            run_parts(lambda part: step(*(a[slice(*part)] for a in whole)),
                      split(shape[0], math.prod(shape[1:])))

    def forward(self, bottom, top):
        if self.device.is_gpu:
            from ..kernels import lrn as kernels

            kernels.forward(bottom[0].data, self.scale, top[0].data,
                            across=self.region == ACROSS_CHANNELS, size=self.size,
                            alpha_over_size=self.alpha / self._window_count(), k=self._shift(),
                            beta=self.beta)
            return
        self._in_parts(self._forward_cpu, bottom[0].data, top[0].data, self.scale,
                       scratch=self._window_buffers)

    def _forward_cpu(self, x, y, scale, *buffers) -> None:
        xp = self.xp
        xp.multiply(x, x, out=y)  # y holds x^2 until the end
        self._window_sum(y, scale, *buffers)
        scale *= self.alpha / self._window_count()
        scale += self._shift()
        xp.power(scale, -self.beta, out=y)
        y *= x

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if self.device.is_gpu:
            from ..kernels import lrn as kernels

            kernels.backward(bottom[0].data, top[0].data, top[0].diff, self.scale, bottom[0].diff,
                             across=self.region == ACROSS_CHANNELS, size=self.size,
                             cache_ratio=2.0 * self.alpha * self.beta / self._window_count(),
                             beta=self.beta)
            return
        self._in_parts(self._backward_cpu, bottom[0].data, top[0].data, top[0].diff, self.scale,
                       bottom[0].diff, scratch=lambda shape: (ARENA.get(shape, self.dtype),
                                                              *self._window_buffers(shape)))

    def _backward_cpu(self, x, y, dy, scale, dx, ratio, *buffers) -> None:
        xp = self.xp
        xp.multiply(dy, y, out=ratio)
        ratio /= scale
        self._window_sum(ratio, ratio, *buffers)
        ratio *= x
        ratio *= 2.0 * self.alpha * self.beta / self._window_count()
        xp.power(scale, -self.beta, out=dx)
        dx *= dy
        dx -= ratio
