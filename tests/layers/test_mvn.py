"""MVN: NumPy reference for each variant, gradients, in place, real-Caffe numbers."""
import numpy as np
import pytest

from caffelite.blob import Blob
from caffelite.proto import pb
from conftest import FIXTURES
from golden import caffe_blob
from layer_testing import check_gradient, make_layer, run


def mvn_ref(x, normalize_variance=True, across_channels=False, eps=1e-9):
    """Normalise each (n, c) (or each n) group by loops; eps is added to the std, as Caffe does."""
    eps = float(np.float32(eps))
    y = np.empty_like(x)
    groups = [(n,) for n in range(x.shape[0])] if across_channels else list(np.ndindex(x.shape[:2]))
    for g in groups:
        values = x[g]
        mean = sum(values.flat) / values.size
        z = values - mean
        if normalize_variance:
            std = np.sqrt(sum(v * v for v in z.flat) / values.size)
            z = z / (std + eps)
        y[g] = z
    return y


def data(shape=(2, 3, 4, 5), seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) * rng.uniform(0.5, 3, size=shape[:2] + (1,) * (len(shape) - 2)) + 1.5


VARIANTS = [{}, {"normalize_variance": False}, {"across_channels": True},
            {"across_channels": True, "normalize_variance": False}, {"eps": 0.1}, {"eps": 1e-3}]


@pytest.mark.parametrize("param", VARIANTS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 2, 6), (2, 3, 1, 1)])
def test_forward(param, shape):
    x = data(shape)
    _, _, _, (y,) = run("MVN", [x], mvn_param=param)
    np.testing.assert_allclose(y, mvn_ref(x, **param), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("param", VARIANTS)
def test_gradient(param):
    layer, bottom, top, _ = run("MVN", [data((2, 3, 3, 4))], mvn_param=param)
    assert check_gradient(layer, bottom, top) > 0


def test_constant_rows_stay_finite():
    x = np.ones((2, 3, 2, 2))
    layer, bottom, top, (y,) = run("MVN", [x])
    np.testing.assert_array_equal(y, 0)
    top[0].set_diff(np.arange(24.0).reshape(x.shape))
    layer.backward(top, [True], bottom)
    assert np.isfinite(bottom[0].cpu_diff()).all()


@pytest.mark.parametrize("param", VARIANTS[:4])
def test_in_place_matches(param):
    x, dy = data(), data(seed=3)
    layer, bottom, top, (y,) = run("MVN", [x], mvn_param=param)
    top[0].set_diff(dy)
    layer.backward(top, [True], bottom)
    layer2 = make_layer("MVN", mvn_param=param)
    blob = Blob(x.shape, np.float64)
    blob.set_data(x)
    layer2.layer_setup([blob], [blob])
    layer2.forward([blob], [blob])
    np.testing.assert_allclose(blob.cpu_data(), y, rtol=1e-12)
    blob.set_diff(dy)
    layer2.backward([blob], [True], [blob])
    np.testing.assert_allclose(blob.cpu_diff(), bottom[0].cpu_diff(), rtol=1e-10, atol=1e-12)


def test_matches_caffe():
    x, expected = caffe_blob("crop"), caffe_blob("mvn")
    _, _, _, (y,) = run("MVN", [x], dtype=np.float32)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
