"""All seven Caffe fillers: the distributions and scales of CAFFE_REFERENCE section 3."""
import math

import numpy as np
import pytest

from caffelite.blob import Blob
from caffelite.errors import ConfigError
from caffelite.fillers import fill
from caffelite.proto import pb


def filled(shape, **fields):
    blob = Blob(shape, np.float64)
    fill(blob, pb.FillerParameter(**fields), np.random.default_rng(0))
    return blob.cpu_data()


def test_constant():
    np.testing.assert_array_equal(filled((3, 4), type="constant", value=2.5), 2.5)


def test_uniform():
    x = filled((200, 50), type="uniform", min=-2, max=3)
    assert x.min() >= -2 and x.max() <= 3
    assert x.mean() == pytest.approx(0.5, abs=0.05)


def test_gaussian_and_sparse():
    x = filled((200, 100), type="gaussian", mean=1, std=2)
    assert x.mean() == pytest.approx(1, abs=0.05) and x.std() == pytest.approx(2, rel=0.03)
    sparse = filled((100, 400), type="gaussian", std=1, sparse=10)
    # Each of the 100 outputs keeps about 10 nonzero inputs: keep probability 10/100.
    assert np.mean(sparse != 0) == pytest.approx(0.1, abs=0.01)


def test_positive_unitball():
    x = filled((5, 2, 3), type="positive_unitball")
    assert np.all(x >= 0)
    np.testing.assert_allclose(x.reshape(5, -1).sum(axis=1), 1.0)


@pytest.mark.parametrize("norm, n", [(0, 3 * 4 * 4), (1, 64 * 4 * 4), (2, (3 * 16 + 64 * 16) / 2)])
def test_xavier_scale(norm, n):
    x = filled((64, 3, 4, 4), type="xavier", variance_norm=norm)
    bound = math.sqrt(3.0 / n)
    assert np.abs(x).max() <= bound
    assert np.abs(x).max() > 0.95 * bound


@pytest.mark.parametrize("norm, n", [(0, 50 * 3 * 3), (1, 200 * 3 * 3)])
def test_msra_scale(norm, n):
    x = filled((200, 50, 3, 3), type="msra", variance_norm=norm)
    assert x.mean() == pytest.approx(0, abs=0.01)
    assert x.std() == pytest.approx(math.sqrt(2.0 / n), rel=0.02)


def test_bilinear_upsampling_kernel():
    x = filled((2, 1, 4, 4), type="bilinear")
    # Caffe's kernel for factor 2: f = 2, c = 0.75; weights (1 - |x/f - c|) (1 - |y/f - c|).
    ramp = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(x[0, 0], np.outer(ramp, ramp))
    np.testing.assert_allclose(x[1, 0], x[0, 0])


def test_unknown_filler_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean 'xavier'"):
        filled((2, 2), type="xavir")
