"""SPP: pyramid levels of Caffe pooling, flattened and concatenated."""
import math

import numpy as np
import pytest

from caffelite.errors import ConfigError
from caffelite.layers.base import TEST, TRAIN
from layer_testing import check_gradient, forward, run


def pool_ref(plane, kernel, pad, method):
    """Caffe pooling of one (H, W) plane with stride = kernel, CEIL rounding."""
    size = plane.shape
    outs = []
    for n, k, p in zip(size, kernel, pad):
        o = math.ceil((n + 2 * p - k) / k) + 1
        if p > 0 and (o - 1) * k >= n + p:
            o -= 1
        outs.append(o)
    out = np.zeros(outs)
    for oh in range(outs[0]):
        for ow in range(outs[1]):
            hs, ws = oh * kernel[0] - pad[0], ow * kernel[1] - pad[1]
            he, we = min(hs + kernel[0], size[0] + pad[0]), min(ws + kernel[1], size[1] + pad[1])
            area = (he - hs) * (we - ws)
            window = plane[max(hs, 0):min(he, size[0]), max(ws, 0):min(we, size[1])]
            out[oh, ow] = window.max() if method == "MAX" else window.sum() / area
    return out


def spp_ref(x, height, method):
    n, c, h, w = x.shape
    levels = []
    for level in range(height):
        bins = 2 ** level
        kernel = (math.ceil(h / bins), math.ceil(w / bins))
        pad = ((kernel[0] * bins - h + 1) // 2, (kernel[1] * bins - w + 1) // 2)
        pooled = np.stack([np.stack([pool_ref(x[i, j], kernel, pad, method) for j in range(c)])
                           for i in range(n)])
        levels.append(pooled)
    if height == 1:
        return levels[0]
    return np.concatenate([p.reshape(n, -1) for p in levels], axis=1)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("height,shape", [(1, (2, 3, 5, 6)), (2, (2, 2, 6, 6)), (3, (2, 2, 7, 9))])
@pytest.mark.parametrize("phase", [TEST, TRAIN])
def test_spp(method, height, shape, phase):
    x = np.random.default_rng(0).standard_normal(shape)
    layer, bottom, top, (y,) = run("SPP", [x], phase=phase,
                                   spp_param={"pyramid_height": height, "pool": method})
    want = spp_ref(x, height, method)
    assert y.shape == want.shape
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    assert check_gradient(layer, bottom, top, max_checks=60) > 0


def test_spp_output_length_is_fixed_across_input_sizes():
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8))
    layer, bottom, top, (y,) = run("SPP", [x], spp_param={"pyramid_height": 3})
    assert y.shape == (2, 3 * (1 + 4 + 16))
    x2 = np.random.default_rng(2).standard_normal((2, 3, 12, 10))
    bottom[0].reshape(x2.shape)
    bottom[0].set_data(x2)
    (y2,) = forward(layer, bottom, top)
    assert y2.shape == y.shape
    np.testing.assert_allclose(y2, spp_ref(x2, 3, "MAX"), rtol=1e-12)


def test_spp_too_small_input_names_the_level():
    with pytest.raises(ConfigError, match="level 2"):
        run("SPP", [np.zeros((1, 1, 5, 6))], spp_param={"pyramid_height": 3})


def test_spp_needs_a_pyramid_height():
    with pytest.raises(ConfigError, match="pyramid_height"):
        run("SPP", [np.zeros((1, 1, 4, 4))])
