"""AbsVal, Power, Exp, Log, Threshold, BNLL, ELU, Clip, Swish: references, gradients, in place."""
import math

import numpy as np
import pytest

from caffelite.blob import Blob
from caffelite.errors import ConfigError
from layer_testing import check_gradient, make_layer, run

SHAPE = (2, 3, 4, 5)


def data(shape=SHAPE, seed=0, low=None):
    x = np.random.default_rng(seed).standard_normal(shape)
    x[np.abs(x) < 1e-2] = 0.5  # keep clear of kinks at 0
    if low is not None:
        x = np.abs(x) + low
    return x


def elementwise(f, x):
    """Apply the scalar function ``f`` element by element (the plain reference)."""
    return np.array([f(float(v)) for v in x.reshape(-1)]).reshape(x.shape)


def forward_backward(type, x, dy, in_place, **kwargs):
    """(y, dx) with top == bottom or not."""
    layer = make_layer(type, **kwargs)
    bottom = Blob(x.shape, layer.dtype, layer.device)
    bottom.set_data(x)
    top = bottom if in_place else Blob((), layer.dtype, layer.device)
    layer.layer_setup([bottom], [top])
    layer.reshape([bottom], [top])
    layer.forward([bottom], [top])
    y = top.cpu_data().copy()
    top.set_diff(dy)
    layer.backward([top], [True], [bottom])
    return y, bottom.cpu_diff().copy()


def assert_in_place_matches(type, x, **kwargs):
    dy = np.random.default_rng(5).standard_normal(x.shape)
    y, dx = forward_backward(type, x, dy, False, **kwargs)
    y2, dx2 = forward_backward(type, x, dy, True, **kwargs)
    np.testing.assert_allclose(y2, y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx2, dx, rtol=1e-12, atol=1e-12)


def check(type, x, reference, **kwargs):
    """Forward against ``reference`` (a scalar function), the gradient, and in place."""
    layer, bottom, top, (y,) = run(type, [x], **kwargs)
    np.testing.assert_allclose(y, elementwise(reference, x), rtol=1e-10, atol=1e-12)
    assert check_gradient(layer, bottom, top) > 0
    assert_in_place_matches(type, x, **kwargs)


# ---- AbsVal, Power, Exp, Log -------------------------------------------------
def test_absval():
    check("AbsVal", data(), abs)


def test_absval_gradient_is_zero_at_zero():
    x = np.array([[-1.0, 0.0, 2.0]])
    y, dx = forward_backward("AbsVal", x, np.ones_like(x), False)
    np.testing.assert_array_equal(dx, [[-1.0, 0.0, 1.0]])


@pytest.mark.parametrize("power,scale,shift", [
    (1.0, 1.0, 0.0), (2.0, 0.5, 1.0), (3.0, -1.5, 0.25), (0.5, 2.0, 1.0), (-1.5, 1.0, 0.5), (1.0, 2.0, -1.0)])
def test_power(power, scale, shift):
    low = None if float(power).is_integer() else 0.2  # a fractional power needs shift + scale x > 0
    x = data(low=low)
    check("Power", x, lambda v: (shift + scale * v) ** power,
          power_param={"power": power, "scale": scale, "shift": shift})


@pytest.mark.parametrize("power,shift,value", [(0.0, 3.0, 1.0), (2.0, 3.0, 9.0)])
def test_power_constant_when_power_times_scale_is_zero(power, shift, value):
    x = data()
    kwargs = {"power_param": {"power": power, "scale": 0.0 if power else 2.0, "shift": shift}}
    y, dx = forward_backward("Power", x, np.ones_like(x), False, **kwargs)
    np.testing.assert_array_equal(y, np.full_like(x, value))
    np.testing.assert_array_equal(dx, 0)


@pytest.mark.parametrize("base,scale,shift", [(-1.0, 1.0, 0.0), (2.0, 0.5, 1.0), (0.5, -1.0, -0.5)])
def test_exp(base, scale, shift):
    b = math.e if base == -1 else base
    check("Exp", data(), lambda v: b ** (shift + scale * v),
          exp_param={"base": base, "scale": scale, "shift": shift})


@pytest.mark.parametrize("base,scale,shift", [(-1.0, 1.0, 0.0), (10.0, 2.0, 0.5), (2.0, 0.5, 1.0)])
def test_log(base, scale, shift):
    b = math.e if base == -1 else base
    check("Log", data(low=0.1), lambda v: math.log(shift + scale * v) / math.log(b),
          log_param={"base": base, "scale": scale, "shift": shift})


@pytest.mark.parametrize("type,field", [("Exp", "exp_param"), ("Log", "log_param")])
def test_bad_base_is_a_config_error(type, field):
    with pytest.raises(ConfigError, match="base"):
        run(type, [data()], **{field: {"base": -2.0}})


# ---- Threshold ------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_threshold(threshold):
    x = data()
    x[0, 0, 0, :2] = threshold  # equal is not above
    layer, bottom, top, (y,) = run("Threshold", [x], threshold_param={"threshold": threshold})
    np.testing.assert_array_equal(y, elementwise(lambda v: 1.0 if v > threshold else 0.0, x))
    y2, _ = forward_backward("Threshold", x, np.ones_like(x), True, threshold_param={"threshold": threshold})
    np.testing.assert_array_equal(y2, y)


def test_threshold_has_no_gradient():
    layer, bottom, top, _ = run("Threshold", [data()])
    bottom[0].set_diff(7.0)
    top[0].set_diff(1.0)
    layer.backward(top, [False], bottom)
    np.testing.assert_array_equal(bottom[0].cpu_diff(), 7.0)  # not asked: untouched
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].cpu_diff(), 0.0)  # asked: zero, a.e. exact
    assert not layer.allow_force_backward(0) and layer.blobs == []


# ---- BNLL, ELU, Clip, Swish -------------------------------------------------------
def test_bnll():
    x = data() * 3
    check("BNLL", x, lambda v: v + math.log1p(math.exp(-v)) if v > 0 else math.log1p(math.exp(v)))


def test_bnll_is_stable_for_large_inputs():
    x = np.array([[-800.0, -40.0, 40.0, 800.0]])
    y, dx = forward_backward("BNLL", x, np.ones_like(x), False)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    np.testing.assert_allclose(y[0, 2:], [40.0, 800.0])
    np.testing.assert_allclose(dx, [[0.0, math.exp(-40.0), 1.0, 1.0]], rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("alpha", [1.0, 0.25, -0.5])  # float32-exact: the proto field is a float
def test_elu(alpha):
    check("ELU", data(), lambda v: v if v > 0 else alpha * (math.exp(v) - 1), elu_param={"alpha": alpha})


@pytest.mark.parametrize("lo,hi", [(-0.5, 0.75), (0.0, 1.0)])
def test_clip(lo, hi):
    x = data()
    x[np.abs(x - lo) < 1e-2] += 0.05  # off the bounds for the numerical check
    x[np.abs(x - hi) < 1e-2] += 0.05
    check("Clip", x, lambda v: max(lo, min(v, hi)), clip_param={"min": lo, "max": hi})


def test_clip_gradient_passes_at_the_bounds():
    x = np.array([[-2.0, -0.5, 0.0, 0.5, 2.0]])
    y, dx = forward_backward("Clip", x, np.ones_like(x), False, clip_param={"min": -0.5, "max": 0.5})
    np.testing.assert_array_equal(dx, [[0.0, 1.0, 1.0, 1.0, 0.0]])  # Caffe: min <= x <= max


def test_clip_needs_min_and_max():
    with pytest.raises(ConfigError, match="min and max"):
        run("Clip", [data()], clip_param={"min": 0.0})


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.5])
def test_swish(beta):
    check("Swish", data(), lambda v: v / (1 + math.exp(-beta * v)), swish_param={"beta": beta})


# ---- dtype ---------------------------------------------------------------------
@pytest.mark.parametrize("type", ["AbsVal", "Power", "Exp", "Log", "Threshold", "BNLL", "ELU", "Swish"])
def test_float32_stays_float32(type):
    x = data(low=0.1).astype(np.float32)
    layer, bottom, top, (y,) = run(type, [x], dtype=np.float32)
    assert y.dtype == np.float32
    top[0].set_diff(1.0)
    layer.backward(top, [True], bottom)
    assert bottom[0].cpu_diff().dtype == np.float32
