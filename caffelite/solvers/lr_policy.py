"""Learning-rate policies (SolverParameter ``lr_policy``), as Caffe's SGDSolver::GetLearningRate.

Each policy is ``f(param, iter, current_step, dtype) -> (rate, current_step)``;
it is pure (no logging, no state): the solver owns ``current_step`` (saved in
the solver state) and passes it back in. ``dtype`` is the nets' precision:
Caffe computes the rate in ``Dtype`` (float for float nets), and the rates it
prints differ in the 6th digit from a double computation, so the built-in
policies round where Caffe's C++ rounds (float arithmetic, ``powf``, and
double ``pow`` for integer exponents). With ``base_lr`` = b::

    fixed      b
    step       b * gamma ^ floor(iter / stepsize)        (current_step = floor(iter / stepsize))
    exp        b * gamma ^ iter
    inv        b * (1 + gamma * iter) ^ (-power)
    multistep  b * gamma ^ current_step;  current_step advances by one when
               iter >= stepvalue[current_step] (checked once per iteration, as Caffe)
    poly       b * (1 - iter / max_iter) ^ power
    sigmoid    b / (1 + exp(-gamma * (iter - stepsize)))

A user policy is one decorated function in a plugin module::

    @register_lr_policy("cosine")
    def cosine(param, iter, current_step, dtype): ...
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError
from ..registry import LR_POLICIES, register_lr_policy

POLICY_NAMES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def get_lr_policy(param):
    """The policy function named by ``param.lr_policy``; ConfigError when missing or unknown."""
    if not param.HasField("lr_policy") or not param.lr_policy:
        raise ConfigError("the solver has no lr_policy",
                          hint=f"add 'lr_policy: fixed' (or one of {', '.join(POLICY_NAMES[1:])})")
    return LR_POLICIES.get(param.lr_policy)


def learning_rate(param, iter: int, current_step: int = 0, dtype=np.float32) -> tuple[float, int]:
    """(rate, current_step) at ``iter`` for nets of ``dtype``."""
    return get_lr_policy(param)(param, iter, current_step, np.dtype(dtype).type)


def _pow(x: float, y: float) -> float:
    """C's pow: inf on overflow, nan on a negative base with a fractional exponent."""
    try:
        return math.pow(x, y)
    except OverflowError:
        return math.inf
    except ValueError:
        return math.nan


def _need(condition: bool, message: str, hint: str) -> None:
    if not condition:
        raise ConfigError(message, hint=hint)


def _powf(dt, x, y):
    """std::pow(Dtype, Dtype): a correctly rounded pow in the nets' precision."""
    return dt(_pow(float(x), float(y)))


def _times_pow_int(dt, param, exponent: int) -> float:
    """base_lr * pow(gamma, int): C++ promotes pow(float, int) to double, then rounds to Dtype."""
    return float(dt(float(dt(param.base_lr)) * _pow(float(dt(param.gamma)), exponent)))


@register_lr_policy("fixed")
def fixed(param, iter: int, current_step: int, dt=np.float32):
    return float(dt(param.base_lr)), current_step


@register_lr_policy("step")
def step(param, iter: int, current_step: int, dt=np.float32):
    _need(param.stepsize > 0, f"lr_policy 'step' needs stepsize > 0, got {param.stepsize}",
          "set stepsize: the number of iterations between rate drops")
    _need(param.gamma >= 0, f"lr_policy 'step' needs gamma >= 0, got {param.gamma}",
          "gamma is the factor applied every stepsize iterations, e.g. 0.1")
    current_step = iter // param.stepsize
    return _times_pow_int(dt, param, current_step), current_step


@register_lr_policy("exp")
def exp(param, iter: int, current_step: int, dt=np.float32):
    return _times_pow_int(dt, param, iter), current_step


@register_lr_policy("inv")
def inv(param, iter: int, current_step: int, dt=np.float32):
    base = dt(1) + dt(param.gamma) * dt(iter)
    return float(dt(param.base_lr) * _powf(dt, base, -dt(param.power))), current_step


@register_lr_policy("multistep")
def multistep(param, iter: int, current_step: int, dt=np.float32):
    if current_step < len(param.stepvalue) and iter >= param.stepvalue[current_step]:
        current_step += 1
    return _times_pow_int(dt, param, current_step), current_step


@register_lr_policy("poly")
def poly(param, iter: int, current_step: int, dt=np.float32):
    _need(param.max_iter > 0, f"lr_policy 'poly' needs max_iter > 0, got {param.max_iter}",
          "poly decays the rate to 0 at max_iter")
    base = dt(1) - dt(iter) / dt(param.max_iter)
    return float(dt(param.base_lr) * _powf(dt, base, param.power)), current_step


@register_lr_policy("sigmoid")
def sigmoid(param, iter: int, current_step: int, dt=np.float32):
    z = float(-dt(param.gamma) * (dt(iter) - dt(param.stepsize)))
    e = dt(math.exp(z) if z < 700 else math.inf)
    return float(dt(param.base_lr) * (dt(1) / (dt(1) + e))), current_step


__all__ = ["get_lr_policy", "learning_rate", "POLICY_NAMES"]
