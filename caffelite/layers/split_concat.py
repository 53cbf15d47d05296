"""Split, Concat and Slice: one blob to many and back.

- Split: every top IS the bottom's data (shared memory, no copy); the
  bottom's diff is the sum of the tops' diffs. The Net inserts these where a
  blob feeds several layers.
- Concat: bottoms (..., n_i, ...) joined along ``concat_param.axis`` into
  (..., sum n_i, ...); all other dimensions must agree.
- Slice: the inverse; ``slice_param.slice_point`` gives the cut positions
  along ``axis`` (none = equal parts).
"""
from __future__ import annotations

from ..errors import ConfigError
from ..registry import register_layer
from .base import Layer, check_not_in_place


def _legacy_axis(layer, param, legacy: str, bottom) -> int:
    """``axis``, or the deprecated non-negative ``concat_dim`` / ``slice_dim``."""
    if param.HasField(legacy):
        if param.HasField("axis"):
            raise layer.error(f"both axis and {legacy} are given",
                              hint=f"keep only axis ({legacy} is its deprecated name)")
        axis = int(getattr(param, legacy))
        if axis >= bottom.num_axes:
            raise layer.error(f"{legacy} {axis} is out of range for a {bottom.num_axes}-axis "
                              f"bottom {bottom.shape}", hint=f"use an axis below {bottom.num_axes}")
        return axis
    try:
        return bottom.canonical_axis(param.axis)
    except ConfigError:
        raise layer.error(f"axis {param.axis} is out of range for bottom {bottom.shape}",
                          hint=f"use an axis in [-{bottom.num_axes}, {bottom.num_axes})") from None


def _along(axis: int, start: int, stop: int) -> tuple:
    """Index selecting [start, stop) on ``axis`` and everything elsewhere."""
    return (slice(None),) * axis + (slice(start, stop),)


@register_layer("Split")
class SplitLayer(Layer):
    """One bottom shared by N tops; backward sums the tops' diffs."""

    num_bottom = 1
    num_top = (1, None)

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)

    def reshape(self, bottom, top):
        for t in top:
            t.reshape_like(bottom[0])
            t.share_data(bottom[0])

    def forward(self, bottom, top):
        pass  # the tops already hold the bottom's data

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        diff = bottom[0].diff
        if len(top) == 1:
            diff[...] = top[0].diff
            return
        self.xp.add(top[0].diff, top[1].diff, out=diff)
        for t in top[2:]:
            diff += t.diff


@register_layer("Concat")
class ConcatLayer(Layer):
    """Bottoms joined along ``axis`` (default 1, channels)."""

    num_bottom = (1, None)
    num_top = 1
    param_name = "concat_param"

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)

    def reshape(self, bottom, top):
        first = bottom[0]
        self.axis = axis = _legacy_axis(self, self.param, "concat_dim", first)
        sizes = []
        for i, b in enumerate(bottom):
            same = (b.num_axes == first.num_axes
                    and all(d == e for k, (d, e) in enumerate(zip(b.shape, first.shape)) if k != axis))
            if not same:
                raise self.error(f"bottom {i} has shape {b.shape} but bottom 0 has {first.shape}; "
                                 f"all must match except on axis {axis}",
                                 hint="check the bottoms' shapes or concat_param.axis")
            sizes.append(b.shape[axis])
        self.sizes = sizes
        shape = list(first.shape)
        shape[axis] = sum(sizes)
        top[0].reshape(shape)
        if len(bottom) == 1:
            # Nothing to join: the top is the bottom (as Caffe does).
            top[0].share_data(first)
            top[0].share_diff(first)

    def forward(self, bottom, top):
        if len(bottom) > 1:
            self.xp.concatenate([b.data for b in bottom], axis=self.axis, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if len(bottom) == 1:
            return
        diff = top[0].diff
        offset = 0
        for b, n, down in zip(bottom, self.sizes, propagate_down):
            if down:
                b.diff[...] = diff[_along(self.axis, offset, offset + n)]
            offset += n


@register_layer("Slice")
class SliceLayer(Layer):
    """One bottom cut along ``axis`` into N tops, at ``slice_point`` or in equal parts."""

    num_bottom = 1
    num_top = (1, None)
    param_name = "slice_param"

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        self.slice_points = [int(p) for p in self.param.slice_point]
        if self.slice_points and len(self.slice_points) != len(top) - 1:
            raise self.error(f"has {len(self.slice_points)} slice_point values for {len(top)} tops",
                             hint="give one slice_point fewer than tops, or none for equal parts")

    def reshape(self, bottom, top):
        b = bottom[0]
        self.axis = axis = _legacy_axis(self, self.param, "slice_dim", b)
        dim = b.shape[axis]
        n = len(top)
        if self.slice_points:
            points = self.slice_points
            if any(q <= p for p, q in zip([0] + points, points)) or points[-1] > dim:
                raise self.error(f"slice_point {points} must increase strictly within "
                                 f"(0, {dim}] (axis {axis} of bottom {b.shape})",
                                 hint="fix slice_param.slice_point")
            bounds = [0] + points + [dim]
        else:
            if dim % n:
                raise self.error(f"axis {axis} of bottom {b.shape} has {dim} entries, "
                                 f"not divisible into {n} equal tops",
                                 hint="give slice_param.slice_point, or change the number of tops")
            bounds = [k * (dim // n) for k in range(n + 1)]
        self.bounds = bounds
        for k, t in enumerate(top):
            shape = list(b.shape)
            shape[axis] = bounds[k + 1] - bounds[k]
            t.reshape(shape)
        if n == 1:
            top[0].share_data(b)
            top[0].share_diff(b)

    def forward(self, bottom, top):
        if len(top) == 1:
            return
        data = bottom[0].data
        for k, t in enumerate(top):
            t.data[...] = data[_along(self.axis, self.bounds[k], self.bounds[k + 1])]

    def backward(self, top, propagate_down, bottom):
        if len(top) == 1 or not propagate_down[0]:
            return
        diff = bottom[0].diff
        for k, t in enumerate(top):
            diff[_along(self.axis, self.bounds[k], self.bounds[k + 1])] = t.diff
