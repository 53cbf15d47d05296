"""ReLU, Sigmoid, TanH, Dropout, PReLU: NumPy references, gradients, in place."""
import numpy as np
import pytest

from caffelite.blob import Blob
from caffelite.errors import ConfigError
from caffelite.layers.base import TEST, TRAIN
from caffelite.io.blob_proto import blob_proto_to_array
from caffelite.proto import pb
from conftest import FIXTURES
from golden import caffe_blob
from layer_testing import check_gradient, make_layer, run

SHAPE = (2, 3, 4, 5)


def data(shape=SHAPE, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape)
    x[np.abs(x) < 1e-3] = 0.5  # keep clear of the kink at 0
    return x


def backward_out_of_place(layer, bottom, top, dy):
    top[0].set_diff(dy)
    for b in layer.blobs:
        b.set_diff(0)
    layer.backward(top, [True], bottom)
    return bottom[0].cpu_diff().copy(), [b.cpu_diff().copy() for b in layer.blobs]


def run_in_place(type, x, dy, **kwargs):
    """Forward and backward with top == bottom; returns (y, dx, param diffs)."""
    layer = make_layer(type, **kwargs)
    blob = Blob(x.shape, layer.dtype, layer.device)
    blob.set_data(x)
    layer.layer_setup([blob], [blob])
    layer.reshape([blob], [blob])
    layer.forward([blob], [blob])
    y = blob.cpu_data().copy()
    blob.set_diff(dy)
    for b in layer.blobs:
        b.set_diff(0)
    layer.backward([blob], [True], [blob])
    return y, blob.cpu_diff().copy(), [b.cpu_diff().copy() for b in layer.blobs]


def assert_in_place_matches(type, x, **kwargs):
    dy = np.random.default_rng(5).standard_normal(x.shape)
    layer, bottom, top, (y,) = run(type, [x], **kwargs)
    dx, param_diffs = backward_out_of_place(layer, bottom, top, dy)
    y2, dx2, param_diffs2 = run_in_place(type, x, dy, **kwargs)
    np.testing.assert_allclose(y2, y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx2, dx, rtol=1e-12, atol=1e-12)
    for a, b in zip(param_diffs2, param_diffs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def caffe_weights(layer_name):
    model = pb.NetParameter()
    model.ParseFromString((FIXTURES / "net" / "fixture_iter_20.caffemodel").read_bytes())
    layer = next(lp for lp in model.layer if lp.name == layer_name)
    return [blob_proto_to_array(b) for b in layer.blobs]


# ---- ReLU --------------------------------------------------------------------
def relu_ref(x, slope):
    y = np.empty_like(x)
    for i, v in enumerate(x.flat):
        y.flat[i] = v if v > 0 else slope * v
    return y


@pytest.mark.parametrize("slope", [0.0, 0.1, 1.0, 2.5, -0.5])
def test_relu_forward_backward(slope):
    x = data()
    layer, bottom, top, (y,) = run("ReLU", [x], relu_param={"negative_slope": slope})
    np.testing.assert_allclose(y, relu_ref(x, float(np.float32(slope))), rtol=1e-12)
    assert check_gradient(layer, bottom, top) > 0


@pytest.mark.parametrize("slope", [0.0, 0.1, 2.5, -0.5])
def test_relu_in_place(slope):
    assert_in_place_matches("ReLU", data(), relu_param={"negative_slope": slope})


def test_relu_keeps_float32():
    x = data().astype(np.float32)
    _, _, top, (y,) = run("ReLU", [x], dtype=np.float32, relu_param={"negative_slope": 0.1})
    assert top[0].dtype == np.float32
    np.testing.assert_allclose(y, relu_ref(x, np.float32(0.1)), rtol=1e-6)


# ---- Sigmoid, TanH -----------------------------------------------------------
def test_sigmoid():
    x = data() * 3
    layer, bottom, top, (y,) = run("Sigmoid", [x])
    np.testing.assert_allclose(y, 1 / (1 + np.exp(-x)), rtol=1e-12)
    assert check_gradient(layer, bottom, top) > 0
    assert_in_place_matches("Sigmoid", x)


def test_sigmoid_saturates_without_overflow():
    x = np.array([[-1000.0, -50.0, 0.0, 50.0, 1000.0]])
    with np.errstate(all="raise"):
        _, _, _, (y,) = run("Sigmoid", [x])
    np.testing.assert_allclose(y, [[0.0, 1 / (1 + np.exp(50.0)), 0.5, 1 / (1 + np.exp(-50.0)), 1.0]],
                               atol=1e-15)


def test_tanh():
    x = data() * 2
    layer, bottom, top, (y,) = run("TanH", [x])
    ref = (np.exp(x) - np.exp(-x)) / (np.exp(x) + np.exp(-x))
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-15)
    assert check_gradient(layer, bottom, top) > 0
    assert_in_place_matches("TanH", x)


def test_tanh_matches_caffe():
    ip_a, tanh = caffe_blob("ip_a"), caffe_blob("tanh")
    _, _, _, (y,) = run("TanH", [ip_a.reshape(8, -1)], dtype=np.float32)
    np.testing.assert_allclose(y, tanh.reshape(8, -1), atol=1e-6)


# ---- Dropout -----------------------------------------------------------------
def test_dropout_test_phase_is_identity():
    x = data()
    layer, bottom, top, (y,) = run("Dropout", [x], phase=TEST)
    np.testing.assert_array_equal(y, x)
    dy = data(seed=3)
    dx, _ = backward_out_of_place(layer, bottom, top, dy)
    np.testing.assert_array_equal(dx, dy)
    y2, dx2, _ = run_in_place("Dropout", x, dy, phase=TEST)
    np.testing.assert_array_equal(y2, x)
    np.testing.assert_array_equal(dx2, dy)


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.8])
def test_dropout_train_scales_and_drops(ratio):
    x = np.random.default_rng(0).uniform(1, 2, size=(20, 10, 10, 10))
    layer, bottom, top, (y,) = run("Dropout", [x], phase=TRAIN, dropout_param={"dropout_ratio": ratio})
    ratio = float(np.float32(ratio))  # a proto float
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / (1 - ratio), rtol=1e-12)
    assert abs((~kept).mean() - ratio) < 0.02
    # Backward uses the same mask and scale.
    dy = np.ones_like(x)
    dx, _ = backward_out_of_place(layer, bottom, top, dy)
    np.testing.assert_allclose(dx, kept / (1 - ratio), rtol=1e-12)
    # A new forward draws a new mask.
    layer.forward(bottom, top)
    assert (top[0].cpu_data() != y).any()


def test_dropout_gradient_and_in_place():
    x = data()
    layer, bottom, top, _ = run("Dropout", [x], phase=TRAIN, dropout_param={"dropout_ratio": 0.4})
    assert check_gradient(layer, bottom, top) > 0
    # Same seed and layer name give the same stream, hence the same mask, in place.
    assert_in_place_matches("Dropout", x, phase=TRAIN, dropout_param={"dropout_ratio": 0.4})


def test_dropout_ratio_zero_is_identity_in_train():
    x = data()
    _, _, _, (y,) = run("Dropout", [x], phase=TRAIN, dropout_param={"dropout_ratio": 0.0})
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("ratio", [1.0, -0.1])
def test_dropout_bad_ratio(ratio):
    with pytest.raises(ConfigError, match="dropout_ratio"):
        run("Dropout", [data()], phase=TRAIN, dropout_param={"dropout_ratio": ratio})


# ---- PReLU -------------------------------------------------------------------
def prelu_ref(x, slopes, shared):
    y = x.copy()
    for idx in np.ndindex(x.shape):
        a = slopes if shared else slopes[idx[1]]
        if x[idx] <= 0:
            y[idx] = a * x[idx]
    return y


def test_prelu_default_slopes():
    x = data()
    layer, bottom, top, (y,) = run("PReLU", [x])
    assert layer.blobs[0].shape == (3,)
    np.testing.assert_array_equal(layer.blobs[0].cpu_data(), [0.25] * 3)
    np.testing.assert_allclose(y, prelu_ref(x, np.full(3, 0.25), False), rtol=1e-12)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("shape", [SHAPE, (4, 3), (2, 3, 6)])
def test_prelu_forward_gradient(shared, shape):
    x = data(shape)
    layer, bottom, top, _ = run("PReLU", [x], prelu_param={
        "channel_shared": shared, "filler": {"type": "uniform", "min": -0.5, "max": 1.5}})
    slopes = layer.blobs[0].cpu_data().copy()
    assert slopes.shape == (() if shared else (3,))
    np.testing.assert_allclose(top[0].cpu_data(), prelu_ref(x, slopes, shared), rtol=1e-12)
    assert check_gradient(layer, bottom, top) > 0


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_in_place(shared):
    assert_in_place_matches("PReLU", data(), prelu_param={
        "channel_shared": shared, "filler": {"type": "gaussian", "std": 0.5}})


def test_prelu_needs_two_axes():
    with pytest.raises(ConfigError, match="at least 2 axes"):
        run("PReLU", [data((5,))])


def test_prelu_matches_caffe():
    conv_g, prelu_g = caffe_blob("conv_g"), caffe_blob("prelu_g")
    layer, bottom, top, _ = run("PReLU", [conv_g], dtype=np.float32)
    layer.blobs[0].set_data(caffe_weights("prelu_g")[0])
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].cpu_data(), prelu_g, atol=1e-6)
