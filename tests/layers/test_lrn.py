"""LRN across and within channels: NumPy reference, gradients, real-Caffe numbers."""
import numpy as np
import pytest

from caffelite.errors import ConfigError
from caffelite.proto import pb
from conftest import FIXTURES
from golden import caffe_blob
from layer_testing import check_gradient, run

pytestmark = pytest.mark.usefixtures("cpu_parts")   # the images in one part and in three


def f32(v):
    return float(np.float32(v))  # lrn_param fields are proto floats


def lrn_across_ref(x, size, alpha, beta, k):
    alpha, beta, k = f32(alpha), f32(beta), f32(k)
    N, C, H, W = x.shape
    y = np.empty_like(x)
    half = (size - 1) // 2
    for n, c, h, w in np.ndindex(x.shape):
        total = sum(x[n, j, h, w] ** 2 for j in range(max(0, c - half), min(C, c + half + 1)))
        y[n, c, h, w] = x[n, c, h, w] * (k + alpha / size * total) ** -beta
    return y


def lrn_within_ref(x, size, alpha, beta):
    """Caffe's composition: AVE pool of x^2 (n x n, pad (n-1)/2, divisor n^2), then (1 + alpha p)^-beta."""
    alpha, beta = f32(alpha), f32(beta)
    N, C, H, W = x.shape
    y = np.empty_like(x)
    half = (size - 1) // 2
    for n, c, h, w in np.ndindex(x.shape):
        total = sum(x[n, c, i, j] ** 2
                    for i in range(max(0, h - half), min(H, h + half + 1))
                    for j in range(max(0, w - half), min(W, w + half + 1)))
        y[n, c, h, w] = x[n, c, h, w] * (1 + alpha * total / size ** 2) ** -beta
    return y


def data(shape=(2, 7, 4, 5), seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("size,alpha,beta,k,channels", [
    (5, 1.0, 0.75, 1.0, 7), (3, 0.5, 0.6, 2.0, 7), (1, 1.0, 0.75, 1.0, 4), (5, 2.0, 0.75, 1.0, 3),
    (7, 1e-4, 0.75, 1.0, 2)])
def test_across_channels(size, alpha, beta, k, channels):
    x = data((2, channels, 3, 4))
    layer, bottom, top, (y,) = run("LRN", [x], lrn_param={
        "local_size": size, "alpha": alpha, "beta": beta, "k": k})
    np.testing.assert_allclose(y, lrn_across_ref(x, size, alpha, beta, k), rtol=1e-12)
    assert check_gradient(layer, bottom, top) > 0


@pytest.mark.parametrize("size,alpha,beta,hw", [
    (3, 1.0, 0.75, (4, 5)), (5, 2.0, 0.6, (4, 6)), (1, 1.0, 0.75, (3, 3)), (5, 1.5, 0.75, (2, 3)),
    (3, 1.0, 0.75, (1, 1))])
def test_within_channel(size, alpha, beta, hw):
    x = data((2, 3) + hw)
    # k is not used within a channel: Caffe's Power layer shifts by 1.
    layer, bottom, top, (y,) = run("LRN", [x], lrn_param={
        "local_size": size, "alpha": alpha, "beta": beta, "k": 5.0, "norm_region": "WITHIN_CHANNEL"})
    np.testing.assert_allclose(y, lrn_within_ref(x, size, alpha, beta), rtol=1e-12)
    assert check_gradient(layer, bottom, top) > 0


def test_batch_shape_change():
    layer, bottom, top, _ = run("LRN", [data((1, 4, 3, 3))], lrn_param={"local_size": 3})
    x = data((3, 4, 5, 2), seed=4)
    bottom[0].reshape(x.shape)
    bottom[0].set_data(x)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].cpu_data(), lrn_across_ref(x, 3, 1.0, 0.75, 1.0), rtol=1e-12)
    assert check_gradient(layer, bottom, top) > 0


def test_even_local_size_is_an_error():
    with pytest.raises(ConfigError, match="odd"):
        run("LRN", [data()], lrn_param={"local_size": 4})


def test_needs_four_axes():
    with pytest.raises(ConfigError, match="4-axis"):
        run("LRN", [np.ones((2, 3))])


@pytest.mark.parametrize("bottom_name,name,lrn_param", [
    ("pool_max", "lrn_x", {"local_size": 5, "alpha": 0.0001, "beta": 0.75}),
    ("pool_ave", "lrn_w", {"local_size": 3, "alpha": 0.001, "beta": 0.75,
                           "norm_region": "WITHIN_CHANNEL"})])
def test_matches_caffe(bottom_name, name, lrn_param):
    x, expected = caffe_blob(bottom_name), caffe_blob(name)
    _, _, _, (y,) = run("LRN", [x], dtype=np.float32, lrn_param=lrn_param)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    # The fixture's alpha is small: make sure the layer is not passing x through.
    assert not np.allclose(x, expected, rtol=1e-7, atol=0)
