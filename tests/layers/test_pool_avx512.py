"""Pooling's AVX-512 kernels (pool_avx512.c: MAX forward, AVE forward and backward) against
Caffe's loops, the NumPy passes and numerical gradients, in float32."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from caffelite.layers import cpu_kernels
from caffelite.layers.base import TRAIN
from layer_testing import check_gradient, run
from test_pooling import CASES, out_size, pool_ref, pp

#: Rows wider than one vector of 16 outputs, with stride 2 and a pad.
WIDE = ((2, 3, 35, 37), (3, 3), (2, 2), (1, 1), True)
#: A horizontal stride of 3: MAX gathers its pixels, AVE keeps the NumPy passes.
STRIDE_3 = ((2, 2, 9, 40), (2, 4), (1, 3), (0, 1), True)


@pytest.fixture
def vectors():
    """The AVX-512 kernels, which run on float32 only."""
    if cpu_kernels.vector_bits() != 512:
        pytest.skip("no AVX-512 on this CPU (or the kernels are not built): the NumPy passes "
                    "run, and test_pooling.py covers them")


def _pool_float32(x, method, params, phase=TRAIN):
    return run("Pooling", [x.astype(np.float32)], num_top=2 if method == "MAX" else 1,
               dtype=np.float32, phase=phase, pooling_param={"pool": method, **params})


def _max_float32(x, params, phase=TRAIN):
    return _pool_float32(x, "MAX", params, phase)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("shape,k,s,p,ceil_mode", CASES + [WIDE, STRIDE_3])
def test_matches_caffe_loops_and_numpy_passes(method, shape, k, s, p, ceil_mode, vectors, monkeypatch):
    """Top (and MAX's mask) as Caffe's loops; top and gradient as the NumPy passes (AVE's
    forward bit for bit: the same sums in the same order and the same division)."""
    x = np.random.default_rng(13).standard_normal(shape).astype(np.float32)
    params = pp(k, s, p, round_mode="CEIL" if ceil_mode else "FLOOR")
    layer, bottom, top, outs = _pool_float32(x, method, params)
    assert layer.vectors == (method == "MAX" or s[1] <= 2) and not (layer.vectors and layer.phased)
    expected, expected_mask = pool_ref(x.astype(np.float64), k, s, p, method, ceil_mode)
    np.testing.assert_allclose(outs[0], expected, rtol=1e-6, atol=1e-6)
    if method == "MAX":
        np.testing.assert_array_equal(outs[0], expected.astype(np.float32))
        np.testing.assert_array_equal(outs[1], expected_mask)
    dy = np.random.default_rng(14).standard_normal(outs[0].shape).astype(np.float32)
    top[0].set_diff(dy)
    layer.backward(top, [True], bottom)
    monkeypatch.setattr(cpu_kernels, "LIB", None)
    numpy_layer, numpy_bottom, numpy_top, numpy_outs = _pool_float32(x, method, params)
    assert not numpy_layer.vectors
    np.testing.assert_array_equal(outs[0], numpy_outs[0])
    numpy_top[0].set_diff(dy)
    numpy_layer.backward(numpy_top, [True], numpy_bottom)
    # (overlapping windows: the two backward passes add in different orders)
    np.testing.assert_allclose(bottom[0].cpu_diff(), numpy_bottom[0].cpu_diff(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,k,s,p,ceil_mode", CASES[:5] + [WIDE])
def test_ave_numerical_gradient(shape, k, s, p, ceil_mode, vectors):
    """AVE is linear: central differences with a large float32 step are exact but for rounding."""
    x = np.random.default_rng(15).standard_normal(shape).astype(np.float32)
    layer, bottom, top, _ = _pool_float32(x, "AVE", pp(k, s, p, round_mode="CEIL" if ceil_mode
                                                         else "FLOOR"))
    assert layer.vectors
    assert check_gradient(layer, bottom, top, step=0.25, rtol=1e-3, atol=1e-4, max_checks=60) > 0


def test_vectors_ties_padding_and_recompute(vectors):
    """The first maximum in window order wins; a window of nothing but -inf keeps offset 0 (in
    the padding: its gradient is dropped); a TEST forward's argmax serves backward too."""
    x = np.array([[[[1.0, 3.0, 3.0],
                    [3.0, 0.0, 2.0],
                    [3.0, 1.0, 3.0]]]], np.float32)
    layer, bottom, top, (y, mask) = _max_float32(x, {"kernel_size": 2, "stride": 1}, phase=1)
    assert layer.vectors
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


@st.composite
def geometries(draw):
    k = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    s = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    p = draw(st.integers(0, k[0] - 1)), draw(st.integers(0, k[1] - 1))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)),
             draw(st.integers(k[0], 20)), draw(st.integers(k[1], 40)))
    ceil_mode = draw(st.booleans())
    # Every window reaches into the image (CEIL with a kernel below the stride may add one past
    # it: Caffe gives that -FLT_MAX and mask -1, or 0 / 0 for AVE, and caffelite -inf).
    assume(all((out_size(size, kk, ss, pp_, ceil_mode) - 1) * ss - pp_ < size
               for size, kk, ss, pp_ in zip(shape[2:], k, s, p)))
    return shape, k, s, p, ceil_mode, draw(st.sampled_from(["MAX", "AVE"]))


@settings(max_examples=40, deadline=None)
@given(geometries())
def test_any_geometry(case):
    """Random windows, strides (AVE: the NumPy passes for horizontal strides above 2), pads and
    rounding against Caffe's loops; AVE's gradient as the forward's adjoint."""
    if cpu_kernels.vector_bits() != 512:
        pytest.skip("no AVX-512 on this CPU (or the kernels are not built)")
    shape, k, s, p, ceil_mode, method = case
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    layer, bottom, top, outs = _pool_float32(x, method, pp(k, s, p, round_mode="CEIL" if ceil_mode
                                                           else "FLOOR"))
    expected, mask = pool_ref(x.astype(np.float64), k, s, p, method, ceil_mode)
    np.testing.assert_allclose(outs[0], expected, rtol=1e-5, atol=1e-6)
    if method == "MAX":
        np.testing.assert_array_equal(outs[1], mask)
        return
    # AVE's backward is its forward's adjoint: <ave(probe), dy> = <probe, dx> for any probe.
    dy = np.random.default_rng(1).standard_normal(outs[0].shape).astype(np.float32)
    top[0].set_diff(dy)
    layer.backward(top, [True], bottom)
    probe = np.random.default_rng(2).standard_normal(shape)
    np.testing.assert_allclose((probe * bottom[0].cpu_diff()).sum(),
                               (pool_ref(probe, k, s, p, "AVE", ceil_mode)[0] * dy).sum(),
                               rtol=1e-4, atol=1e-4)
