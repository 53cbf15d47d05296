"""Crop (``crop_param``): cut bottom 0 to the shape of bottom 1 from ``axis`` on.

Bottoms A (to crop) and B (reference, same number of axes). For every axis
i >= ``axis`` (default 2, i.e. the spatial axes of N x C x H x W)::

    top.shape[i] = B.shape[i],  top = A[..., o_i : o_i + B.shape[i], ...]

Axes before ``axis`` are kept whole. ``offset``: none (all 0), one value for
every cropped axis, or one per cropped axis. Backward writes the top's diff
into the window of A's diff and zeros elsewhere; B only gives its shape, so its
diff (if asked for) is zero.
"""
from __future__ import annotations

from ..registry import register_layer
from .base import Layer, check_not_in_place


@register_layer("Crop")
class CropLayer(Layer):
    num_bottom = 2
    num_top = 1
    param_name = "crop_param"

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        axes = bottom[0].num_axes
        self.axis = bottom[0].canonical_axis(self.param.axis)
        offsets = [int(v) for v in self.param.offset]
        if len(offsets) > 1 and self.axis + len(offsets) != axes:
            raise self.error(f"{len(offsets)} offsets given for {axes - self.axis} cropped axes "
                             f"(axis {self.axis} on, of a {axes}-axis bottom)",
                             hint="give no offset, one for all cropped axes, or one per cropped axis")
        self.offsets = offsets

    def reshape(self, bottom, top):
        a, b = bottom[0].shape, bottom[1].shape
        if len(a) != len(b):
            raise self.error(f"the bottom to crop {a} and the reference {b} must have the same "
                             f"number of axes", hint="crop to a blob of the same rank")
        shape, window = [], []
        for i, size in enumerate(a):
            if i < self.axis:
                shape.append(size)
                window.append(slice(None))
                continue
            offset = 0 if not self.offsets else self.offsets[0 if len(self.offsets) == 1 else i - self.axis]
            if size - offset < b[i]:
                raise self.error(f"invalid crop in axis {i}: offset {offset} + size {b[i]} exceeds "
                                 f"the bottom's {size}", hint="reduce the offset or crop to a smaller blob")
            shape.append(b[i])
            window.append(slice(offset, offset + b[i]))
        self.window = tuple(window)
        top[0].reshape(shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data[self.window]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            diff = bottom[0].diff
            diff[...] = 0
            diff[self.window] = top[0].diff
        if len(propagate_down) > 1 and propagate_down[1]:
            bottom[1].diff[...] = 0
