"""Softmax and SoftmaxWithLoss.

Softmax along ``softmax_param.axis`` (default 1, the channels of N, C, H, W):

    y_c = exp(x_c - max_k x_k) / sum_k exp(x_k - max_k x_k)

SoftmaxWithLoss takes scores (outer, C, inner) and one integer label per
(outer, inner) position, e.g. (N,) or (N, 1, H, W), and computes

    loss = -sum log(max(p[label], FLT_MIN)) / normaliser

over the non-ignored positions, the normaliser chosen by
``loss_param.normalization`` (see loss_norm.py). Its gradient with respect to
the scores is (p - onehot(label)) * loss_weight / normaliser.
"""
from __future__ import annotations

from ..registry import register_layer
from .base import Layer, LossLayer
from .loss_norm import check_label_count, clipped_log, get_normalization, label_indices, valid_normalizer

FLT_MIN = 1.17549435e-38  # Caffe clips probabilities here before the log, whatever Dtype


def softmax(xp, x, axis: int, out) -> None:
    """Write softmax(``x``) along ``axis`` into ``out`` (may be ``x`` itself).

    Subtracting the maximum keeps exp from overflowing; the result is exact.
    """
    peak = x.max(axis=axis, keepdims=True)
    xp.subtract(x, peak, out=out)
    xp.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)


def softmax_backward(xp, prob, top_diff, axis: int, out) -> None:
    """dx = (dy - sum_c(dy * y)) * y along ``axis``; ``out`` may alias ``top_diff``."""
    dot = (top_diff * prob).sum(axis=axis, keepdims=True)
    xp.subtract(top_diff, dot, out=out)
    out *= prob


@register_layer("Softmax")
class SoftmaxLayer(Layer):
    """Softmax over one axis; top has the bottom's shape. May run in place."""

    num_bottom = 1
    num_top = 1
    param_name = "softmax_param"

    def reshape(self, bottom, top):
        self.axis = bottom[0].canonical_axis(self.param.axis)
        top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        softmax(self.xp, bottom[0].data, self.axis, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            # In place, top diff and bottom diff are one array: the helper reads it first.
            softmax_backward(self.xp, top[0].data, top[0].diff, self.axis, out=bottom[0].diff)


@register_layer("SoftmaxWithLoss")
class SoftmaxWithLossLayer(LossLayer):
    """Multinomial logistic loss of the softmax of the scores.

    Bottoms: scores (outer, C, inner) with C along ``softmax_param.axis``, and
    labels (outer * inner values). Tops: the loss (a scalar) and optionally
    the probabilities (the scores' shape).
    """

    num_top = (1, 2)
    param_name = "softmax_param"

    def setup(self, bottom, top):
        loss_param = self.layer_param.loss_param
        self.ignore_label = loss_param.ignore_label if loss_param.HasField("ignore_label") else None
        self.normalization = get_normalization(loss_param)
        self.prob = self.make_blob(bottom[0].shape, name=f"{self.name}_prob")

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        scores = bottom[0]
        self.axis = scores.canonical_axis(self.param.axis)
        self.outer, self.inner = check_label_count(self, scores.shape, self.axis, bottom[1].count)
        self.channels = scores.shape[self.axis]
        self.prob.reshape_like(scores)
        if len(top) > 1:
            # The prob top is the internal buffer itself, as Caffe's ShareData.
            top[1].reshape_like(scores)
            top[1].share_data(self.prob)
        xp = self.xp
        # Flat offset of class 0 at each (outer, inner) position; + label * inner picks the class.
        if getattr(self, "_base_shape", None) != (self.outer, self.channels, self.inner):
            self._base_shape = (self.outer, self.channels, self.inner)
            self._base = (xp.arange(self.outer, dtype=xp.int64)[:, None] * (self.channels * self.inner)
                          + xp.arange(self.inner, dtype=xp.int64)[None, :])

    def forward(self, bottom, top):
        xp = self.xp
        prob = self.prob.data
        softmax(xp, bottom[0].data, self.axis, out=prob)
        index, valid = label_indices(self, bottom[1], self.outer, self.inner, self.channels,
                                     self.ignore_label)
        prob3 = prob.reshape(self.outer, self.channels, self.inner)
        picked = xp.take_along_axis(prob3, index[:, None, :], axis=1)[:, 0, :]
        log_p = clipped_log(xp, picked, FLT_MIN)
        if valid is not None:
            log_p = xp.where(valid, log_p, 0)
        self._index, self._valid = index, valid
        self._norm = valid_normalizer(xp, self.normalization, self.outer, self.inner, valid)
        top[0].data[...] = -log_p.sum() / self._norm

    def backward(self, top, propagate_down, bottom):
        if len(propagate_down) > 1 and propagate_down[1]:
            raise self.error("cannot backpropagate to the label input",
                             hint="set propagate_down: [true, false]")
        if not propagate_down[0]:
            return
        diff = bottom[0].diff
        diff[...] = self.prob.data
        flat = diff.reshape(-1)
        flat[self._base + self._index * self.inner] -= 1
        # top[0].diff holds the loss weight (a 0-d array: no device sync).
        scale = top[0].diff / self._norm
        if self._valid is None:
            diff *= scale
        else:
            weight = self._valid.astype(diff.dtype) * scale
            diff.reshape(self.outer, self.channels, self.inner)[...] *= weight[:, None, :]
