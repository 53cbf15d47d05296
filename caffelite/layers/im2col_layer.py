"""Im2col (``convolution_param``): the unrolled convolution windows as a blob.

Bottom (N, C, *S) (channel axis ``axis``; axes before it count as N) with
kernel K, stride s, pad p and dilation d per spatial axis -> top
(N, C * prod(K), *So), So = floor((S + 2p - (d(K-1)+1)) / s) + 1, in Caffe's
channel-major row order: row c * prod(K) + (k_1 ... k_n in row-major order)::

    top[n, (c, k), o] = x_pad[n, c, o * s + k * d]        (0 outside the image)

Backward is col2im: each top diff entry is added back to the pixel it came
from. Both loop over the prod(K) kernel offsets only, moving a whole
(N, C, *So) block per step with strided slices (see im2col.py).
"""
from __future__ import annotations

from ..registry import register_layer
from .base import Layer, check_not_in_place
from .convolution import _spatial_values
from .im2col import Geometry, Workspace


@register_layer("Im2col")
class Im2colLayer(Layer):
    num_bottom = 1
    num_top = 1
    param_name = "convolution_param"

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        self.axis = bottom[0].canonical_axis(self.param.axis)
        axes = bottom[0].num_axes - self.axis - 1
        if axes < 1:
            raise self.error(f"needs at least one spatial axis after axis {self.axis}, "
                             f"bottom is {bottom[0].shape}", hint="check 'axis' and the bottom's shape")
        kernel = _spatial_values(self, "kernel", axes, None)
        stride = _spatial_values(self, "stride", axes, 1)
        pad = _spatial_values(self, "pad", axes, 0)
        dilation = [int(v) for v in self.param.dilation]
        if len(dilation) not in (0, 1, axes):
            raise self.error(f"dilation must be given once, or once per spatial axis "
                             f"({len(dilation)} given, {axes} spatial axes)", hint="give 1 value")
        dilation = tuple(dilation * axes if len(dilation) == 1 else dilation) or (1,) * axes
        for name, values in (("kernel", kernel), ("stride", stride), ("dilation", dilation)):
            if any(v <= 0 for v in values):
                raise self.error(f"{name} dimensions must be positive, got {values}",
                                 hint=f"set {name} to positive values")
        self.geometry = Geometry(kernel, stride, pad, dilation)
        self.ws = Workspace()

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        g = self.geometry
        if len(shape) != self.axis + 1 + len(g.kernel):
            raise self.error(f"bottom {shape} does not have the {len(g.kernel)} spatial axes "
                             f"it was set up with", hint="keep the bottom's number of axes")
        self.num = bottom[0].count_range(0, self.axis)
        self.channels = shape[self.axis]
        self.spatial = shape[self.axis + 1:]
        self.out_spatial = g.conv_out(self.spatial)
        if min(self.out_spatial) <= 0:
            raise self.error(f"output size {self.out_spatial} is not positive for input {self.spatial}",
                             hint="the input is smaller than the kernel: reduce kernel_size or add pad")
        top[0].reshape(shape[:self.axis] + (self.channels * g.kernel_count,) + self.out_spatial)

    def _image(self, array):
        return array.reshape((self.num, self.channels) + self.spatial)

    def _columns(self, array):
        """The top as (N, C, *K, *So)."""
        return array.reshape((self.num, self.channels) + self.geometry.kernel + self.out_spatial)

    def _padded_shape(self) -> tuple:
        return (self.num, self.channels) + tuple(s + 2 * p for s, p in zip(self.spatial, self.geometry.pad))

    def _interior(self) -> tuple:
        return (slice(None), slice(None)) + self.geometry.interior(self.spatial)

    def forward(self, bottom, top):
        g = self.geometry
        x = self._image(bottom[0].data)
        if any(g.pad):
            padded = self.ws.get(self.xp, "pad", self._padded_shape(), x.dtype, fill=0)
            padded[self._interior()] = x  # the border stays 0: only the interior is written
            x = padded
        cols = self._columns(top[0].data)
        lead = (slice(None), slice(None))
        for offset in g.offsets():
            cols[lead + offset] = x[lead + g.window(offset, self.out_spatial)]

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        g = self.geometry
        dx = self._image(bottom[0].diff)
        acc = self.ws.get(self.xp, "acc", self._padded_shape(), dx.dtype) if any(g.pad) else dx
        acc[...] = 0
        cols = self._columns(top[0].diff)
        lead = (slice(None), slice(None))
        for offset in g.offsets():
            acc[lead + g.window(offset, self.out_spatial)] += cols[lead + offset]
        if acc is not dx:
            dx[...] = acc[self._interior()]
