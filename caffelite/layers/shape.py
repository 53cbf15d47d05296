"""Flatten, Reshape and Silence: layers that change how a blob is seen, not its values.

Flatten and Reshape give the top a new shape over the bottom's own data and
diff memory (no copy either way), as Caffe's ShareData/ShareDiff: forward and
backward have nothing left to do.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..registry import register_layer
from .base import Layer, check_not_in_place


def _share(top, bottom, shape) -> None:
    top.reshape(shape)
    top.share_data(bottom)
    top.share_diff(bottom)


@register_layer("Flatten")
class FlattenLayer(Layer):
    """Axes ``axis``..``end_axis`` (inclusive) merged into one.

    (N, C, H, W) with the defaults (1, -1) -> (N, C*H*W).
    """

    num_bottom = 1
    num_top = 1
    param_name = "flatten_param"

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)

    def reshape(self, bottom, top):
        b = bottom[0]
        try:
            start, end = b.canonical_axis(self.param.axis), b.canonical_axis(self.param.end_axis)
        except ConfigError:
            raise self.error(f"axis {self.param.axis} / end_axis {self.param.end_axis} out of "
                             f"range for bottom {b.shape}",
                             hint=f"use axes in [-{b.num_axes}, {b.num_axes})") from None
        if end < start:
            raise self.error(f"end_axis {self.param.end_axis} comes before axis {self.param.axis} "
                             f"for bottom {b.shape}", hint="end_axis must not precede axis")
        _share(top[0], b, b.shape[:start] + (b.count_range(start, end + 1),) + b.shape[end + 1:])

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        pass


@register_layer("Reshape")
class ReshapeLayer(Layer):
    """Axes [axis, axis + num_axes) of the bottom replaced by ``reshape_param.shape``.

    In the new shape, 0 copies the bottom's dimension at that position and
    one -1 is inferred from the count. E.g. (N, C, H, W) with shape
    {dim: [0, -1]} -> (N, C*H*W); with axis 1, num_axes 1 and shape
    {dim: [2, -1]} -> (N, 2, C/2, H, W).
    """

    num_bottom = 1
    num_top = 1
    param_name = "reshape_param"

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        dims = [int(d) for d in self.param.shape.dim]
        self.new_dims = dims
        self.copy_axes = [i for i, d in enumerate(dims) if d == 0]
        inferred = [i for i, d in enumerate(dims) if d == -1]
        if len(inferred) > 1:
            raise self.error(f"shape {dims} has {len(inferred)} dimensions of -1",
                             hint="at most one dimension can be inferred (-1)")
        if any(d < -1 for d in dims):
            raise self.error(f"shape {dims} has a negative dimension",
                             hint="use positive sizes, 0 to copy the bottom's size, -1 to infer one")
        self.inferred_axis = inferred[0] if inferred else None
        if self.param.num_axes < -1:
            raise self.error(f"num_axes {self.param.num_axes} is invalid",
                             hint="num_axes must be >= 0, or -1 for all remaining axes")

    def reshape(self, bottom, top):
        b = bottom[0]
        axis = self.param.axis
        # A negative axis counts from the end with -1 = after the last axis (Caffe's rule).
        start = axis if axis >= 0 else b.num_axes + axis + 1
        if not 0 <= start <= b.num_axes:
            raise self.error(f"axis {axis} is out of range for bottom {b.shape}",
                             hint=f"use an axis in [-{b.num_axes + 1}, {b.num_axes}]")
        end = b.num_axes if self.param.num_axes == -1 else start + self.param.num_axes
        if end > b.num_axes:
            raise self.error(f"axis {axis} + num_axes {self.param.num_axes} exceed the "
                             f"{b.num_axes} axes of bottom {b.shape}",
                             hint="lower reshape_param.num_axes")
        shape = list(b.shape[:start]) + list(self.new_dims) + list(b.shape[end:])
        for i in self.copy_axes:
            if start + i >= b.num_axes:
                raise self.error(f"shape {self.new_dims} has a 0 at position {i} but bottom "
                                 f"{b.shape} has no axis {start + i} to copy",
                                 hint="0 copies the bottom's dimension at the same position")
            shape[start + i] = b.shape[start + i]
        if self.inferred_axis is not None:
            known = 1
            for k, d in enumerate(shape):
                if k != start + self.inferred_axis:
                    known *= d
            if known == 0 or b.count % known:
                raise self.error(f"cannot infer the -1 in {self.new_dims}: bottom {b.shape} has "
                                 f"{b.count} values, not divisible by {known}",
                                 hint="check the other dimensions of reshape_param.shape")
            shape[start + self.inferred_axis] = b.count // known
        count = 1
        for d in shape:
            count *= d
        if count != b.count:
            raise self.error(f"cannot reshape {b.shape} ({b.count} values) to {tuple(shape)} "
                             f"({count} values)", hint="the new shape must keep the count; use -1 to infer one dimension")
        _share(top[0], b, shape)

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        pass


@register_layer("Silence")
class SilenceLayer(Layer):
    """Consumes bottoms so they are not net outputs; their gradient is zero."""

    num_bottom = (1, None)
    num_top = 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        for blob, down in zip(bottom, propagate_down):
            if down:
                blob.diff[...] = 0
