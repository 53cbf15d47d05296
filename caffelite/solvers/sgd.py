"""Stochastic gradient descent with momentum, and Nesterov's accelerated gradient.

With g the regularized gradient in ``diff``, lr = rate * lr_mult, m = momentum
and V the history blob (one per learnable parameter)::

    SGD:       V = m * V + lr * g;                 step = V
    Nesterov:  V' = m * V + lr * g;                step = (1 + m) * V' - m * V;  V = V'

The step is written into ``diff``; the net then does W -= diff.
"""
from __future__ import annotations

from ..registry import register_solver
from .base import Solver


@register_solver("SGD")
class SGDSolver(Solver):
    def compute_update(self, param_id: int, rate: float) -> None:
        xp = self._xp
        diff = self.net.learnable_params[param_id].diff
        history = self.history_data(param_id)
        tmp = self.scratch(param_id)
        # Caffe's axpby: V = m * V, then V += lr * g.
        history *= self._dt(self.param.momentum)
        xp.multiply(diff, self.local_rate(param_id, rate), out=tmp)
        history += tmp
        diff[...] = history


@register_solver("Nesterov")
class NesterovSolver(Solver):
    def compute_update(self, param_id: int, rate: float) -> None:
        xp = self._xp
        m = self._dt(self.param.momentum)
        diff = self.net.learnable_params[param_id].diff
        history = self.history_data(param_id)
        tmp, previous = self.scratch(param_id, 0), self.scratch(param_id, 1)
        previous[...] = history
        history *= m
        xp.multiply(diff, self.local_rate(param_id, rate), out=tmp)
        history += tmp
        # step = (1 + m) * V' - m * V, as Caffe's axpby(1 + m, V', -m, V).
        previous *= -m
        xp.multiply(history, self._dt(1) + m, out=tmp)
        xp.add(previous, tmp, out=diff)
