"""The Convolution layer's direct engine (conv_direct.py / conv_direct.c: float32 vector
kernels on the padded image) against direct loops, float64 and numerical gradients, with each
instruction set this CPU has."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caffelite.blob import Blob
from caffelite.layers import conv_direct, convolution, cpu_kernels, cpu_threads
from caffelite.layers.im2col import ARENA, Geometry
from layer_testing import check_gradient, run
from test_convolution import (FILLERS, check_float32_close_to_float64, check_one_parameter_frozen,
                              cp, layer_expected)

CASES = [
    ((2, 3, 12, 12), {"num_output": 5, "kernel_size": 5, "pad": 2}),     # a short channel block
    ((3, 1, 14, 14), {"num_output": 7, "kernel_size": 5}),               # LeNet's conv1, smaller
    ((2, 2, 9, 7), {"num_output": 4, "kernel_size": 3, "pad": 1, "bias_term": False}),
    ((2, 3, 8, 11), {"num_output": 6, "kernel_h": 3, "kernel_w": 2, "pad_h": 1, "pad_w": 0}),
    ((1, 2, 20, 5), {"num_output": 3, "kernel_h": 1, "kernel_w": 5, "pad_h": 0, "pad_w": 4}),   # pad = k - 1
]


#: The vector widths this CPU runs (none: the direct engine is never chosen here).
WIDTHS = [bits for bits in (512, 256) if bits <= cpu_kernels.vector_bits()]


@pytest.fixture(params=WIDTHS or [0])
def direct(request, monkeypatch):
    """The direct engine forced, with each vector width this CPU runs, in a part of the items
    per core."""
    if request.param == 0:
        pytest.skip("this CPU has neither AVX2 nor AVX-512 (or the kernels are not built): "
                    "the direct engine is never chosen here")
    assert cpu_kernels.LIB.use_vector_bits(request.param) == request.param
    monkeypatch.setattr(convolution, "FORCE_ENGINE", "direct")
    monkeypatch.setattr(cpu_threads, "MIN_PART_ELEMENTS", 1)
    yield request.param
    cpu_kernels.LIB.use_vector_bits(1 << 10)   # (back to the widest)


@pytest.mark.parametrize("shape,params", CASES)
def test_matches_float64_loops(shape, params, direct):
    x = np.random.default_rng(0).standard_normal(shape)
    layer, _, _, (y,) = run("Convolution", [x.astype(np.float32)], dtype=np.float32,
                            convolution_param=cp({**params, **FILLERS}))
    assert layer.cpu_engine is layer.direct is not None
    np.testing.assert_allclose(y, layer_expected(layer, x, params), rtol=1e-5, atol=1e-5)
    check_float32_close_to_float64(x, cp({**params, **FILLERS}), seed=1)


@pytest.mark.parametrize("shape,params", CASES[:3])
def test_numerical_gradient(shape, params, direct):
    """Central differences in float32: the layer is linear in x, W and b, so a large step
    is exact but for rounding."""
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    layer, bottom, top, _ = run("Convolution", [x], dtype=np.float32,
                                convolution_param=cp({**params, **FILLERS}))
    assert layer.direct is not None
    assert len(layer.direct.parts) == min(cpu_threads.cpu_threads(), shape[0])   # (one per core)
    assert check_gradient(layer, bottom, top, step=0.25, rtol=1e-3, atol=1e-3, max_checks=40) > 0


def _sums(x, w, pad):
    """The convolution as one einsum over the padded input's windows (float64)."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2))
    windows = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], axis=(2, 3))
    return np.einsum("nchwij,mcij->nmhw", windows, w.astype(np.float64))


@st.composite
def geometries(draw):
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    ph, pw = draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1))
    h = draw(st.integers(max(1, kh - 2 * ph), 20))
    w = draw(st.integers(max(1, kw - 2 * pw), 40))
    return (draw(st.integers(1, 3)), draw(st.integers(1, 5)), h, w), draw(st.integers(1, 9)), \
        (kh, kw), (ph, pw)


@settings(max_examples=30, deadline=None)
@given(geometries())
def test_any_geometry(case):
    """Forward, dx and the weight and bias gradients of the kernels on random geometries (maps
    of one block or several, short channel and tap blocks), with each vector width, against
    float64 sums."""
    if not WIDTHS:
        pytest.skip("no AVX2 or AVX-512 here (or the kernels are not built)")
    shape, m, kernel, pad = case
    rs = np.random.default_rng(sum(shape) + m)
    x = rs.standard_normal(shape).astype(np.float32)
    w = rs.standard_normal((m, shape[1]) + kernel).astype(np.float32)
    b = rs.standard_normal(m).astype(np.float32)
    dy = rs.standard_normal(_sums(x, w, pad).shape).astype(np.float32)
    probe = rs.standard_normal(x.shape)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2))
    windows = np.lib.stride_tricks.sliding_window_view(xp, kernel, axis=(2, 3))
    engine = conv_direct.DirectConvolution(shape[0], shape[1], m, shape[2:],
                                           Geometry(kernel, (1, 1), pad, (1, 1)))
    try:
        for bits in WIDTHS:
            cpu_kernels.LIB.use_vector_bits(bits)
            y, dx = np.empty(dy.shape, np.float32), np.empty_like(x)
            weight, bias = Blob(w.shape, np.float32), Blob(b.shape, np.float32)
            with ARENA.scope():
                engine.forward(x, w, b, y)
                engine.backward(x, w, dy, dx, weight, bias)
            np.testing.assert_allclose(y, _sums(x, w, pad) + b[:, None, None], rtol=1e-4, atol=1e-4)
            # dx is the forward's adjoint: <conv(probe), dy> = <probe, dx> for any probe.
            np.testing.assert_allclose((probe * dx).sum(), (_sums(probe, w, pad) * dy).sum(),
                                       rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose(weight.cpu_diff(), np.einsum("nchwij,nmhw->mcij", windows, dy),
                                       rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose(bias.cpu_diff(), dy.sum(axis=(0, 2, 3)), rtol=1e-4, atol=1e-3)
    finally:
        cpu_kernels.LIB.use_vector_bits(1 << 10)   # (back to the widest)


def test_two_bottoms(direct):
    params = {"num_output": 3, "kernel_size": 3, "pad": 1}
    rs = np.random.default_rng(3)
    a, b = (rs.standard_normal((2, 2, 8, 8)).astype(np.float32) for _ in range(2))
    layer, bottom, top, (ya, yb) = run("Convolution", [a, b], num_top=2, dtype=np.float32,
                                       convolution_param=cp({**params, **FILLERS}))
    np.testing.assert_allclose(ya, layer_expected(layer, a, params), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(yb, layer_expected(layer, b, params), rtol=1e-5, atol=1e-5)
    assert check_gradient(layer, bottom, top, step=0.25, rtol=1e-3, atol=1e-3, max_checks=30) > 0


@pytest.mark.parametrize("frozen", [0, 1])
def test_weight_or_bias_gradient_alone(frozen, direct):
    x = np.random.default_rng(4).standard_normal((2, 3, 9, 9)).astype(np.float32)
    layer, _, _ = check_one_parameter_frozen(x, frozen, seed=5, rtol=1e-5, dtype=np.float32)
    assert layer.direct is not None
    assert not layer.blobs[frozen].cpu_diff().any()


def test_wrong_arrays_are_refused(direct):
    """The kernels' wrappers refuse what C would read out of bounds or misread."""
    engine = conv_direct.DirectConvolution(2, 3, 4, (8, 8), Geometry((3, 3), (1, 1), (1, 1), (1, 1)))
    w = np.zeros((4, 3, 3, 3), np.float32)
    good_x, good_y = np.zeros((2, 3, 8, 8), np.float32), np.zeros((2, 4, 8, 8), np.float32)
    for x, y in ((good_x.astype(np.float64), good_y), (good_x[:1], good_y[:1]),
                 (good_x, good_y[:, :, :, :7]), (good_x[:, :, :, ::-1], good_y)):
        with pytest.raises(ValueError, match="direct_forward"), ARENA.scope():
            engine.forward(x, w, None, y)
    for weight, bias in ((w[:3], None), (w, np.zeros(3, np.float32))):   # too few for C to read
        with pytest.raises(ValueError, match="direct_forward"), ARENA.scope():
            engine.forward(good_x, weight, bias, good_y)
    plan = engine.forward_plan
    dw, db = np.zeros((4, 27), np.float32), np.zeros(4, np.float32)
    small = np.zeros(plan.scratch(4) - 1, np.float32)   # the weight gradient needs M = 4 wide rows
    for args in ((good_x, good_y, plan.taps, plan.shape, dw, db, small, (0, 2)),
                 (good_x, good_y, plan.taps, plan.shape, dw[:3], db, small, (0, 2)),
                 (good_x, good_y, plan.taps[:-1], plan.shape, dw, db, np.zeros(10 ** 5, np.float32),
                  (0, 2)),
                 (good_x, good_y, plan.taps, plan.shape, dw, db, np.zeros(10 ** 5, np.float32),
                  (1, 3))):
        with pytest.raises(ValueError, match="direct_weight_grad"):
            cpu_kernels.direct_weight_grad(*args)


def test_engine_choice():
    """Stride-1 float32 2-D layers whose maps waste little of the kernels' wide rows: CIFAR-10's
    and LeNet's conv1; not LeNet's conv2 (8x8 outputs), strides, dilations, groups, 1x1
    kernels, float64, or a pad as large as the kernel."""
    def geometry(k, s=1, p=0, d=1):
        return Geometry((k, k), (s, s), (p, p), (d, d))
    assert conv_direct.worth_it((32, 32), geometry(5, p=2))      # CIFAR-10 conv1
    assert conv_direct.worth_it((28, 28), geometry(5))           # LeNet conv1
    assert not conv_direct.worth_it((12, 12), geometry(5))      # LeNet conv2
    if cpu_kernels.vector_bits():
        assert conv_direct.available(np.float32, geometry(5, p=2), 1)
    for dtype, g, group in ((np.float64, geometry(5), 1), (np.float32, geometry(5, s=2), 1),
                            (np.float32, geometry(3, d=2), 1), (np.float32, geometry(5), 2),
                            (np.float32, geometry(1), 1), (np.float32, geometry(3, p=3), 1)):
        assert not conv_direct.available(dtype, g, group)
    x = np.zeros((4, 3, 32, 32), np.float32)
    layer, *_ = run("Convolution", [x], dtype=np.float32,
                    convolution_param=cp({"num_output": 32, "kernel_size": 5, "pad": 2, **FILLERS}))
    assert (layer.direct is not None) == (cpu_kernels.vector_bits() > 0)
    assert layer.cpu_engine is (layer.direct or layer.compiled or layer.flat)
