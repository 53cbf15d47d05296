"""MAX pooling's AVX-512 forward (pool_max.c) against Caffe's loops and the NumPy passes."""
import numpy as np
import pytest

from caffelite.layers import cpu_kernels
from caffelite.layers.base import TRAIN
from layer_testing import run
from test_pooling import CASES, pool_ref, pp



@pytest.fixture
def compiled_max():
    """The AVX-512 MAX forward (pool_max.c), which runs on float32 only."""
    if cpu_kernels.vector_bits() != 512:
        pytest.skip("no AVX-512 on this CPU (or the kernels are not built): the NumPy MAX "
                    "forward runs, and the tests above cover it")


def _max_float32(x, params, phase=TRAIN):
    layer, bottom, top, outs = run("Pooling", [x.astype(np.float32)], num_top=2, dtype=np.float32,
                                   phase=phase, pooling_param={"pool": "MAX", **params})
    return layer, bottom, top, outs


@pytest.mark.parametrize("shape,k,s,p,ceil_mode", CASES + [((2, 3, 35, 37), (3, 3), (2, 2), (1, 1), True)])
def test_compiled_max_forward(shape, k, s, p, ceil_mode, compiled_max, monkeypatch):
    """Top, mask and gradient as Caffe's loops and as the NumPy passes, in float32 (rows wider
    than one vector of 16 outputs included)."""
    x = np.random.default_rng(13).standard_normal(shape).astype(np.float32)
    params = pp(k, s, p, round_mode="CEIL" if ceil_mode else "FLOOR")
    layer, bottom, top, (y, mask) = _max_float32(x, params)
    assert layer.compiled_max and not layer.phased
    expected, expected_mask = pool_ref(x.astype(np.float64), k, s, p, "MAX", ceil_mode)
    np.testing.assert_array_equal(y, expected.astype(np.float32))
    np.testing.assert_array_equal(mask, expected_mask)
    dy = np.random.default_rng(14).standard_normal(y.shape).astype(np.float32)
    top[0].set_diff(dy)
    layer.backward(top, [True], bottom)
    monkeypatch.setattr(cpu_kernels, "LIB", None)
    numpy_layer, numpy_bottom, numpy_top, (numpy_y, _) = _max_float32(x, params)
    assert not numpy_layer.compiled_max
    numpy_top[0].set_diff(dy)
    numpy_layer.backward(numpy_top, [True], numpy_bottom)
    # (overlapping windows: the compiled and NumPy backward add in different orders)
    np.testing.assert_allclose(bottom[0].cpu_diff(), numpy_bottom[0].cpu_diff(), rtol=1e-6, atol=1e-6)


def test_compiled_max_ties_padding_and_recompute(compiled_max):
    """The first maximum in window order wins; a window of nothing but -inf keeps offset 0 (in
    the padding: its gradient is dropped); a TEST forward's argmax serves backward too."""
    x = np.array([[[[1.0, 3.0, 3.0],
                    [3.0, 0.0, 2.0],
                    [3.0, 1.0, 3.0]]]], np.float32)
    layer, bottom, top, (y, mask) = _max_float32(x, {"kernel_size": 2, "stride": 1}, phase=1)
    np.testing.assert_array_equal(mask[0, 0], [[1, 1], [3, 8]])
    top[0].set_diff(np.arange(1.0, 5.0).reshape(1, 1, 2, 2))
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].cpu_diff()[0, 0], [[0, 3, 0], [3, 0, 0], [0, 0, 4]])
    x = np.full((1, 1, 5, 5), -np.inf, np.float32)
    layer, bottom, top, (y, mask) = _max_float32(x, {"kernel_size": 3, "stride": 2, "pad": 1})
    assert np.isneginf(y).all() and mask[0, 0, 0, 0] == -6   # (-1, -1): in the padding
    top[0].set_diff(np.ones(y.shape, np.float32))
    layer.backward(top, [True], bottom)
    assert bottom[0].cpu_diff()[0, 0, 1, 1] == 1 and bottom[0].cpu_diff().sum() == 4
