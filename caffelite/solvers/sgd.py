"""Stochastic gradient descent with momentum, and Nesterov's accelerated gradient.

With g the regularized gradient in ``diff``, lr = rate * lr_mult, m = momentum
and V the history blob (one per learnable parameter)::

    SGD:       V = m * V + lr * g;                 step = V
    Nesterov:  V' = m * V + lr * g;                step = (1 + m) * V' - m * V;  V = V'

The step is written into ``diff``; the net then does W -= diff. On a GPU each update is one
fused CuPy kernel per parameter (kernels.fused_kernel), or one for all of them at once
(flat_update.py); on the CPU one pass of the compiled kernels (cpu_kernels.c), or without
them the NumPy code below; all in Caffe's order.
"""
from __future__ import annotations

import numpy as np

from ..registry import register_solver
from .base import Solver
from ..kernels import fused_kernel

# g = diff + decay * W is the L2-regularized gradient (decay 0 when regularize() already added it).
_SGD = ("T momentum, T rate, T decay, T w", "T history, T diff",
        "T g = diff + decay * w; history = momentum * history + rate * g; diff = history;",
        "caffelite_sgd_update")
_NESTEROV = ("T momentum, T rate, T decay, T w", "T history, T diff",
             "T g = diff + decay * w; T previous = history; history = momentum * history + rate * g; "
             "diff = (1 + momentum) * history - momentum * previous;", "caffelite_nesterov_update")


@register_solver("SGD")
class SGDSolver(Solver):
    fuses_l2_decay = True
    cpu_kernel = "sgd"

    def compute_update(self, param_id: int, rate: float) -> None:
        xp = self._xp
        diff = self.learnable_params[param_id].diff
        history = self.history_data(param_id)
        if xp is not np:
            fused_kernel(xp, *_SGD)(self._dt(self.param.momentum), self.local_rate(param_id, rate),
                                    self.fused_l2_decay(param_id), self.learnable_params[param_id].data,
                                    history, diff)
            return
        tmp = self.scratch(param_id)
        # Caffe's axpby: V = m * V, then V += lr * g.
        history *= self._dt(self.param.momentum)
        xp.multiply(diff, self.local_rate(param_id, rate), out=tmp)
        history += tmp
        diff[...] = history


@register_solver("Nesterov")
class NesterovSolver(Solver):
    fuses_l2_decay = True
    cpu_kernel = "nesterov"

    def compute_update(self, param_id: int, rate: float) -> None:
        xp = self._xp
        m = self._dt(self.param.momentum)
        diff = self.learnable_params[param_id].diff
        history = self.history_data(param_id)
        if xp is not np:
            fused_kernel(xp, *_NESTEROV)(m, self.local_rate(param_id, rate), self.fused_l2_decay(param_id),
                                         self.learnable_params[param_id].data, history, diff)
            return
        tmp, previous = self.scratch(param_id, 0), self.scratch(param_id, 1)
        previous[...] = history
        history *= m
        xp.multiply(diff, self.local_rate(param_id, rate), out=tmp)
        history += tmp
        # step = (1 + m) * V' - m * V, as Caffe's axpby(1 + m, V', -m, V).
        previous *= -m
        xp.multiply(history, self._dt(1) + m, out=tmp)
        xp.add(previous, tmp, out=diff)
