"""Element-wise math neurons: AbsVal, Power, Exp, Log, Threshold.

Each takes one bottom and gives one top of the same shape and may run in
place (top is bottom). Where backward needs the bottom and forward would
overwrite it, forward keeps what backward needs (a copy, a mask or a sign).
Scalars come from the layer's ``*_param``; the dtype of the bottom is kept.
"""
from __future__ import annotations

import math

import numpy as np

from ..registry import register_layer
from .base import NeuronLayer
from .scale_bias import keep_copy


def _in_place(bottom, top) -> bool:
    return top[0] is bottom[0]


class _KeepsBottom(NeuronLayer):
    """A neuron whose backward reads x: in place, forward keeps a copy of it."""

    def setup(self, bottom, top):
        self._bottom_copy = None

    def _input(self, bottom, top, needed: bool = True):
        """x for forward; kept for backward when the top will overwrite it."""
        if needed and _in_place(bottom, top):
            self._bottom_copy = keep_copy(self.xp, bottom[0].data, self._bottom_copy)
            return self._bottom_copy
        return bottom[0].data

    def _saved_input(self, bottom, top):
        return self._bottom_copy if _in_place(bottom, top) else bottom[0].data

    def _base(self, x):
        """shift + scale * x as a new array (subclasses set ``scale`` and ``shift``)."""
        u = x * self.scale if self.scale != 1 else x.copy()
        if self.shift != 0:
            u += self.shift
        return u


def _check_base(layer, base: float) -> float:
    """log(base) for a ``base`` of -1 (e) or > 0, else a ConfigError."""
    if base == -1:
        return 1.0
    if base <= 0:
        raise layer.error(f"base must be strictly positive (or -1 for e), got {base}",
                          hint="e.g. base: 2, or leave it out for e")
    return math.log(base)


@register_layer("AbsVal")
class AbsValLayer(NeuronLayer):
    """y = |x|;  dx = dy * sign(x) (0 at x = 0).

    Caffe refuses to run AbsVal in place; here forward then keeps sign(x).
    """

    def setup(self, bottom, top):
        self._sign = None

    def forward(self, bottom, top):
        x = bottom[0].data
        if _in_place(bottom, top):
            self._sign = self.xp.sign(x)
        self.xp.abs(x, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            sign = self._sign if _in_place(bottom, top) else self.xp.sign(bottom[0].data)
            self.xp.multiply(top[0].diff, sign, out=bottom[0].diff)


@register_layer("Power")
class PowerLayer(_KeepsBottom):
    """y = (shift + scale * x) ^ power;  dx = dy * power * scale * (shift + scale * x) ^ (power - 1).

    With power * scale == 0 the top is the constant shift^power (1 for power 0)
    and the gradient is 0, as in Caffe.
    """

    param_name = "power_param"

    def setup(self, bottom, top):
        super().setup(bottom, top)
        p = self.param
        self.power, self.scale, self.shift = float(p.power), float(p.scale), float(p.shift)
        self.diff_scale = self.power * self.scale

    def forward(self, bottom, top):
        y = top[0].data
        if self.diff_scale == 0:
            # shift^power in Caffe's float arithmetic: NaN, not complex, for a negative shift.
            y[...] = 1.0 if self.power == 0 else np.power(np.float64(self.shift), self.power)
            return
        x = self._input(bottom, top, needed=self.power != 1)
        u = self._base(x)
        if self.power == 1:
            y[...] = u
        else:
            self.xp.power(u, self.power, out=y)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if self.diff_scale == 0 or self.power == 1:
            self.xp.multiply(dy, self.diff_scale, out=dx)
            return
        u = self._base(self._saved_input(bottom, top))
        if self.power != 2:
            # Caffe divides y by u here, which is 0/0 at u = 0; the power form is exact.
            self.xp.power(u, self.power - 1, out=u)
        u *= self.diff_scale
        self.xp.multiply(dy, u, out=dx)


@register_layer("Exp")
class ExpLayer(NeuronLayer):
    """y = base ^ (shift + scale * x) (base -1 = e), computed as base^shift * exp(ln(base) * scale * x);
    dx = dy * y * ln(base) * scale."""

    param_name = "exp_param"

    def setup(self, bottom, top):
        p = self.param
        log_base = _check_base(self, float(p.base))
        self.inner_scale = log_base * float(p.scale)
        base, shift = float(p.base), float(p.shift)
        self.outer_scale = 1.0 if shift == 0 else (math.exp(shift) if base == -1 else base ** shift)

    def forward(self, bottom, top):
        y = top[0].data
        if self.inner_scale == 1:
            self.xp.exp(bottom[0].data, out=y)
        else:
            self.xp.multiply(bottom[0].data, self.inner_scale, out=y)
            self.xp.exp(y, out=y)
        if self.outer_scale != 1:
            y *= self.outer_scale

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dx = bottom[0].diff
            self.xp.multiply(top[0].diff, top[0].data, out=dx)
            if self.inner_scale != 1:
                dx *= self.inner_scale


@register_layer("Log")
class LogLayer(_KeepsBottom):
    """y = log_base(shift + scale * x) (base -1 = e);  dx = dy * scale / (ln(base) * (shift + scale * x))."""

    param_name = "log_param"

    def setup(self, bottom, top):
        super().setup(bottom, top)
        p = self.param
        log_base = _check_base(self, float(p.base))
        if log_base == 0:
            raise self.error("base 1 has no logarithm", hint="use a base other than 1, or -1 for e")
        self.base_scale = 1.0 / log_base
        self.scale, self.shift = float(p.scale), float(p.shift)

    def forward(self, bottom, top):
        y = top[0].data
        x = self._input(bottom, top)
        if self.scale == 1 and self.shift == 0:
            self.xp.log(x, out=y)
        else:
            self.xp.log(self._base(x), out=y)
        if self.base_scale != 1:
            y *= self.base_scale

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            u = self._base(self._saved_input(bottom, top))
            self.xp.divide(top[0].diff, u, out=bottom[0].diff)
            numerator = self.base_scale * self.scale
            if numerator != 1:
                dx = bottom[0].diff
                dx *= numerator


@register_layer("Threshold")
class ThresholdLayer(NeuronLayer):
    """y = 1 if x > threshold else 0. No gradient: Caffe has none; backward writes zeros if asked."""

    param_name = "threshold_param"

    def setup(self, bottom, top):
        self.threshold = float(self.param.threshold)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data > self.threshold

    def backward(self, top, propagate_down, bottom):
        # Caffe has no backward here; the gradient is 0 almost everywhere.
        if propagate_down[0]:
            bottom[0].diff[...] = 0

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False
