"""Adaptive-rate solvers: AdaGrad, RMSProp, AdaDelta and Adam.

g is the regularized gradient in ``diff``, lr = rate * lr_mult, delta the
``delta`` setting (1e-8). The step is written into ``diff`` (W -= diff)::

    AdaGrad:   H += g^2;                           step = lr * g / (sqrt(H) + delta)
    RMSProp:   H = r * H + (1 - r) * g^2;          step = lr * g / (sqrt(H) + delta)   (r = rms_decay)
    AdaDelta:  Eg2 = r * Eg2 + (1 - r) * g^2;      D = g * sqrt((Ed2 + delta) / (Eg2 + delta))
               Ed2 = r * Ed2 + (1 - r) * D^2;      step = lr * D                      (r = momentum)
    Adam:      m = b1 * m + (1 - b1) * g;          v = b2 * v + (1 - b2) * g^2        (b1 = momentum,
               step = lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + delta)      b2 = momentum2, t = iter + 1)

AdaDelta and Adam keep two history blobs per parameter; in the solver state
all first-set blobs come before all second-set blobs, as in Caffe. The
operation order follows Caffe's, so float32 results round the same way. On a GPU, Adam's
update is one fused CuPy kernel per parameter (kernels.fused_kernel).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError
from ..registry import register_solver
from .base import Solver
from ..kernels import fused_kernel

# g = diff + decay * W is the L2-regularized gradient (decay 0 when regularize() already added it).
_ADAM = ("T b1, T b2, T delta, T rate, T decay, T w", "T m, T v, T diff",
         "T g = diff + decay * w; m = b1 * m + (1 - b1) * g; v = b2 * v + (1 - b2) * (g * g); "
         "diff = rate * (m / (sqrt(v) + delta));", "caffelite_adam_update")


def _no_momentum(param, name: str) -> None:
    if param.momentum != 0:
        raise ConfigError(f"{name} cannot use momentum (momentum is {param.momentum})",
                          hint="remove momentum from the solver, or set it to 0")


@register_solver("AdaGrad")
class AdaGradSolver(Solver):
    @classmethod
    def check_param(cls, param) -> None:
        _no_momentum(param, "AdaGrad")

    def compute_update(self, param_id: int, rate: float) -> None:
        xp = self._xp
        diff = self.learnable_params[param_id].diff
        history = self.history_data(param_id)
        tmp = self.scratch(param_id)
        xp.multiply(diff, diff, out=tmp)
        history += tmp
        xp.sqrt(history, out=tmp)
        tmp += self._dt(self.param.delta)
        xp.divide(diff, tmp, out=tmp)
        xp.multiply(tmp, self.local_rate(param_id, rate), out=diff)


@register_solver("RMSProp")
class RMSPropSolver(Solver):
    @classmethod
    def check_param(cls, param) -> None:
        _no_momentum(param, "RMSProp")
        if not 0 <= param.rms_decay < 1:
            raise ConfigError(f"rms_decay should lie in [0, 1), got {param.rms_decay}",
                              hint="the default is 0.99")

    def compute_update(self, param_id: int, rate: float) -> None:
        xp = self._xp
        r = self._dt(self.param.rms_decay)
        diff = self.learnable_params[param_id].diff
        history = self.history_data(param_id)
        tmp = self.scratch(param_id)
        xp.multiply(diff, diff, out=tmp)
        history *= r
        tmp *= self._dt(1) - r
        history += tmp
        xp.sqrt(history, out=tmp)
        tmp += self._dt(self.param.delta)
        xp.divide(diff, tmp, out=tmp)
        xp.multiply(tmp, self.local_rate(param_id, rate), out=diff)


@register_solver("AdaDelta")
class AdaDeltaSolver(Solver):
    history_sets = 2

    def compute_update(self, param_id: int, rate: float) -> None:
        xp = self._xp
        r = self._dt(self.param.momentum)
        one_minus_r = self._dt(1) - r
        delta = self._dt(self.param.delta)
        diff = self.learnable_params[param_id].diff
        grad_sq, update_sq = self.history_data(param_id, 0), self.history_data(param_id, 1)
        update, tmp = self.scratch(param_id, 0), self.scratch(param_id, 1)
        xp.multiply(diff, diff, out=update)
        grad_sq *= r
        update *= one_minus_r
        grad_sq += update
        xp.add(update_sq, delta, out=update)
        xp.add(grad_sq, delta, out=tmp)
        xp.divide(update, tmp, out=update)
        xp.sqrt(update, out=update)
        diff *= update
        xp.multiply(diff, diff, out=update)
        update_sq *= r
        update *= one_minus_r
        update_sq += update
        diff *= self.local_rate(param_id, rate)


@register_solver("Adam")
class AdamSolver(Solver):
    history_sets = 2
    fuses_l2_decay = True

    @classmethod
    def check_param(cls, param) -> None:
        for name in ("momentum", "momentum2"):
            if not 0 <= getattr(param, name) < 1:
                raise ConfigError(f"Adam needs 0 <= {name} < 1, got {getattr(param, name)}",
                                  hint="the usual values are momentum 0.9, momentum2 0.999")

    def compute_update(self, param_id: int, rate: float) -> None:
        xp = self._xp
        b1, b2 = self._dt(self.param.momentum), self._dt(self.param.momentum2)
        t = self.iter + 1
        correction = self._dt(math.sqrt(1.0 - math.pow(float(b2), t)) / (1.0 - math.pow(float(b1), t)))
        diff = self.learnable_params[param_id].diff
        m, v = self.history_data(param_id, 0), self.history_data(param_id, 1)
        if xp is not np:  # one fused kernel per parameter on the GPU
            fused_kernel(xp, *_ADAM)(b1, b2, self._dt(self.param.delta),
                                     self.local_rate(param_id, rate) * correction,
                                     self.fused_l2_decay(param_id), self.learnable_params[param_id].data,
                                     m, v, diff)
            return
        tmp = self.scratch(param_id)
        m *= b1
        xp.multiply(diff, self._dt(1) - b1, out=tmp)
        m += tmp
        xp.multiply(diff, diff, out=tmp)
        v *= b2
        tmp *= self._dt(1) - b2
        v += tmp
        xp.sqrt(v, out=tmp)
        tmp += self._dt(self.param.delta)
        xp.divide(m, tmp, out=tmp)
        xp.multiply(tmp, self.local_rate(param_id, rate) * correction, out=diff)
