"""The main layers on every device: forward against a NumPy reference on the device (float64),
and forward + backward on the device equal to the CPU's in float32 (``compare_devices``).

The ``device`` fixture runs each test on the CPU and, where CuPy and a GPU are present, on
GPU 0 (skipped cleanly otherwise). The numerical gradient checks stay in the per-layer test
files, on the CPU in float64: a GPU backward that equals the CPU backward is checked by them.
"""
import logging

import numpy as np
import pytest

from caffelite.layers.base import TEST, TRAIN
from layer_testing import compare_devices, make_layer, run, setup, forward


@pytest.fixture
def rs():
    return np.random.default_rng(23)


CONV_FILLERS = {"weight_filler": {"type": "gaussian", "std": 0.3},
                "bias_filler": {"type": "gaussian", "std": 0.2}}


# ---- references (plain loops) ---------------------------------------------------------------
def ref_conv(x, w, b, pad, stride, group):
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    y = np.zeros((n, m, oh, ow))
    per = m // group
    for o in range(m):
        g = o // per
        for i in range(oh):
            for j in range(ow):
                patch = xpad[:, g * cg:(g + 1) * cg, i * stride:i * stride + kh, j * stride:j * stride + kw]
                y[:, o, i, j] = (patch * w[o]).sum(axis=(1, 2, 3)) + (b[o] if b is not None else 0)
    return y


def ref_pool(x, method, k, s):
    """Caffe's pooling without pad: ceil-rounded output, windows clipped at the border."""
    n, c, h, w = x.shape
    oh, ow = -(-(h - k) // s) + 1, -(-(w - k) // s) + 1
    y = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = x[:, :, i * s:min(i * s + k, h), j * s:min(j * s + k, w)]
            y[:, :, i, j] = win.max(axis=(2, 3)) if method == "MAX" else win.mean(axis=(2, 3))
    return y


def ref_lrn_across(x, size, alpha, beta, k):
    c = x.shape[1]
    y = np.empty_like(x)
    for ch in range(c):
        lo, hi = max(0, ch - (size - 1) // 2), min(c, ch + size // 2 + 1)
        scale = k + alpha / size * (x[:, lo:hi] ** 2).sum(axis=1)
        y[:, ch] = x[:, ch] * scale ** -beta
    return y


# ---- Convolution ------------------------------------------------------------------------------
@pytest.mark.parametrize("pad,stride,group", [(0, 1, 1), (1, 2, 2)])
def test_convolution(rs, device, pad, stride, group):
    x = rs.standard_normal((2, 4, 7, 6))
    param = {"num_output": 6, "kernel_size": [3], "pad": [pad], "stride": [stride], "group": group,
             **CONV_FILLERS}
    layer, _, _, (y,) = run("Convolution", [x], convolution_param=param, device=device)
    w, b = (blob.cpu_data() for blob in layer.blobs)
    np.testing.assert_allclose(y, ref_conv(x, w, b, pad, stride, group), rtol=1e-10, atol=1e-12)
    compare_devices("Convolution", [x], device, convolution_param=param)


@pytest.mark.parametrize("engine", ["CAFFE", "CUDNN"])
def test_convolution_engines_agree(rs, device, engine, caplog):
    x = rs.standard_normal((2, 3, 8, 8))
    param = {"num_output": 4, "kernel_size": [3], "pad": [1], "engine": engine, **CONV_FILLERS}
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        compare_devices("Convolution", [x], device, convolution_param=param, rtol=5e-4, atol=5e-5)


# ---- Pooling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling(rs, device, method):
    x = rs.standard_normal((2, 3, 7, 6))
    param = {"pool": method, "kernel_size": 3, "stride": 2}
    _, _, _, (y,) = run("Pooling", [x], pooling_param=param, device=device)
    np.testing.assert_allclose(y, ref_pool(x, method, 3, 2), rtol=1e-12)
    compare_devices("Pooling", [x], device, pooling_param=param)


POOLING_CASES = {
    "max-pad1-stride2-k3-ceil": ({"pool": "MAX", "kernel_size": 3, "stride": 2, "pad": 1}, 1),
    "max-mask": ({"pool": "MAX", "kernel_size": 3, "stride": 2, "pad": 1}, 2),
    "ave-pad": ({"pool": "AVE", "kernel_size": 3, "stride": 2, "pad": 1}, 1),
    "max-floor": ({"pool": "MAX", "kernel_size": 3, "stride": 2, "pad": 1, "round_mode": "FLOOR"}, 1),
    "ave-floor": ({"pool": "AVE", "kernel_size": 2, "stride": 2, "round_mode": "FLOOR"}, 1),
    "global-max": ({"pool": "MAX", "global_pooling": True}, 1),
    "global-max-mask": ({"pool": "MAX", "global_pooling": True}, 2),
    "global-ave": ({"pool": "AVE", "global_pooling": True}, 1),
    "max-nonsquare": ({"pool": "MAX", "kernel_h": 3, "kernel_w": 2, "stride_h": 2, "stride_w": 1}, 1),
    "ave-nonsquare-pad": ({"pool": "AVE", "kernel_h": 3, "kernel_w": 2, "stride_h": 2, "stride_w": 1,
                           "pad_h": 1, "pad_w": 1}, 1),
}


@pytest.mark.parametrize("case", sorted(POOLING_CASES))
@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_pooling_geometries(rs, device, case, phase):
    """Pad, CEIL/FLOOR, global, non-square windows and the mask top; TEST has MAX find its argmax
    again in backward. Rounded inputs give ties (the first maximum in window order wins)."""
    param, num_top = POOLING_CASES[case]
    x = rs.standard_normal((2, 3, 7, 6))
    compare_devices("Pooling", [x], device, num_top=num_top, phase=phase, pooling_param=param)
    compare_devices("Pooling", [np.round(x * 2)], device, num_top=num_top, phase=phase,
                    pooling_param=param)


# ---- InnerProduct -----------------------------------------------------------------------------
def test_inner_product(rs, device):
    x = rs.standard_normal((3, 2, 2, 2))
    param = {"num_output": 5, **CONV_FILLERS}
    layer, _, _, (y,) = run("InnerProduct", [x], inner_product_param=param, device=device)
    w, b = (blob.cpu_data() for blob in layer.blobs)
    np.testing.assert_allclose(y, x.reshape(3, -1) @ w.T + b, rtol=1e-12)
    compare_devices("InnerProduct", [x], device, inner_product_param=param)


# ---- ReLU -------------------------------------------------------------------------------------
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_relu(rs, device, slope):
    x = rs.standard_normal((2, 3, 4))
    _, _, _, (y,) = run("ReLU", [x], relu_param={"negative_slope": slope}, device=device)
    np.testing.assert_array_equal(y, np.where(x > 0, x, float(np.float32(slope)) * x))
    compare_devices("ReLU", [x], device, relu_param={"negative_slope": slope})
    compare_devices("ReLU", [x], device, in_place=True, relu_param={"negative_slope": slope})


# ---- Softmax and SoftmaxWithLoss ----------------------------------------------------------------
def test_softmax(rs, device):
    x = rs.standard_normal((2, 5, 3)) * 3
    _, _, _, (y,) = run("Softmax", [x], device=device)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(y, e / e.sum(axis=1, keepdims=True), rtol=1e-12)
    compare_devices("Softmax", [x], device)


@pytest.mark.parametrize("loss_param", [{}, {"ignore_label": 1}, {"ignore_label": 1, "normalization": "FULL"}])
def test_softmax_with_loss(rs, device, loss_param):
    scores = rs.standard_normal((3, 4, 2, 2)) * 2
    labels = rs.integers(0, 4, size=(3, 1, 2, 2)).astype(float)
    compare_devices("SoftmaxWithLoss", [scores, labels], device, check_bottom=[0], loss_param=loss_param)


# ---- BatchNorm ----------------------------------------------------------------------------------
def test_batch_norm_train(rs, device):
    x = rs.standard_normal((4, 3, 2, 2)) * 2 + 1
    _, _, _, (y,) = run("BatchNorm", [x], phase=TRAIN, device=device)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-6, atol=1e-6)
    compare_devices("BatchNorm", [x], device, phase=TRAIN)
    compare_devices("BatchNorm", [x], device, phase=TRAIN, in_place=True)


@pytest.mark.parametrize("factor", [0.0, 4.0])
def test_batch_norm_global_stats(rs, device, factor):
    x = rs.standard_normal((2, 3, 2, 2))
    layer = make_layer("BatchNorm", phase=TEST, device=device)
    bottom, top = setup(layer, [x])
    mean_sum, var_sum = rs.standard_normal(3), rs.uniform(1, 2, 3)
    for blob, values in zip(layer.blobs, (mean_sum, var_sum, [factor])):
        blob.set_data(np.asarray(values, float))
    (y,) = forward(layer, bottom, top)
    inv = 0.0 if factor == 0 else 1.0 / factor
    mean, var = (mean_sum * inv)[None, :, None, None], (var_sum * inv)[None, :, None, None]
    eps = float(np.float32(1e-5))  # batch_norm_param.eps is a float32 field
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + eps), rtol=1e-10)


# ---- LRN ----------------------------------------------------------------------------------------
def test_lrn_across_channels(rs, device):
    x = rs.standard_normal((2, 6, 3, 3))
    param = {"local_size": 5, "alpha": 0.5, "beta": 0.75, "k": 2.0}
    _, _, _, (y,) = run("LRN", [x], lrn_param=param, device=device)
    np.testing.assert_allclose(y, ref_lrn_across(x, 5, 0.5, 0.75, 2.0), rtol=1e-10)
    compare_devices("LRN", [x], device, lrn_param=param)


def test_lrn_within_channel(rs, device):
    x = rs.standard_normal((2, 2, 5, 5))
    compare_devices("LRN", [x], device, lrn_param={"local_size": 3, "alpha": 0.5, "beta": 0.75,
                                                   "norm_region": "WITHIN_CHANNEL"})


# ---- Eltwise and Concat -------------------------------------------------------------------------
@pytest.mark.parametrize("param", [{"operation": "SUM", "coeff": [0.5, -2.0, 1.0]},
                                   {"operation": "PROD"}, {"operation": "MAX"}])
def test_eltwise(rs, device, param):
    xs = [rs.uniform(0.5, 2.0, (2, 3, 2)) * rs.choice([-1, 1], (2, 3, 2)) for _ in range(3)]
    compare_devices("Eltwise", xs, device, eltwise_param=param)


def test_concat(rs, device):
    xs = [rs.standard_normal((2, c, 3)) for c in (1, 4, 2)]
    _, _, _, (y,) = run("Concat", xs, device=device)
    np.testing.assert_array_equal(y, np.concatenate(xs, axis=1))
    compare_devices("Concat", xs, device)


# ---- Dropout (a different random stream on the GPU: properties, not equality) --------------------
def test_dropout(rs, device):
    x = rs.uniform(0.5, 1.5, (64, 50))
    _, _, _, (y,) = run("Dropout", [x], phase=TEST, device=device, dropout_param={"dropout_ratio": 0.3})
    np.testing.assert_array_equal(y, x)
    layer, bottom, top, (y,) = run("Dropout", [x], phase=TRAIN, device=device,
                                   dropout_param={"dropout_ratio": 0.3})
    kept = y != 0
    scale = 1 / (1 - float(np.float32(0.3)))  # dropout_ratio is a float32 field
    np.testing.assert_allclose(y[kept], x[kept] * scale, rtol=1e-12)
    assert abs(1 - kept.mean() - 0.3) < 0.03
    dy = rs.standard_normal(x.shape)
    top[0].set_diff(dy)
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].cpu_diff(), np.where(kept, dy * scale, 0), rtol=1e-12)
    # The next batch gets another mask; the same seed gives the same masks again.
    (y2,) = forward(layer, bottom, top)
    assert not np.array_equal(y2 != 0, kept)
    again, b2, t2, (z,) = run("Dropout", [x], phase=TRAIN, device=device, dropout_param={"dropout_ratio": 0.3})
    np.testing.assert_array_equal(z, y)


# ---- LRN ACROSS_CHANNELS parameters (the GPU kernel walks channels in chunks of 32) --------------
@pytest.mark.parametrize("shape", [(2, 2, 3, 4), (2, 7, 3, 3), (1, 70, 2, 3)],
                         ids=["C<size", "C=7", "C=70"])
@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("beta", [0.75, 1.0])
@pytest.mark.parametrize("k", [1.0, 2.0])
def test_lrn_across_channels_params(rs, device, shape, size, beta, k):
    x = rs.standard_normal(shape)
    param = {"local_size": size, "alpha": 0.5, "beta": beta, "k": k}
    _, _, _, (y,) = run("LRN", [x], lrn_param=param, device=device)
    np.testing.assert_allclose(y, ref_lrn_across(x, size, 0.5, beta, k), rtol=1e-10)
    compare_devices("LRN", [x], device, lrn_param=param)
