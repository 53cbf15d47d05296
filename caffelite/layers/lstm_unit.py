"""LSTMUnit: one time step of an LSTM cell, with no parameters.

Bottoms: c_prev (1, N, D), the gate inputs x (1, N, 4D) in Caffe's gate order
i, f, o, g, and the sequence-continuation flags cont (1, N). Tops: c and h,
both (1, N, D)::

    i = sigmoid(x_i)   f = cont * sigmoid(x_f)   o = sigmoid(x_o)   g = tanh(x_g)
    c = f * c_prev + i * g
    h = o * tanh(c)

cont = 0 starts a new sequence: f = 0 drops c_prev. Backward (Caffe's
formulas; f(1-f) is the forget gate's derivative for binary cont)::

    dc'     = dc + dh * o * (1 - tanh(c)^2)
    dc_prev = dc' * f
    dx_i = dc' * g * i(1-i)     dx_f = dc' * c_prev * f(1-f)
    dx_o = dh * tanh(c) * o(1-o)   dx_g = dc' * i * (1-g^2)

No gradient reaches cont. The LSTM layer (recurrent.py) runs these same
helpers at every time step.
"""
from __future__ import annotations

from ..registry import register_layer
from .base import Layer, check_not_in_place


def sigmoid_(xp, a) -> None:
    """a := 1 / (1 + exp(-a)) in place, as 0.5 tanh(0.5 a) + 0.5 (cannot overflow)."""
    a *= 0.5
    xp.tanh(a, out=a)
    a *= 0.5
    a += 0.5


def lstm_unit_forward(xp, gates, cont, c_prev, c, h, tanh_c) -> None:
    """One step for N streams of width D.

    ``gates`` (N, 4D) holds the pre-activations and is overwritten with the
    activations i, f, o, g (f already multiplied by ``cont``, shape (N,)):
    backward reads them from there. Writes ``c``, ``h`` and ``tanh_c`` (N, D).
    """
    D = c_prev.shape[-1]
    sigmoid_(xp, gates[:, :3 * D])
    g = gates[:, 3 * D:]
    xp.tanh(g, out=g)
    i, f, o = gates[:, :D], gates[:, D:2 * D], gates[:, 2 * D:3 * D]
    f *= cont[:, None]
    xp.multiply(f, c_prev, out=c)
    c += i * g
    xp.tanh(c, out=tanh_c)
    xp.multiply(o, tanh_c, out=h)


def lstm_unit_backward(xp, acts, c_prev, tanh_c, dc, dh, dgates):
    """Gradients of one step: writes the pre-activation gradients into
    ``dgates`` (N, 4D) and returns dc_prev (N, D).

    ``acts`` are the activations ``lstm_unit_forward`` left in ``gates``;
    ``dc`` (the gradient reaching c from later steps) may be None for zero.
    """
    D = c_prev.shape[-1]
    i, f, o, g = acts[:, :D], acts[:, D:2 * D], acts[:, 2 * D:3 * D], acts[:, 3 * D:]
    dc_term = dh * o * (1 - tanh_c * tanh_c)
    if dc is not None:
        dc_term += dc
    xp.multiply(dc_term * g, i * (1 - i), out=dgates[:, :D])
    xp.multiply(dc_term * c_prev, f * (1 - f), out=dgates[:, D:2 * D])
    xp.multiply(dh * tanh_c, o * (1 - o), out=dgates[:, 2 * D:3 * D])
    xp.multiply(dc_term * i, 1 - g * g, out=dgates[:, 3 * D:])
    dc_term *= f
    return dc_term


@register_layer("LSTMUnit")
class LSTMUnitLayer(Layer):
    num_bottom = 3
    num_top = 2

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)

    def reshape(self, bottom, top):
        c_prev, x, cont = bottom
        if c_prev.num_axes != 3 or c_prev.shape[0] != 1:
            raise self.error(f"bottom 0 (c_prev) must be (1, N, D), got {c_prev.shape}",
                             hint="LSTMUnit takes one time step: c_prev (1, N, D), "
                                  "x (1, N, 4D), cont (1, N)")
        _, N, D = c_prev.shape
        if x.shape != (1, N, 4 * D):
            raise self.error(f"bottom 1 (gate inputs) must be (1, {N}, {4 * D}) for c_prev "
                             f"{c_prev.shape}, got {x.shape}",
                             hint="the gate inputs hold i, f, o, g: 4 x the cell width")
        if cont.shape != (1, N):
            raise self.error(f"bottom 2 (cont) must be (1, {N}), got {cont.shape}",
                             hint="one sequence-continuation flag per stream")
        self.N, self.D = N, D
        top[0].reshape_like(c_prev)
        top[1].reshape_like(c_prev)
        acts = getattr(self, "_acts", None)
        if acts is None or acts.shape != (N, 4 * D):
            xp = self.xp
            self._acts = xp.empty((N, 4 * D), dtype=c_prev.dtype)
            self._tanh_c = xp.empty((N, D), dtype=c_prev.dtype)

    def forward(self, bottom, top):
        N, D = self.N, self.D
        self._acts[...] = bottom[1].data.reshape(N, 4 * D)
        lstm_unit_forward(self.xp, self._acts, bottom[2].data.reshape(N),
                          bottom[0].data.reshape(N, D), top[0].data.reshape(N, D),
                          top[1].data.reshape(N, D), self._tanh_c)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[2]:
            raise self.error("cannot backpropagate to the sequence indicators (cont)",
                             hint="set propagate_down: [true, true, false]")
        if not (propagate_down[0] or propagate_down[1]):
            return
        N, D = self.N, self.D
        xp = self.xp
        dgates = (bottom[1].diff.reshape(N, 4 * D) if propagate_down[1]
                  else xp.empty((N, 4 * D), dtype=self._acts.dtype))
        dc_prev = lstm_unit_backward(xp, self._acts, bottom[0].data.reshape(N, D), self._tanh_c,
                                     top[0].diff.reshape(N, D), top[1].diff.reshape(N, D), dgates)
        if propagate_down[0]:
            bottom[0].diff[...] = dc_prev.reshape(bottom[0].shape)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2
