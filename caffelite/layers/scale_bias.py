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

import numpy as np

from ..fillers import fill
from ..kernels.channel import NULL, ChannelOps
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


def _affine(ops, x, s, b, dims, y, keep) -> None:
    """y = x * s[c] (+ b[c]) on the GPU for (outer, dim, inner) ``dims``; keep = x if given."""
    outer, dim, inner = dims
    n = outer * dim * inner
    ops.elementwise("channel_affine", n, (x, s, b, np.int64(n), np.int32(dim), np.int64(inner), y, keep))


def _write_grads(ops, dim: int, bias, bias_accumulates: bool, scale, scale_accumulates: bool) -> None:
    """Gradients from the partial sums of dy (into ``bias``'s diff) and of dy * x (into
    ``scale``'s): added to a learned blob's diff (written over pending zeros), written into a
    bottom's diff."""
    args = []
    for blob, accumulates in ((bias, bias_accumulates), (scale, scale_accumulates)):
        if blob is None:
            args += [NULL, np.int32(0)]
            continue
        if accumulates:
            diff, overwrite = blob.diff_for_update()
            args += [diff, np.int32(1 if overwrite else 2)]
        else:
            args += [blob.diff, np.int32(1)]
    ops.per_channel("channel_grads", dim, (ops.buffer("partial", (2, dim, ops.parts)), np.int32(dim),
                                           np.int32(ops.parts), *args))


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
    #: The BatchNorm layer before this one that computes this layer's forward, and dx in
    #: backward, on a GPU (fusion.py).
    fused_into = None

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
        self._gpu = None

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
        if self.device.is_gpu:
            return self._forward_gpu(bottom, top)
        x = bottom[0].data.reshape(self.dims)
        if top[0] is bottom[0]:
            self._bottom_copy = keep_copy(self.xp, x, self._bottom_copy)  # ds needs x after y overwrote it
        y = top[0].data.reshape(self.dims)
        self.xp.multiply(x, self._scale_blob(bottom).data.reshape(-1, 1), out=y)
        if self.bias_id is not None:
            y += self.blobs[self.bias_id].data.reshape(-1, 1)

    def scale_and_bias(self):
        """The learned scale's and the bias's device arrays (NULL: no bias), for a fused
        BatchNorm's forward (fusion.py)."""
        return self.blobs[0].data, self.blobs[self.bias_id].data if self.bias_id is not None else NULL

    def _forward_gpu(self, bottom, top) -> None:
        """One kernel: y = x * s (+ b), keeping x when in place."""
        if self.fused_into is not None:
            return  # the BatchNorm before has written y (fusion.py)
        self._gpu = self._gpu or ChannelOps(self.dtype)
        x = bottom[0].data
        keep = NULL
        if top[0] is bottom[0]:
            if self._bottom_copy is None or self._bottom_copy.shape != self.dims:
                self._bottom_copy = self.xp.empty(self.dims, self.dtype)
            keep = self._bottom_copy
        bias = self.blobs[self.bias_id].data if self.bias_id is not None else NULL
        _affine(self._gpu, x, self._scale_blob(bottom).data, bias, self.dims, top[0].data, keep)

    def _backward_gpu(self, top, propagate_down, bottom) -> None:
        """One reduction for the scale and bias gradients, one map for dx."""
        ops = self._gpu = self._gpu or ChannelOps(self.dtype)
        dy = top[0].diff
        learned = len(bottom) == 1
        scale = self._scale_blob(bottom)
        want_ds = (learned and self.param_propagate_down[0]) or (not learned and propagate_down[1])
        want_db = self.bias_id is not None and self.param_propagate_down[self.bias_id]
        fused = self.fused_into
        if want_ds or want_db or fused is not None:
            if fused is not None:  # x is the BatchNorm's normalised output, which it keeps
                x = fused.x_norm
            else:
                x = self._bottom_copy if top[0] is bottom[0] else bottom[0].data
            self.sums = ops.partial_sums(dy, x, self.dims, shift=False), ops.parts
            if want_ds or want_db:
                bias = self.blobs[self.bias_id] if want_db else None
                _write_grads(ops, self.dims[1], bias, True, scale if want_ds else None, learned)
        if fused is not None:
            return  # the BatchNorm's backward writes dx = s * (its formula), from these sums
        if propagate_down[0]:
            # In place dx is dy's memory: the sums above have already read dy.
            _affine(ops, dy, scale.data, NULL, self.dims, bottom[0].diff, NULL)

    def backward(self, top, propagate_down, bottom):
        if self.device.is_gpu:
            return self._backward_gpu(top, propagate_down, bottom)
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
        self._gpu = None

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
        learned = len(bottom) == 1
        bias = self._bias_blob(bottom)
        if (learned and self.param_propagate_down[0]) or (not learned and propagate_down[1]):
            if self.device.is_gpu:
                self._gpu = self._gpu or ChannelOps(self.dtype)
                self._gpu.partial_sums(top[0].diff, NULL, self.dims, shift=False)
                _write_grads(self._gpu, self.dims[1], bias, learned, None, learned)
            else:
                db = sum_outer_inner(self.xp, top[0].diff.reshape(self.dims)).reshape(bias.shape)
                if learned:
                    bias.diff += db
                else:
                    bias.diff[...] = db
        if propagate_down[0] and top[0] is not bottom[0]:
            bottom[0].diff[...] = top[0].diff
