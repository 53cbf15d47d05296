"""Loss layers beyond SoftmaxWithLoss and EuclideanLoss, with Caffe's formulas.

- MultinomialLogisticLoss: probabilities p (N, ...) viewed as (N, D), one label
  per item: loss = -sum_n log(max(p[n, l_n], 1e-20)) / N.
- InfogainLoss: scores x (outer, C, inner) along ``infogain_loss_param.axis``,
  softmax p inside, an infogain matrix H (C, C) from a third bottom or the
  binaryproto ``infogain_loss_param.source``:
  loss = -sum_{n, k} H[l_n, k] log(max(p_nk, 1e-20)) / normaliser;
  dx_nk = (p_nk sum_j H[l_n, j] - H[l_n, k]) * weight / normaliser.
- HingeLoss: scores x (N, D), t_nk = +1 for the label and -1 otherwise:
  L1 loss = sum max(0, 1 - t x) / N; L2 loss = sum max(0, 1 - t x)^2 / N.
- SigmoidCrossEntropyLoss: scores x and targets t in [0, 1] of equal count:
  loss = sum [max(x, 0) - x t + log(1 + exp(-|x|))] / normaliser (BATCH_SIZE
  by default); dx = (sigmoid(x) - t) * weight / normaliser.
- ContrastiveLoss: features a, b (N, D), similarity y (N) (1 = similar):
  d = ||a - b||; loss = sum [y d^2 + (1 - y) max(margin - d, 0)^2] / 2N
  (legacy_version: max(margin - d^2, 0) instead of the squared hinge).

Label-carrying losses with ``loss_param.ignore_label`` (InfogainLoss,
SigmoidCrossEntropyLoss) skip those positions and count only the rest for the
VALID normaliser, as Caffe does; the others have no ignore_label in Caffe.
"""
from __future__ import annotations

from ..io.binaryproto import read_binaryproto
from ..proto import pb
from ..registry import register_layer
from .base import LossLayer
from .loss_norm import (BATCH_SIZE, check_label_count, clipped_log, get_normalization, label_indices,
                        valid_normalizer)
from .lstm_unit import sigmoid_
from .softmax import softmax

L2 = pb.HingeLossParameter.L2
LOG_THRESHOLD = 1e-20  # Caffe's kLOG_THRESHOLD: probabilities are clipped here before the log


def _per_item(layer, bottom) -> tuple[int, int]:
    """(N, D): items along axis 0 and values per item; one label per item."""
    N = bottom[0].shape[0] if bottom[0].num_axes else 1
    D = bottom[0].count // max(N, 1)
    if bottom[1].count != N:
        raise layer.error(f"needs one label per item: {N} items, the label has "
                          f"{bottom[1].count} values {bottom[1].shape}",
                          hint="the label is (N,) or (N, 1, 1, 1)")
    return N, D


def _no_label_gradient(layer, propagate_down, index: int = 1) -> None:
    if len(propagate_down) > index and propagate_down[index]:
        raise layer.error(f"cannot backpropagate to bottom {index} (labels/targets)",
                          hint=f"set propagate_down false for bottom {index}")


@register_layer("MultinomialLogisticLoss")
class MultinomialLogisticLossLayer(LossLayer):
    """Log loss of given probabilities; the gradient reaches only the picked p."""

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self.N, self.D = _per_item(self, bottom)
        self._rows = self.xp.arange(self.N)

    def forward(self, bottom, top):
        xp = self.xp
        index, _ = label_indices(self, bottom[1], self.N, 1, self.D)
        self._index = index[:, 0]
        p = bottom[0].data.reshape(self.N, self.D)
        self._picked = xp.maximum(p[self._rows, self._index], LOG_THRESHOLD)
        top[0].data[...] = -clipped_log(xp, self._picked, LOG_THRESHOLD).sum() / self.N

    def backward(self, top, propagate_down, bottom):
        _no_label_gradient(self, propagate_down)
        if propagate_down[0]:
            diff = bottom[0].diff.reshape(self.N, self.D)
            diff[...] = 0
            diff[self._rows, self._index] = -(top[0].diff / self.N) / self._picked


@register_layer("InfogainLoss")
class InfogainLossLayer(LossLayer):
    """Softmax of the scores, then the infogain-weighted log loss.

    Bottoms: scores, labels, optionally H (C x C). Tops: the loss, optionally
    the probabilities.
    """

    num_bottom = (2, 3)
    num_top = (1, 2)
    param_name = "infogain_loss_param"

    def setup(self, bottom, top):
        loss_param = self.layer_param.loss_param
        self.ignore_label = loss_param.ignore_label if loss_param.HasField("ignore_label") else None
        self.normalization = get_normalization(loss_param)
        self._H_file = None
        if len(bottom) < 3:
            if not self.param.source:
                raise self.error("the infogain matrix H must be given",
                                 hint="set infogain_loss_param.source to a binaryproto file "
                                      "or give H as a third bottom")
            self._H_file = read_binaryproto(self.param.source)
        self.prob = self.make_blob(bottom[0].shape, name=f"{self.name}_prob")
        self._H_key = None

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        scores = bottom[0]
        self.axis = scores.canonical_axis(self.param.axis)
        self.outer, self.inner = check_label_count(self, scores.shape, self.axis, bottom[1].count)
        C = self.C = scores.shape[self.axis]
        H_count = bottom[2].count if len(bottom) > 2 else self._H_file.size
        if H_count != C * C:
            raise self.error(f"the infogain matrix has {H_count} values, {C} classes need "
                             f"{C}x{C} = {C * C}",
                             hint="H is a C x C matrix, C = the scores' size along the axis")
        if self._H_file is not None and self._H_key != C:
            self._H = self.xp.asarray(self._H_file.reshape(C, C), dtype=self.dtype)
            self._H_key = C
        self.prob.reshape_like(scores)
        if len(top) > 1:
            top[1].reshape_like(scores)
            top[1].share_data(self.prob)

    def forward(self, bottom, top):
        xp = self.xp
        softmax(xp, bottom[0].data, self.axis, out=self.prob.data)
        H = bottom[2].data.reshape(self.C, self.C) if len(bottom) > 2 else self._H
        index, valid = label_indices(self, bottom[1], self.outer, self.inner, self.C,
                                     self.ignore_label)
        prob = self.prob.data.reshape(self.outer, self.C, self.inner)
        # Row H[l] of every position, laid out like the scores: (outer, C, inner).
        rows = H[index].transpose(0, 2, 1)
        if valid is not None:
            rows = rows * valid[:, None, :].astype(rows.dtype)
        self._rows, self._valid = rows, valid
        self._norm = valid_normalizer(xp, self.normalization, self.outer, self.inner, valid)
        log_p = clipped_log(xp, prob, LOG_THRESHOLD)
        top[0].data[...] = -(rows * log_p).sum() / self._norm

    def backward(self, top, propagate_down, bottom):
        _no_label_gradient(self, propagate_down, 1)
        _no_label_gradient(self, propagate_down, 2)
        if not propagate_down[0]:
            return
        prob = self.prob.data.reshape(self.outer, self.C, self.inner)
        diff = bottom[0].diff.reshape(self.outer, self.C, self.inner)
        # Ignored positions have all-zero rows, so both terms vanish there.
        row_sums = self._rows.sum(axis=1, keepdims=True)
        self.xp.multiply(prob, row_sums, out=diff)
        diff -= self._rows
        diff *= top[0].diff / self._norm

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0


@register_layer("HingeLoss")
class HingeLossLayer(LossLayer):
    """One-vs-all hinge loss, ``hinge_loss_param.norm`` L1 (default) or L2."""

    param_name = "hinge_loss_param"

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self.N, self.D = _per_item(self, bottom)
        self._rows = self.xp.arange(self.N)
        margin = getattr(self, "_margin", None)
        if margin is None or margin.shape != (self.N, self.D):
            self._margin = self.xp.empty((self.N, self.D), dtype=bottom[0].dtype)

    def forward(self, bottom, top):
        xp = self.xp
        index, _ = label_indices(self, bottom[1], self.N, 1, self.D)
        self._index = index[:, 0]
        x = bottom[0].data.reshape(self.N, self.D)
        m = self._margin
        # m = max(0, 1 - t x): 1 + x off the label, 1 - x at it.
        m[...] = x
        m[self._rows, self._index] *= -1
        m += 1
        xp.maximum(m, 0, out=m)
        flat = m.reshape(-1)
        if self.param.norm == L2:
            top[0].data[...] = flat.dot(flat) / self.N
        else:
            top[0].data[...] = flat.sum() / self.N

    def backward(self, top, propagate_down, bottom):
        _no_label_gradient(self, propagate_down)
        if not propagate_down[0]:
            return
        xp = self.xp
        diff = bottom[0].diff.reshape(self.N, self.D)
        if self.param.norm == L2:
            xp.multiply(self._margin, 2 * top[0].diff / self.N, out=diff)
        else:
            xp.sign(self._margin, out=diff)
            diff *= top[0].diff / self.N
        # d(1 - t x)/dx = -t: +1 off the label, -1 at it.
        diff[self._rows, self._index] *= -1


@register_layer("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLossLayer(LossLayer):
    """Cross-entropy of sigmoid(x) against targets in [0, 1], computed stably."""

    def setup(self, bottom, top):
        loss_param = self.layer_param.loss_param
        self.ignore_label = loss_param.ignore_label if loss_param.HasField("ignore_label") else None
        self.normalization = get_normalization(loss_param, default=BATCH_SIZE)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count != bottom[1].count:
            raise self.error(f"scores and targets must have the same count: "
                             f"{bottom[0].shape} vs {bottom[1].shape}",
                             hint="one target in [0, 1] per score")
        self.outer = bottom[0].shape[0] if bottom[0].num_axes else 1
        self.inner = bottom[0].count_range(1)
        sig = getattr(self, "_sigmoid", None)
        if sig is None or sig.shape != bottom[0].shape:
            self._sigmoid = self.xp.empty(bottom[0].shape, dtype=bottom[0].dtype)

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].data
        t = bottom[1].data.reshape(x.shape)
        # max(x, 0) - x t + log(1 + exp(-|x|)): exp never overflows.
        loss = xp.maximum(x, 0) - x * t + xp.log1p(xp.exp(-xp.abs(x)))
        self._valid = None
        if self.ignore_label is not None:
            # Caffe compares static_cast<int>(target): truncation toward zero.
            self._valid = t.astype(xp.int64) != self.ignore_label
            loss = loss * self._valid
        self._norm = valid_normalizer(xp, self.normalization, self.outer, self.inner, self._valid)
        top[0].data[...] = loss.sum() / self._norm
        self._sigmoid[...] = x
        sigmoid_(xp, self._sigmoid)

    def backward(self, top, propagate_down, bottom):
        _no_label_gradient(self, propagate_down)
        if not propagate_down[0]:
            return
        diff = bottom[0].diff
        self.xp.subtract(self._sigmoid, bottom[1].data.reshape(diff.shape), out=diff)
        if self._valid is not None:
            diff *= self._valid
        diff *= top[0].diff / self._norm


@register_layer("ContrastiveLoss")
class ContrastiveLossLayer(LossLayer):
    """Siamese-pair loss over feature pairs (a, b) and similarity flags y."""

    num_bottom = 3
    param_name = "contrastive_loss_param"

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        a, b, y = bottom
        if a.shape != b.shape:
            raise self.error(f"the two feature bottoms must have the same shape: "
                             f"{a.shape} vs {b.shape}", hint="a and b are (N, D) features")
        self.N = a.shape[0] if a.num_axes else 1
        self.D = a.count // max(self.N, 1)
        if y.count != self.N:
            raise self.error(f"needs one similarity flag per pair: {self.N} pairs, bottom 2 "
                             f"has {y.count} values", hint="y is (N,) or (N, 1, 1, 1), 1 = similar")

    def forward(self, bottom, top):
        xp = self.xp
        N, D = self.N, self.D
        margin = self.param.margin
        self._delta = bottom[0].data.reshape(N, D) - bottom[1].data.reshape(N, D)
        dist_sq = (self._delta * self._delta).sum(axis=1)
        # Caffe tests static_cast<int>(y): any y that truncates to 0 is dissimilar.
        self._similar = bottom[2].data.reshape(N).astype(xp.int64) != 0
        if self.param.legacy_version:
            self._mdist = margin - dist_sq
            dissimilar = xp.maximum(self._mdist, 0)
        else:
            self._dist = xp.sqrt(dist_sq)
            self._mdist = margin - self._dist
            dissimilar = xp.maximum(self._mdist, 0) ** 2
        top[0].data[...] = xp.where(self._similar, dist_sq, dissimilar).sum() / N / 2

    def backward(self, top, propagate_down, bottom):
        if propagate_down[2]:
            raise self.error("cannot backpropagate to the similarity labels (bottom 2)",
                             hint="set propagate_down false for bottom 2")
        if not (propagate_down[0] or propagate_down[1]):
            return
        xp = self.xp
        if self.param.legacy_version:
            push = -xp.ones_like(self._mdist)
        else:
            # Caffe's 1e-4 keeps the division finite when a == b.
            push = -self._mdist / (self._dist + self._dist.dtype.type(1e-4))
        coef = xp.where(self._similar, 1, xp.where(self._mdist > 0, push, 0))
        grad = self._delta * (coef * (top[0].diff / self.N))[:, None]
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                diff = bottom[i].diff.reshape(self.N, self.D)
                if sign > 0:
                    diff[...] = grad
                else:
                    xp.negative(grad, out=diff)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2
