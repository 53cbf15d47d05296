"""The Convolution layer's columns engine (conv_columns.py, compiled im2col) against direct
loops, with gradients."""
import numpy as np
import pytest

from caffelite.layers import conv_columns, convolution, cpu_kernels
from caffelite.layers.im2col import Geometry
from layer_testing import check_gradient, run
from test_convolution import (FILLERS, check_engine_matches_loops, check_float32_close_to_float64,
                              ENGINE_CASES, check_one_parameter_frozen, cp, layer_expected)

CASES = ENGINE_CASES + [
    ((2, 3, 11, 9), {"num_output": 2, "kernel_size": 3, "stride": 2, "pad": 2}),
    ((2, 1, 12, 13), {"num_output": 3, "kernel_h": 5, "kernel_w": 3, "stride_h": 3, "stride_w": 2,
                      "pad_h": 1, "pad_w": 2, "dilation": 2}),
    ((1, 2, 3, 3), {"num_output": 2, "kernel_size": 3, "pad": 4, "stride": 3}),   # mostly padding
]


@pytest.fixture
def columns(monkeypatch):
    assert cpu_kernels.LIB is not None, "the CPU kernels are not built: pip install -e ."
    monkeypatch.setattr(convolution, "FORCE_ENGINE", "columns")


@pytest.mark.parametrize("shape,params", CASES)
def test_matches_loops_and_gradient(shape, params, columns):
    check_engine_matches_loops(shape, params, "compiled")


def test_chunks(columns, monkeypatch):
    """Several batch chunks, the last one shorter, and two bottoms (nothing kept between)."""
    params = {"num_output": 3, "kernel_size": 3, "pad": 1}
    rs = np.random.default_rng(1)
    x = rs.standard_normal((5, 2, 6, 6))
    monkeypatch.setattr(conv_columns, "CHUNK_BYTES", 2 * 18 * 36 * 8)   # 2 items' columns
    layer, bottom, top, (y,) = run("Convolution", [x], convolution_param=cp({**params, **FILLERS}))
    assert layer.compiled.chunk == 2
    np.testing.assert_allclose(y, layer_expected(layer, x, params), rtol=1e-10, atol=1e-10)
    assert check_gradient(layer, bottom, top, max_checks=60) > 0
    a, b = rs.standard_normal((2, 2, 6, 6)), rs.standard_normal((2, 2, 6, 6))
    layer, bottom, top, (ya, yb) = run("Convolution", [a, b], num_top=2,
                                       convolution_param=cp({**params, **FILLERS}))
    np.testing.assert_allclose(yb, layer_expected(layer, b, params), rtol=1e-10, atol=1e-10)
    assert check_gradient(layer, bottom, top, max_checks=40) > 0


@pytest.mark.parametrize("frozen", [0, 1])
def test_weight_or_bias_gradient_alone(frozen, columns):
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 5))
    layer, _, _ = check_one_parameter_frozen(x, frozen, seed=3, rtol=1e-12)
    assert layer.compiled is not None
    assert not layer.blobs[frozen].cpu_diff().any()


def test_float32_close_to_float64(columns):
    x = np.random.default_rng(4).standard_normal((4, 3, 10, 10))
    check_float32_close_to_float64(x, cp({"num_output": 5, "kernel_size": 5, "pad": 2, **FILLERS}), seed=5)


def test_engine_choice():
    """Chosen for outputs of 256 pixels or more, any stride; not for small maps, 1-D or 3-D,
    pointwise kernels, float16 or without the compiled kernels."""
    def geometry(k, s=1, p=0):
        return Geometry((k, k), (s, s), (p, p), (1, 1))
    assert conv_columns.worth_it((32, 32))         # CIFAR-10 conv1
    assert conv_columns.worth_it((55, 55))         # AlexNet conv1
    assert not conv_columns.worth_it((13, 13))     # AlexNet conv3
    assert conv_columns.available(np.float32, geometry(5))
    assert not conv_columns.available(np.float16, geometry(5))
    assert not conv_columns.available(np.float32, Geometry((3,), (1,), (0,), (1,)))
    x = np.zeros((4, 3, 32, 32))
    layer, *_ = run("Convolution", [x], convolution_param=cp({"num_output": 32, "kernel_size": 5,
                                                               "pad": 2, **FILLERS}))
    assert layer.compiled is not None and layer.dft is None and layer.flat is None
    layer, *_ = run("Convolution", [x], convolution_param=cp({"num_output": 8, "kernel_size": 1,
                                                               **FILLERS}))
    assert layer.cpu_engine is None
