"""EuclideanLoss against a plain NumPy reference."""
import numpy as np
import pytest

from caffelite.errors import ConfigError
from layer_testing import check_gradient, make_layer, run, setup


def ref_euclidean(a, b):
    n = a.shape[0]
    total = 0.0
    for x, y in zip(a.reshape(-1), b.reshape(-1)):
        total += (x - y) ** 2
    return total / n / 2, (a - b.reshape(a.shape)) / n


@pytest.fixture
def rs():
    return np.random.default_rng(3)


def test_euclidean_forward_backward(rs):
    a, b = rs.standard_normal((4, 3, 2)), rs.standard_normal((4, 3, 2))
    layer, bottom, top, (loss,) = run("EuclideanLoss", [a, b])
    ref_loss, ref_grad = ref_euclidean(a, b)
    assert loss.shape == ()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    top[0].set_diff(2.0)  # loss weight 2
    layer.backward(top, [True, True], bottom)
    np.testing.assert_allclose(bottom[0].cpu_diff(), 2 * ref_grad, rtol=1e-12)
    np.testing.assert_allclose(bottom[1].cpu_diff(), -2 * ref_grad, rtol=1e-12)


def test_euclidean_same_count_other_shape(rs):
    a, b = rs.standard_normal((3, 4)), rs.standard_normal((3, 2, 2))
    _, _, _, (loss,) = run("EuclideanLoss", [a, b])
    np.testing.assert_allclose(loss, ref_euclidean(a, b.reshape(3, 4))[0], rtol=1e-12)


def test_euclidean_float32(rs):
    a, b = rs.standard_normal((4, 5)).astype(np.float32), rs.standard_normal((4, 5)).astype(np.float32)
    layer, bottom, top, (loss,) = run("EuclideanLoss", [a, b], dtype=np.float32)
    assert loss.dtype == np.float32
    np.testing.assert_allclose(loss, ref_euclidean(a.astype(float), b.astype(float))[0], rtol=1e-5)
    top[0].set_diff(1.0)
    layer.backward(top, [True, True], bottom)
    assert bottom[0].diff.dtype == np.float32


def test_euclidean_gradient(rs):
    layer = make_layer("EuclideanLoss")
    bottom, top = setup(layer, [rs.standard_normal((3, 2, 2)), rs.standard_normal((3, 2, 2))])
    assert check_gradient(layer, bottom, top) > 0
    assert layer.allow_force_backward(1)


def test_euclidean_count_mismatch(rs):
    with pytest.raises(ConfigError, match="same number of values"):
        run("EuclideanLoss", [rs.standard_normal((3, 4)), rs.standard_normal((3, 5))])
