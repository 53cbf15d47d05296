"""More activation neurons: BNLL, ELU, Clip, Swish.

Each takes one bottom and gives one top of the same shape and may run in
place (top is bottom); forward then keeps the mask or values backward needs.
"""
from __future__ import annotations

from ..registry import register_layer
from .base import NeuronLayer


def _in_place(bottom, top) -> bool:
    return top[0] is bottom[0]


@register_layer("BNLL")
class BNLLLayer(NeuronLayer):
    """y = log(1 + exp(x)) as max(x, 0) + log1p(exp(-|x|)) (no overflow);
    dx = dy * sigmoid(x) = dy * (1 - exp(-y)), which reads only the top, so in place costs nothing."""

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].data
        soft = xp.abs(x)
        xp.negative(soft, out=soft)
        xp.exp(soft, out=soft)
        xp.log1p(soft, out=soft)
        xp.maximum(x, 0, out=top[0].data)
        top[0].data[...] += soft

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            xp = self.xp
            sigmoid = xp.negative(top[0].data)
            xp.expm1(sigmoid, out=sigmoid)
            xp.negative(sigmoid, out=sigmoid)
            xp.multiply(top[0].diff, sigmoid, out=bottom[0].diff)


@register_layer("ELU")
class ELULayer(NeuronLayer):
    """y = x if x > 0 else alpha * (exp(x) - 1);  dx = dy * (x > 0 ? 1 : y + alpha)."""

    param_name = "elu_param"

    def setup(self, bottom, top):
        self.alpha = float(self.param.alpha)
        self._positive = None

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].data
        positive = x > 0
        if _in_place(bottom, top):
            self._positive = positive
        negative_part = xp.minimum(x, 0)
        xp.expm1(negative_part, out=negative_part)
        negative_part *= self.alpha
        y = top[0].data
        xp.maximum(x, 0, out=y)
        y += negative_part

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            xp = self.xp
            positive = self._positive if _in_place(bottom, top) else bottom[0].data > 0
            # positive ? 1 : y + alpha, blended arithmetically: where() is slow on random masks.
            slope = top[0].data + self.alpha
            slope *= ~positive
            slope += positive
            xp.multiply(top[0].diff, slope, out=bottom[0].diff)


@register_layer("Clip")
class ClipLayer(NeuronLayer):
    """y = max(min, min(x, max));  dx = dy where min <= x <= max (bounds included, as Caffe), else 0."""

    param_name = "clip_param"

    def setup(self, bottom, top):
        p = self.param
        if not (p.HasField("min") and p.HasField("max")):
            raise self.error("clip_param needs both min and max", hint="e.g. clip_param: {min: -1, max: 1}")
        self.lo, self.hi = float(p.min), float(p.max)
        if self.lo > self.hi:
            raise self.error(f"min {self.lo} is greater than max {self.hi}", hint="swap min and max")
        self._inside = None

    def _mask(self, x):
        inside = x >= self.lo
        inside &= x <= self.hi
        return inside

    def forward(self, bottom, top):
        x = bottom[0].data
        if _in_place(bottom, top):
            self._inside = self._mask(x)
        self.xp.clip(x, self.lo, self.hi, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            inside = self._inside if _in_place(bottom, top) else self._mask(bottom[0].data)
            self.xp.multiply(top[0].diff, inside, out=bottom[0].diff)


@register_layer("Swish")
class SwishLayer(NeuronLayer):
    """y = x * s, s = sigmoid(beta * x) (as 0.5 tanh(0.5 beta x) + 0.5, like Sigmoid);
    dx = dy * (beta * y + s * (1 - beta * y)). Backward reads y and the kept s only."""

    param_name = "swish_param"

    def setup(self, bottom, top):
        self.beta = float(self.param.beta)
        self._sigmoid = None

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].data
        s = self._sigmoid
        if s is None or s.shape != x.shape:
            s = self._sigmoid = xp.empty_like(x)
        xp.multiply(x, 0.5 * self.beta, out=s)
        xp.tanh(s, out=s)
        s *= 0.5
        s += 0.5
        xp.multiply(x, s, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            s = self._sigmoid
            beta_y = top[0].data * self.beta
            slope = 1 - beta_y
            slope *= s
            slope += beta_y
            self.xp.multiply(top[0].diff, slope, out=bottom[0].diff)
