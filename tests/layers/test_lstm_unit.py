"""LSTMUnit against a plain NumPy reference, with gradient checks."""
import math

import numpy as np
import pytest

from caffelite.errors import ConfigError
from layer_testing import check_gradient, make_layer, run, setup


def sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def ref_lstm_unit(c_prev, x, cont):
    _, N, D = c_prev.shape
    c = np.zeros_like(c_prev)
    h = np.zeros_like(c_prev)
    for n in range(N):
        for d in range(D):
            i = sig(x[0, n, d])
            f = cont[0, n] * sig(x[0, n, D + d])
            o = sig(x[0, n, 2 * D + d])
            g = math.tanh(x[0, n, 3 * D + d])
            c[0, n, d] = f * c_prev[0, n, d] + i * g
            h[0, n, d] = o * math.tanh(c[0, n, d])
    return c, h


@pytest.fixture
def inputs():
    rs = np.random.default_rng(11)
    N, D = 3, 4
    return (rs.standard_normal((1, N, D)), rs.standard_normal((1, N, 4 * D)),
            np.array([[1.0, 0.0, 1.0]]))


def test_lstm_unit_forward(inputs):
    _, _, _, (c, h) = run("LSTMUnit", list(inputs), num_top=2)
    ref_c, ref_h = ref_lstm_unit(*inputs)
    np.testing.assert_allclose(c, ref_c, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h, ref_h, rtol=1e-12, atol=1e-14)
    # cont = 0 forgets c_prev: stream 1 does not depend on it.
    c_prev, x, cont = inputs
    c2, _ = ref_lstm_unit(c_prev + 5.0, x, cont)
    np.testing.assert_allclose(c2[0, 1], ref_c[0, 1])


def test_lstm_unit_gradient(inputs):
    layer = make_layer("LSTMUnit")
    bottom, top = setup(layer, list(inputs), num_top=2)
    assert check_gradient(layer, bottom, top, check_bottom=[0, 1]) > 0
    assert not layer.allow_force_backward(2)


def test_lstm_unit_float32(inputs):
    arrays = [a.astype(np.float32) for a in inputs]
    layer, bottom, top, (c, h) = run("LSTMUnit", arrays, num_top=2, dtype=np.float32)
    assert c.dtype == np.float32 and h.dtype == np.float32
    np.testing.assert_allclose(h, ref_lstm_unit(*inputs)[1], rtol=1e-5, atol=1e-6)


def test_lstm_unit_rejects_cont_gradient(inputs):
    layer, bottom, top, _ = run("LSTMUnit", list(inputs), num_top=2)
    with pytest.raises(ConfigError, match="sequence indicators"):
        layer.backward(top, [True, True, True], bottom)


def test_lstm_unit_shape_errors(inputs):
    c_prev, x, cont = inputs
    with pytest.raises(ConfigError, match="4 x the cell width"):
        run("LSTMUnit", [c_prev, x[:, :, :-1], cont], num_top=2)
    with pytest.raises(ConfigError, match="cont"):
        run("LSTMUnit", [c_prev, x, cont[:, :2]], num_top=2)
