"""Scale and Bias: multiply or add a blob broadcast along some axes of the bottom.

The operand s (a learned blob, or bottom[1]) has the shape of
bottom[0].shape[axis:axis + s.num_axes]; the bottom is viewed as
(outer, dim, inner) with outer = count(:axis), dim = s.count,
inner = count(axis + s.num_axes:). A scalar operand (no axes) applies to
everything.

Scale:  y = x * s (+ b with ``bias_term``, b shaped like s)
        dx = dy * s;  ds = sum over outer, inner of dy * x;  db = sum of dy
Bias:   y = x + b;  dx = dy;  db = sum over outer, inner of dy

Gradients to a learned blob are added; to bottom[1] they are written. Both run
in place; Scale then keeps a copy of the bottom for ds.
"""
from __future__ import annotations

from ..fillers import fill
from ..proto import pb
from ..registry import register_layer
from .base import Layer


def _learned_shape(layer: Layer, bottom0, axis_field: int, num_axes: int) -> tuple:
    """bottom0.shape[axis:axis + num_axes] (num_axes -1: to the end), checked like Caffe."""
    axis = bottom0.canonical_axis(axis_field)
    if num_axes < -1:
        raise layer.error(f"num_axes must be -1 (to the end) or >= 0, got {num_axes}",
                          hint="num_axes: 1 is one value per channel")
    if num_axes >= 0 and axis + num_axes > bottom0.num_axes:
        raise layer.error(f"axis {axis} with num_axes {num_axes} extends past the bottom's "
                          f"shape {bottom0.shape}", hint="lower axis or num_axes")
    end = bottom0.num_axes if num_axes == -1 else axis + num_axes
    return bottom0.shape[axis:end]


def _dims(layer: Layer, bottom0, operand_shape: tuple, axis_field: int, what: str) -> tuple:
    """(outer, dim, inner) of bottom0 for an operand of ``operand_shape``, checked."""
    # A scalar operand goes anywhere; Caffe puts it at axis 0.
    axis = 0 if not operand_shape else bottom0.canonical_axis(axis_field)
    span = bottom0.shape[axis:axis + len(operand_shape)]
    if tuple(span) != tuple(operand_shape):
        raise layer.error(f"{what} of shape {tuple(operand_shape)} does not match the bottom "
                          f"{bottom0.shape} from axis {axis} on",
                          hint=f"the {what} must have the shape of bottom dimensions axis.. axis+num_axes")
    dim = 1
    for d in operand_shape:
        dim *= d
    return bottom0.count_range(0, axis), dim, bottom0.count_range(axis + len(operand_shape))


def sum_outer_inner(xp, a, b=None):
    """Sum an (outer, dim, inner) array, or the product a * b of two, to (dim,).

    ``einsum`` forms no temporary for the product and runs several times
    faster than a multi-axis ``sum`` in NumPy.
    """
    if b is None:
        return xp.einsum("ods->d", a)
    return xp.einsum("ods,ods->d", a, b)


def keep_copy(xp, array, buffer):
    """Copy ``array`` into ``buffer``, reallocating it only when the shape changed."""
    if buffer is None or buffer.shape != array.shape:
        buffer = xp.empty_like(array)
    buffer[...] = array
    return buffer


@register_layer("Scale")
class ScaleLayer(Layer):
    num_bottom = (1, 2)
    num_top = 1
    param_name = "scale_param"

    def setup(self, bottom, top):
        p = self.param
        self.blobs = []
        if len(bottom) == 1:
            shape = _learned_shape(self, bottom[0], p.axis, p.num_axes)
            self.blobs.append(self.make_blob(shape, f"{self.name}_scale"))
            filler = p.filler if p.HasField("filler") else pb.FillerParameter(type="constant", value=1)
            fill(self.blobs[0], filler, self.rng)
        self.bias_id = None
        if p.bias_term:
            shape = bottom[1].shape if len(bottom) == 2 else self.blobs[0].shape
            self.bias_id = len(self.blobs)
            self.blobs.append(self.make_blob(shape, f"{self.name}_bias"))
            fill(self.blobs[self.bias_id], p.bias_filler, self.rng)
        self._bottom_copy = None

    def _scale_blob(self, bottom):
        return bottom[1] if len(bottom) == 2 else self.blobs[0]

    def reshape(self, bottom, top):
        scale = self._scale_blob(bottom)
        self.dims = _dims(self, bottom[0], scale.shape, self.param.axis, "scale")
        if self.bias_id is not None and self.blobs[self.bias_id].shape != scale.shape:
            raise self.error(f"bias {self.blobs[self.bias_id].shape} and scale {scale.shape} "
                             f"shapes differ", hint="the bias must have the scale's shape")
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.dims)
        if top[0] is bottom[0]:
            self._bottom_copy = keep_copy(self.xp, x, self._bottom_copy)  # ds needs x after y overwrote it
        y = top[0].data.reshape(self.dims)
        self.xp.multiply(x, self._scale_blob(bottom).data.reshape(-1, 1), out=y)
        if self.bias_id is not None:
            y += self.blobs[self.bias_id].data.reshape(-1, 1)

    def backward(self, top, propagate_down, bottom):
        xp = self.xp
        dy = top[0].diff.reshape(self.dims)
        if self.bias_id is not None and self.param_propagate_down[self.bias_id]:
            self.blobs[self.bias_id].diff += sum_outer_inner(xp, dy).reshape(
                self.blobs[self.bias_id].shape)
        learned = len(bottom) == 1
        scale = self._scale_blob(bottom)
        if (learned and self.param_propagate_down[0]) or (not learned and propagate_down[1]):
            x = self._bottom_copy if top[0] is bottom[0] else bottom[0].data.reshape(self.dims)
            ds = sum_outer_inner(xp, dy, x).reshape(scale.shape)
            if learned:
                scale.diff += ds
            else:
                scale.diff[...] = ds
        if propagate_down[0]:
            # In place dx is dy's memory; ds above has already read dy.
            xp.multiply(dy, scale.data.reshape(-1, 1), out=bottom[0].diff.reshape(self.dims))


@register_layer("Bias")
class BiasLayer(Layer):
    num_bottom = (1, 2)
    num_top = 1
    param_name = "bias_param"

    def setup(self, bottom, top):
        p = self.param
        self.blobs = []
        if len(bottom) == 1:
            shape = _learned_shape(self, bottom[0], p.axis, p.num_axes)
            self.blobs.append(self.make_blob(shape, f"{self.name}_bias"))
            fill(self.blobs[0], p.filler, self.rng)  # FillerParameter's default: constant 0

    def _bias_blob(self, bottom):
        return bottom[1] if len(bottom) == 2 else self.blobs[0]

    def reshape(self, bottom, top):
        self.dims = _dims(self, bottom[0], self._bias_blob(bottom).shape, self.param.axis, "bias")
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.dims)
        y = top[0].data.reshape(self.dims)
        self.xp.add(x, self._bias_blob(bottom).data.reshape(-1, 1), out=y)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(self.dims)
        learned = len(bottom) == 1
        bias = self._bias_blob(bottom)
        if (learned and self.param_propagate_down[0]) or (not learned and propagate_down[1]):
            db = sum_outer_inner(self.xp, dy).reshape(bias.shape)
            if learned:
                bias.diff += db
            else:
                bias.diff[...] = db
        if propagate_down[0] and top[0] is not bottom[0]:
            bottom[0].diff[...] = top[0].diff
