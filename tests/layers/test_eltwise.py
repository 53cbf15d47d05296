"""Eltwise PROD / SUM / MAX against plain NumPy references."""
import numpy as np
import pytest

from caffelite.blob import Blob
from caffelite.errors import ConfigError
from layer_testing import check_gradient, make_layer, run, setup

SHAPE = (2, 3, 2)


@pytest.fixture
def rs():
    return np.random.default_rng(17)


def inputs(rs, n):
    # Away from zero so PROD's top / bottom gradient is well conditioned.
    return [rs.uniform(0.5, 2.0, SHAPE) * rs.choice([-1, 1], SHAPE) for _ in range(n)]


def ref_eltwise(op, xs, coeff=None, dy=None):
    """Top and bottom gradients, element by element."""
    y = np.empty(SHAPE)
    grads = [np.zeros(SHAPE) for _ in xs]
    coeff = coeff or [1.0] * len(xs)
    for idx in np.ndindex(*SHAPE):
        vals = [x[idx] for x in xs]
        if op == "SUM":
            y[idx] = sum(c * v for c, v in zip(coeff, vals))
            for g, c in zip(grads, coeff):
                g[idx] = c * dy[idx]
        elif op == "PROD":
            y[idx] = np.prod(vals)
            for i, g in enumerate(grads):
                g[idx] = dy[idx] * np.prod([v for j, v in enumerate(vals) if j != i])
        else:
            win = 0 if vals[0] > vals[1] else 1  # Caffe CPU: bottom 1 wins a tie with 0
            for i in range(2, len(vals)):
                if vals[i] > vals[win]:  # later bottoms must be strictly larger
                    win = i
            y[idx] = vals[win]
            grads[win][idx] = dy[idx]
    return y, grads


@pytest.mark.parametrize("op,n,coeff,stable", [
    ("SUM", 2, None, True),
    ("SUM", 3, [0.5, -2.0, 1.0], True),
    ("PROD", 2, None, True),
    ("PROD", 3, None, True),
    ("PROD", 3, None, False),
    ("MAX", 2, None, True),
    ("MAX", 4, None, True),
])
def test_eltwise_forward_backward(rs, op, n, coeff, stable, device):
    xs = inputs(rs, n)
    param = {"operation": op, "stable_prod_grad": stable}
    if coeff:
        param["coeff"] = coeff
    layer, bottom, top, (y,) = run("Eltwise", xs, eltwise_param=param, device=device)
    dy = rs.standard_normal(SHAPE)
    ref_y, ref_grads = ref_eltwise(op, xs, coeff, dy)
    np.testing.assert_allclose(y, ref_y, rtol=1e-12)
    top[0].set_diff(dy)
    layer.backward(top, [True] * n, bottom)
    for b, g in zip(bottom, ref_grads):
        np.testing.assert_allclose(b.cpu_diff(), g, rtol=1e-10, atol=1e-14)


def test_eltwise_default_is_sum(rs):
    xs = inputs(rs, 2)
    _, _, _, (y,) = run("Eltwise", xs)
    np.testing.assert_allclose(y, xs[0] + xs[1], rtol=1e-12)


def test_eltwise_max_ties_follow_caffe(rs):
    a = np.ones(SHAPE)
    xs = [a, a.copy(), a.copy()]
    xs[2].reshape(-1)[0] = 2.0
    layer, bottom, top, (y,) = run("Eltwise", xs, eltwise_param={"operation": "MAX"})
    dy = rs.standard_normal(SHAPE)
    top[0].set_diff(dy)
    layer.backward(top, [True] * 3, bottom)
    _, ref_grads = ref_eltwise("MAX", xs, dy=dy)
    for b, g in zip(bottom, ref_grads):
        np.testing.assert_array_equal(b.cpu_diff(), g)
    assert not bottom[0].cpu_diff().any()  # bottom 1 wins the 0/1 ties
    assert bottom[2].cpu_diff().reshape(-1)[0] == dy.reshape(-1)[0]


def test_eltwise_keeps_float32(rs):
    xs = [x.astype(np.float32) for x in inputs(rs, 2)]
    for op in ("SUM", "PROD", "MAX"):
        layer, bottom, top, (y,) = run("Eltwise", xs, dtype=np.float32,
                                       eltwise_param={"operation": op})
        assert y.dtype == np.float32
        top[0].set_diff(np.ones(SHAPE, np.float32))
        layer.backward(top, [True, True], bottom)
        assert bottom[0].diff.dtype == np.float32


@pytest.mark.parametrize("param,n", [
    ({"operation": "SUM"}, 3),
    ({"operation": "SUM", "coeff": [2.0, -0.5]}, 2),
    ({"operation": "PROD"}, 3),
    ({"operation": "PROD", "stable_prod_grad": False}, 2),
    ({"operation": "MAX"}, 3),
])
def test_eltwise_gradient(rs, param, n):
    layer = make_layer("Eltwise", eltwise_param=param)
    bottom, top = setup(layer, inputs(rs, n))
    assert check_gradient(layer, bottom, top) > 0


def test_eltwise_errors(rs):
    xs = inputs(rs, 2)
    with pytest.raises(ConfigError, match="coeff"):
        run("Eltwise", xs, eltwise_param={"coeff": [1.0, 2.0, 3.0]})
    with pytest.raises(ConfigError, match="SUM"):
        run("Eltwise", xs, eltwise_param={"operation": "PROD", "coeff": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="shape"):
        run("Eltwise", [xs[0], np.zeros((2, 3, 3))])
    with pytest.raises(ConfigError, match="2 to|at least 2"):
        run("Eltwise", [xs[0]])
    b = Blob(SHAPE, np.float64)
    with pytest.raises(ConfigError, match="in place"):
        make_layer("Eltwise").layer_setup([b, Blob(SHAPE, np.float64)], [b])


def test_eltwise_max_ignores_coeff_like_caffe(rs):
    xs = inputs(rs, 2)
    _, _, _, (y,) = run("Eltwise", xs, eltwise_param={"operation": "MAX", "coeff": [2.0, 3.0]})
    np.testing.assert_allclose(y, ref_eltwise("MAX", xs, dy=np.zeros(SHAPE))[0], rtol=1e-12)
