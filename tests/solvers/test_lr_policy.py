"""Learning-rate policies against their closed forms and against the rates real Caffe printed."""
import math
import re

import numpy as np
import pytest
from google.protobuf import text_format

from conftest import FIXTURES
from caffelite.errors import ConfigError
from caffelite.log import g
from caffelite.proto import pb
from caffelite.solvers.lr_policy import learning_rate


def solver(text: str) -> "pb.SolverParameter":
    return text_format.Parse(text, pb.SolverParameter())


def rates(param, iters, dtype=np.float64) -> list[float]:
    """Rates as the solver computes them: one call per iteration, current_step carried along."""
    out, step = [], 0
    for it in range(iters):
        rate, step = learning_rate(param, it, step, dtype)
        out.append(rate)
    return out


def f32(x: float) -> float:
    return float(np.float32(x))


@pytest.mark.parametrize("text, formula", [
    ('lr_policy: "fixed" base_lr: 0.1', lambda b, it: b),
    ('lr_policy: "step" base_lr: 0.1 gamma: 0.5 stepsize: 3', lambda b, it: b * 0.5 ** (it // 3)),
    ('lr_policy: "exp" base_lr: 0.1 gamma: 0.9', lambda b, it: b * f32(0.9) ** it),
    ('lr_policy: "inv" base_lr: 0.1 gamma: 0.01 power: 0.75',
     lambda b, it: b * (1 + f32(0.01) * it) ** -0.75),
    ('lr_policy: "poly" base_lr: 0.1 power: 2 max_iter: 10', lambda b, it: b * (1 - it / 10) ** 2),
    ('lr_policy: "sigmoid" base_lr: 0.1 gamma: -0.5 stepsize: 4',
     lambda b, it: b / (1 + math.exp(0.5 * (it - 4)))),
])
def test_closed_forms(text, formula):
    param = solver(text)
    base = param.base_lr
    for it, rate in enumerate(rates(param, 10)):
        assert rate == pytest.approx(formula(base, it), rel=1e-12), it


def test_float32_nets_get_float32_rates():
    param = solver('lr_policy: "inv" base_lr: 0.1 gamma: 0.01 power: 0.75')
    for rate in rates(param, 5, np.float32):
        assert float(np.float32(rate)) == rate


def test_step_sets_current_step():
    param = solver('lr_policy: "step" base_lr: 1 gamma: 0.1 stepsize: 5')
    assert learning_rate(param, 12, 0) == (pytest.approx(0.01), 2)


def test_multistep_advances_once_per_iteration_like_caffe():
    param = solver('lr_policy: "multistep" base_lr: 1 gamma: 0.5 stepvalue: 3 stepvalue: 5 stepvalue: 5')
    got = rates(param, 9)
    # Caffe's GetLearningRate advances current_step at most once per call: the repeated 5 takes effect at 6.
    assert got == [1, 1, 1, 0.5, 0.5, 0.25, 0.125, 0.125, 0.125]
    rate, step = learning_rate(param, 100, 3)
    assert (rate, step) == (0.125, 3)


def test_lenet_rates_match_caffe_log():
    """Every 'Iteration N, lr = X' line in real Caffe's LeNet log (inv policy)."""
    param = text_format.Parse((FIXTURES / "lenet" / "lenet_solver.prototxt").read_text(), pb.SolverParameter())
    lines = re.findall(r"Iteration (\d+), lr = (\S+)", (FIXTURES / "lenet" / "train.log").read_text())
    assert len(lines) == 100
    for it, printed in lines:
        rate, _ = learning_rate(param, int(it), 0)
        assert g(np.float32(rate)) == printed, it
    assert g(np.float32(learning_rate(param, 100)[0])) == "0.00992565"
    assert g(np.float32(learning_rate(param, 9900)[0])) == "0.00596843"


def test_step_rates_match_caffe_log():
    param = text_format.Parse((FIXTURES / "net" / "solver_h5.prototxt").read_text(), pb.SolverParameter())
    lines = re.findall(r"Iteration (\d+), lr = (\S+)", (FIXTURES / "net" / "train_h5.log").read_text())
    assert lines
    for it, printed in lines:
        assert g(np.float32(learning_rate(param, int(it))[0])) == printed


def test_missing_policy():
    with pytest.raises(ConfigError, match="no lr_policy"):
        learning_rate(solver("base_lr: 0.1"), 0)


def test_unknown_policy_suggests():
    with pytest.raises(ConfigError, match="did you mean 'step'"):
        learning_rate(solver('lr_policy: "stpe" base_lr: 0.1'), 0)


@pytest.mark.parametrize("text, match", [
    ('lr_policy: "step" base_lr: 0.1 gamma: 0.1', "stepsize"),
    ('lr_policy: "poly" base_lr: 0.1 power: 1', "max_iter"),
])
def test_policy_settings_checked(text, match):
    with pytest.raises(ConfigError, match=match):
        learning_rate(solver(text), 0)
