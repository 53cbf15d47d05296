"""The Convolution layer's DFT engine (conv_dft.py) against direct loops, with gradients."""
import numpy as np
import pytest

from caffelite.layers import conv_dft, convolution
from layer_testing import check_gradient, run
from test_convolution import (FILLERS, check_float32_close_to_float64, check_one_parameter_frozen,
                              conv_ref, cp)

pytestmark = pytest.mark.usefixtures("cpu_parts")   # the frequencies in one part and in three

CASES = [
    ((3, 4, 7, 6), {"num_output": 6, "kernel_size": 3, "pad": 1}),
    ((2, 4, 8, 9), {"num_output": 4, "kernel_size": 5, "pad": 2, "group": 2}),
    ((2, 3, 6, 5), {"num_output": 2, "kernel_h": 3, "kernel_w": 2, "pad_h": 0, "pad_w": 3}),
    ((2, 2, 5, 5), {"num_output": 3, "kernel_size": 5, "bias_term": False}),
    ((1, 2, 9, 4), {"num_output": 2, "kernel_size": 2, "pad": 3}),
]


@pytest.fixture
def dft(monkeypatch):
    monkeypatch.setattr(convolution, "FORCE_ENGINE", "dft")


@pytest.mark.parametrize("shape,params", CASES)
def test_matches_loops_and_gradient(shape, params, dft):
    x = np.random.default_rng(0).standard_normal(shape)
    layer, bottom, top, (y,) = run("Convolution", [x], convolution_param=cp({**params, **FILLERS}))
    assert layer.dft is not None
    w = layer.blobs[0].cpu_data()
    b = layer.blobs[1].cpu_data() if params.get("bias_term", True) else None
    pad = (params.get("pad_h", params.get("pad", 0)), params.get("pad_w", params.get("pad", 0)))
    expected = conv_ref(x, w, b, (1, 1), pad, (1, 1), params.get("group", 1))
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)
    assert check_gradient(layer, bottom, top, max_checks=60) > 0


def test_float32_close_to_float64(dft):
    x = np.random.default_rng(1).standard_normal((4, 6, 12, 12))
    check_float32_close_to_float64(x, cp({"num_output": 8, "kernel_size": 5, "pad": 2, **FILLERS}), seed=2)


def test_stride_and_dilation_keep_gemm(dft):
    x = np.zeros((2, 3, 9, 9))
    for extra in ({"stride": 2}, {"dilation": 2}):
        layer, *_ = run("Convolution", [x], convolution_param=cp({"num_output": 2, "kernel_size": 3,
                                                                   **extra, **FILLERS}))
        assert layer.dft is None


def test_engine_choice():
    """The model picks the DFT for CIFAR-10's 5x5 layers, im2col for its 3-channel first layer."""
    assert conv_dft.worth_it(100, 32, 32, 1, (16, 16), (5, 5), (16, 16), (2, 2))
    assert not conv_dft.worth_it(100, 3, 32, 1, (32, 32), (5, 5), (32, 32), (2, 2))
    # AlexNet's conv3: batch 10 and 256 x 384 channels make the kernel spectra too big.
    assert not conv_dft.worth_it(10, 256, 384, 1, (13, 13), (3, 3), (13, 13), (1, 1))


@pytest.mark.parametrize("frozen", [0, 1])
def test_weight_or_bias_gradient_alone(frozen, dft):
    """The bias gradient comes from the dy spectrum's frequency (0, 0), or from a sum over dy
    when nothing else needs the spectrum."""
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 6))
    layer, reference, dy = check_one_parameter_frozen(x, frozen, seed=4, rtol=1e-10)
    np.testing.assert_allclose(reference.blobs[1].cpu_diff(), dy.sum(axis=(0, 2, 3)), rtol=1e-10)
    assert not layer.blobs[frozen].cpu_diff().any()


def test_strided_output_views(dft):
    """The engine writes a top that is not contiguous (a view) as well as a contiguous one."""
    x = np.random.default_rng(5).standard_normal((2, 3, 6, 6))
    layer, bottom, top, (y,) = run("Convolution", [x], convolution_param=cp({
        "num_output": 4, "kernel_size": 3, "pad": 1, **FILLERS}))
    w, b = layer.blobs[0].cpu_data(), layer.blobs[1].cpu_data()
    view = np.zeros((4, 2, 6, 6)).transpose(1, 0, 2, 3)
    layer.dft.forward(x, w, b, view)
    np.testing.assert_allclose(view, y, rtol=1e-12, atol=1e-12)
