"""Accuracy: the fraction of positions whose label is among the top-k scores.

Bottoms: scores (outer, C, inner) with C along ``accuracy_param.axis``, and
labels (outer * inner values). A position is correct when fewer than
``top_k`` classes score strictly higher than the labelled class (Caffe's
rule, so ties count in the label's favour):

    accuracy = #{correct, not ignored} / #{not ignored}     (0 if none)

Optional top 1: per-class accuracy, shape (C,); a class with no labelled
positions gets 0.
"""
from __future__ import annotations

from ..registry import register_layer
from .base import Layer
from .loss_norm import check_label_count, label_indices


@register_layer("Accuracy")
class AccuracyLayer(Layer):
    num_bottom = 2
    num_top = (1, 2)
    param_name = "accuracy_param"

    def setup(self, bottom, top):
        self.top_k = int(self.param.top_k)
        self.ignore_label = self.param.ignore_label if self.param.HasField("ignore_label") else None

    def reshape(self, bottom, top):
        scores = bottom[0]
        self.axis = scores.canonical_axis(self.param.axis)
        self.outer, self.inner = check_label_count(self, scores.shape, self.axis, bottom[1].count)
        self.channels = scores.shape[self.axis]
        if not 1 <= self.top_k <= self.channels:
            raise self.error(f"top_k {self.top_k} must be between 1 and the number of classes "
                             f"({self.channels})", hint="lower accuracy_param.top_k")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((self.channels,))

    def forward(self, bottom, top):
        xp = self.xp
        index, valid = label_indices(self, bottom[1], self.outer, self.inner, self.channels,
                                     self.ignore_label)
        scores = bottom[0].data.reshape(self.outer, self.channels, self.inner)
        true_score = xp.take_along_axis(scores, index[:, None, :], axis=1)
        higher = (scores > true_score).sum(axis=1)
        correct = higher < self.top_k
        if valid is None:
            count = self.outer * self.inner
        else:
            correct &= valid
            count = xp.maximum(valid.sum(), 1)  # no positions: 0 / 1 = 0, as Caffe
        top[0].data[...] = correct.sum() / count
        if len(top) > 1:
            labels = index.reshape(-1)
            weights = None if valid is None else valid.reshape(-1).astype(top[1].dtype)
            per_class = xp.bincount(labels, weights=weights, minlength=self.channels)
            hits = xp.bincount(labels, weights=correct.reshape(-1).astype(top[1].dtype),
                               minlength=self.channels)
            top[1].data[...] = hits / xp.maximum(per_class, 1)

    def backward(self, top, propagate_down, bottom):
        # Accuracy has no gradient; if asked anyway (propagate_down), the bottoms get zeros.
        for blob, down in zip(bottom, propagate_down):
            if down:
                blob.diff[...] = 0

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False
