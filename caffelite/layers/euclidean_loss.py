"""EuclideanLoss: half the mean over the batch of the squared L2 distance.

Bottoms: predictions a and targets b of the same count, N = a.shape[0]:

    loss = sum((a - b)^2) / N / 2
    da = loss_weight * (a - b) / N,   db = -da
"""
from __future__ import annotations

from ..registry import register_layer
from .base import LossLayer


@register_layer("EuclideanLoss")
class EuclideanLossLayer(LossLayer):

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count != bottom[1].count:
            raise self.error(f"bottoms must have the same number of values: "
                             f"{bottom[0].shape} vs {bottom[1].shape}",
                             hint="the predictions and the targets must have equal sizes")
        self._num = bottom[0].shape[0] if bottom[0].num_axes else 1
        # a - b is kept for backward; the buffer lives as long as the shape does.
        delta = getattr(self, "_delta", None)
        if delta is None or delta.shape != bottom[0].shape:
            self._delta = self.xp.empty(bottom[0].shape, dtype=bottom[0].dtype)

    def forward(self, bottom, top):
        self.xp.subtract(bottom[0].data, bottom[1].data.reshape(bottom[0].shape), out=self._delta)
        flat = self._delta.reshape(-1)
        top[0].data[...] = flat.dot(flat) / self._num / 2

    def backward(self, top, propagate_down, bottom):
        # top[0].diff holds the loss weight (a 0-d array).
        alpha = top[0].diff / self._num
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                diff = bottom[i].diff.reshape(bottom[0].shape)
                self.xp.multiply(self._delta, sign * alpha, out=diff)

    def allow_force_backward(self, bottom_index: int) -> bool:
        # Both inputs may be learned (Caffe overrides LossLayer's label rule here).
        return True
