"""The Convolution layer's flat engine (conv_flat.py) against direct loops, with gradients."""
import numpy as np
import pytest

from caffelite.layers import conv_flat, convolution, cpu_kernels, im2col
from caffelite.layers.im2col import Geometry
from layer_testing import check_gradient, run
from test_convolution import (FILLERS, check_engine_matches_loops, check_float32_close_to_float64,
                              ENGINE_CASES, check_one_parameter_frozen, cp, layer_expected)

CASES = ENGINE_CASES + [
    ((2, 2, 7), {"num_output": 3, "kernel_size": 3, "pad": 1}),                 # 1-D
    ((1, 2, 4, 3, 4), {"num_output": 2, "kernel_size": 2, "pad": [1, 0, 1]}),   # 3-D
]


@pytest.fixture
def flat(monkeypatch):
    monkeypatch.setattr(convolution, "FORCE_ENGINE", "flat")


@pytest.mark.parametrize("shape,params", CASES)
def test_matches_loops_and_gradient(shape, params, flat):
    check_engine_matches_loops(shape, params, "flat")


def test_chunks_and_grouped_weight_gradient(flat, monkeypatch):
    """Several batch chunks (the last one shorter) and several items per weight-gradient GEMM."""
    monkeypatch.setattr(conv_flat, "CHUNK_BYTES", 1)
    monkeypatch.setattr(conv_flat, "DW_PIXELS", 100)
    monkeypatch.setattr(conv_flat, "DW_SMALL", 10 ** 6)
    x = np.random.default_rng(1).standard_normal((5, 2, 6, 6))
    params = {"num_output": 3, "kernel_size": 3, "pad": 1}
    layer, bottom, top, (y,) = run("Convolution", [x], convolution_param=cp({**params, **FILLERS}))
    assert layer.flat.chunk == 1
    np.testing.assert_allclose(y, layer_expected(layer, x, params), rtol=1e-10, atol=1e-10)
    assert check_gradient(layer, bottom, top, max_checks=60) > 0
    monkeypatch.setattr(conv_flat, "CHUNK_BYTES", 3 * layer.flat.rows * layer.flat.pixels * 8)
    layer, bottom, top, (y,) = run("Convolution", [x], convolution_param=cp({**params, **FILLERS}))
    assert layer.flat.chunk == 3   # chunks of 3 items (dW: a stack of 3 GEMMs) and 2 (one GEMM)
    assert check_gradient(layer, bottom, top, max_checks=60) > 0


def test_columns_not_kept(flat, monkeypatch):
    """Backward copies the columns again where forward's are gone: several column buffers
    per batch, or several bottoms (the buffer holds the last one's)."""
    rs = np.random.default_rng(6)
    params = {"num_output": 3, "kernel_size": 3, "pad": 1}
    monkeypatch.setattr(im2col, "MAX_COL_ELEMENTS", 2 * 19 * 48)   # 2 items (19 rows, 6 x 8 grid)
    x = rs.standard_normal((5, 2, 6, 6))
    layer, bottom, top, (y,) = run("Convolution", [x], convolution_param=cp({**params, **FILLERS}))
    assert layer.flat.batch == 2 and not layer.flat.x_ready
    np.testing.assert_allclose(y, layer_expected(layer, x, params), rtol=1e-10, atol=1e-10)
    assert check_gradient(layer, bottom, top, max_checks=60) > 0
    monkeypatch.undo()
    monkeypatch.setattr(convolution, "FORCE_ENGINE", "flat")
    a, b = rs.standard_normal((2, 2, 6, 6)), rs.standard_normal((2, 2, 6, 6))
    layer, bottom, top, (ya, yb) = run("Convolution", [a, b], num_top=2,
                                       convolution_param=cp({**params, **FILLERS}))
    np.testing.assert_allclose(yb, layer_expected(layer, b, params), rtol=1e-10, atol=1e-10)
    assert not layer.flat.x_ready
    assert check_gradient(layer, bottom, top, max_checks=40) > 0


@pytest.mark.parametrize("frozen", [0, 1])
def test_weight_or_bias_gradient_alone(frozen, flat):
    """With one of the parameters frozen the other's gradient is still right (the bias
    gradient then comes from a sum over dy instead of the GEMM's row of ones)."""
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 5))
    layer, _, _ = check_one_parameter_frozen(x, frozen, seed=3, rtol=1e-12)
    assert not layer.blobs[frozen].cpu_diff().any()


def test_float32_close_to_float64(flat):
    x = np.random.default_rng(4).standard_normal((4, 3, 10, 10))
    check_float32_close_to_float64(x, cp({"num_output": 5, "kernel_size": 5, "pad": 2, **FILLERS}), seed=5)


def test_strided_and_deconvolution_keep_im2col(flat):
    x = np.zeros((2, 3, 9, 9))
    layer, *_ = run("Convolution", [x], convolution_param=cp({"num_output": 2, "kernel_size": 3,
                                                               "stride": 2, **FILLERS}))
    assert layer.flat is None
    layer, *_ = run("Deconvolution", [x], convolution_param=cp({"num_output": 2, "kernel_size": 3,
                                                                 **FILLERS}))
    assert layer.flat is None


def test_engine_choice(monkeypatch):
    """Chosen, without the compiled kernels, for LeNet's and CIFAR-10's first layers; not where
    the GEMM dominates (many channels) or much of it would be thrown away (narrow maps)."""
    monkeypatch.setattr(cpu_kernels, "LIB", None)
    def geometry(k, p):
        return Geometry((k, k), (1, 1), (p, p), (1, 1))
    assert conv_flat.worth_it(1, 1, (28, 28), geometry(5, 0))          # LeNet conv1
    assert conv_flat.worth_it(3, 1, (32, 32), geometry(5, 2))          # CIFAR-10 conv1
    assert not conv_flat.worth_it(32, 1, (8, 8), geometry(5, 2))       # CIFAR-10 conv3
    assert not conv_flat.worth_it(256, 1, (13, 13), geometry(3, 1))    # AlexNet conv3
    x = np.zeros((4, 3, 32, 32))
    layer, *_ = run("Convolution", [x], convolution_param=cp({"num_output": 32, "kernel_size": 5,
                                                               "pad": 2, **FILLERS}))
    assert layer.flat is not None and layer.dft is None
