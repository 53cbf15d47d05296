"""BatchNorm: batch and global statistics, running averages, gradients, in place, real Caffe."""
import numpy as np
import pytest

from caffelite import config
from caffelite.blob import Blob
from caffelite.errors import ConfigError
from caffelite.layers.base import TEST, TRAIN
from caffelite.net import Net
from caffelite.io.blob_proto import blob_proto_to_array
from caffelite.proto import pb
from conftest import FIXTURES
from golden import caffe_blob
from layer_testing import check_gradient, forward, make_layer, run

EPS = float(np.float32(1e-5))
MAF = float(np.float32(0.999))


def channel_stats_ref(x):
    """Per-channel mean and biased variance over N and space, by loops."""
    C = x.shape[1] if x.ndim > 1 else 1
    x3 = x.reshape(x.shape[0], C, -1) if x.ndim > 1 else x.reshape(-1, 1, 1)
    means, variances = [], []
    for c in range(C):
        values = [x3[n, c, s] for n in range(x3.shape[0]) for s in range(x3.shape[2])]
        mean = sum(values) / len(values)
        means.append(mean)
        variances.append(sum((v - mean) ** 2 for v in values) / len(values))
    return np.array(means), np.array(variances), x3.shape[0] * x3.shape[2]


def normalize_ref(x, mean, var, eps=EPS):
    shape = (1, -1) + (1,) * (x.ndim - 2) if x.ndim > 1 else (-1,)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)


def data(shape=(3, 4, 2, 3), seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) * 2 + rng.standard_normal(shape[1:2] if len(shape) > 1 else 1).reshape(
        (1, -1) + (1,) * (len(shape) - 2) if len(shape) > 1 else (1,))


@pytest.mark.parametrize("shape", [(3, 4, 2, 3), (5, 3), (2, 3, 4), (1, 2, 1, 1), (6,)])
def test_train_normalises_and_updates_stats(shape):
    x = data(shape)
    layer, bottom, top, (y,) = run("BatchNorm", [x], phase=TRAIN)
    mean, var, m = channel_stats_ref(x)
    np.testing.assert_allclose(y, normalize_ref(x, mean, var), rtol=1e-10, atol=1e-12)
    correction = m / (m - 1) if m > 1 else 1.0
    np.testing.assert_allclose(layer.blobs[0].cpu_data(), mean, rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[1].cpu_data(), correction * var, rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[2].cpu_data(), [1.0])
    # A second batch: the running sums decay by moving_average_fraction.
    x2 = data(shape, seed=1)
    bottom[0].set_data(x2)
    forward(layer, bottom, top)
    mean2, var2, _ = channel_stats_ref(x2)
    np.testing.assert_allclose(layer.blobs[0].cpu_data(), MAF * mean + mean2, rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[1].cpu_data(), correction * (MAF * var + var2), rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[2].cpu_data(), [MAF + 1.0], rtol=1e-12)


def test_blobs_start_at_zero_and_never_learn():
    layer, bottom, top, _ = run("BatchNorm", [data()], phase=TRAIN)
    layer2 = make_layer("BatchNorm", phase=TRAIN)
    b = Blob((3, 4, 2, 3), np.float64)
    layer2.layer_setup([b], [Blob((), np.float64)])
    for blob, shape in zip(layer2.blobs, [(4,), (4,), (1,)]):
        assert blob.shape == shape
        np.testing.assert_array_equal(blob.cpu_data(), 0)
    assert layer.param_propagate_down == [False, False, False]
    top[0].set_diff(np.ones(top[0].shape))
    layer.backward(top, [True], bottom)
    for blob in layer.blobs:
        np.testing.assert_array_equal(blob.cpu_diff(), 0)


def test_global_stats_in_test_phase():
    x = data()
    layer, bottom, top, (y,) = run("BatchNorm", [x], phase=TEST)
    # Scale factor 0: mean and variance count as 0.
    np.testing.assert_allclose(y, x / np.sqrt(EPS), rtol=1e-10)
    mean_sum, var_sum, factor = np.arange(4.0) - 1, np.arange(4.0) + 0.5, 2.5
    layer.blobs[0].set_data(mean_sum)
    layer.blobs[1].set_data(var_sum)
    layer.blobs[2].set_data([factor])
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, normalize_ref(x, mean_sum / factor, var_sum / factor), rtol=1e-10)
    np.testing.assert_array_equal(layer.blobs[2].cpu_data(), [factor])  # not updated
    assert check_gradient(layer, bottom, top) > 0
    top[0].set_diff(np.ones(x.shape))
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].cpu_diff(),
                               np.broadcast_to(1 / np.sqrt(var_sum / factor + EPS)[:, None, None], x.shape))


@pytest.mark.parametrize("phase,use_global,expect_global", [
    (TRAIN, None, False), (TEST, None, True), (TRAIN, True, True), (TEST, False, False)])
def test_use_global_stats_choice(phase, use_global, expect_global):
    param = {} if use_global is None else {"batch_norm_param": {"use_global_stats": use_global}}
    layer, _, _, (y,) = run("BatchNorm", [data()], phase=phase, **param)
    assert layer.use_global_stats == expect_global
    assert layer.blobs[2].cpu_data()[0] == (0.0 if expect_global else 1.0)


@pytest.mark.parametrize("shape", [(3, 4, 2, 3), (5, 3)])
def test_train_gradient(shape):
    layer, bottom, top, _ = run("BatchNorm", [data(shape)], phase=TRAIN,
                                batch_norm_param={"eps": 1e-3, "moving_average_fraction": 0.9})
    assert check_gradient(layer, bottom, top) > 0


def run_in_place(x, dy, overwrite_top=False, **kwargs):
    layer = make_layer("BatchNorm", **kwargs)
    blob = Blob(x.shape, np.float64)
    blob.set_data(x)
    layer.layer_setup([blob], [blob])
    layer.forward([blob], [blob])
    y = blob.cpu_data().copy()
    if overwrite_top:
        blob.set_data(-7.0)  # a later in-place layer (Scale, ReLU) rewrites the top
    blob.set_diff(dy)
    layer.backward([blob], [True], [blob])
    return y, blob.cpu_diff().copy(), [b.cpu_data().copy() for b in layer.blobs]


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_in_place_matches(phase):
    x, dy = data(), data(seed=7)
    layer, bottom, top, (y,) = run("BatchNorm", [x], phase=phase)
    top[0].set_diff(dy)
    layer.backward(top, [True], bottom)
    for overwrite in (False, True):
        y2, dx2, stats = run_in_place(x, dy, overwrite, phase=phase)
        np.testing.assert_allclose(y2, y, rtol=1e-12)
        np.testing.assert_allclose(dx2, bottom[0].cpu_diff(), rtol=1e-10, atol=1e-12)
        for a, b in zip(stats, layer.blobs):
            np.testing.assert_allclose(a, b.cpu_data(), rtol=1e-12)


def test_float32_stays_float32():
    x = data().astype(np.float32)
    layer, _, top, (y,) = run("BatchNorm", [x], phase=TRAIN, dtype=np.float32)
    assert y.dtype == np.float32 and layer.blobs[0].dtype == np.float32
    mean, var, _ = channel_stats_ref(x.astype(np.float64))
    np.testing.assert_allclose(y, normalize_ref(x.astype(np.float64), mean, var), rtol=1e-4, atol=1e-5)


def test_batch_norm_scale_relu_in_place_match_caffe():
    """conv_a -> BatchNorm -> Scale(bias) -> ReLU(0.1), all in place on one blob, as in the fixture net."""
    model = pb.NetParameter()
    model.ParseFromString((FIXTURES / "net" / "fixture_iter_20.caffemodel").read_bytes())
    weights = {lp.name: [blob_proto_to_array(b) for b in lp.blobs] for lp in model.layer}
    x = caffe_blob("conv_a")
    blob = Blob(x.shape, np.float32)
    blob.set_data(x)
    chain = [make_layer("BatchNorm", name="bn_a", dtype=np.float32),
             make_layer("Scale", name="scale_a", dtype=np.float32, scale_param={"bias_term": True}),
             make_layer("ReLU", name="relu_a", dtype=np.float32, relu_param={"negative_slope": 0.1})]
    for layer in chain:
        layer.layer_setup([blob], [blob])
        for param, values in zip(layer.blobs, weights[layer.name]):
            param.set_data(values)
    assert chain[0].use_global_stats
    for layer in chain:
        layer.forward([blob], [blob])
    expected = caffe_blob("bn_a")
    np.testing.assert_allclose(blob.cpu_data(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_statistics_are_never_trained_by_the_solver():
    net = Net(config.parse_net("""
force_backward: true
layer:
  - {name: in, type: Input, top: x, input_param: {shape: {dim: [4, 3]}}}
  - {name: bn, type: BatchNorm, bottom: x, top: y}
"""))
    assert net.params_lr == [0.0, 0.0, 0.0]
    assert net.params_weight_decay == [0.0, 0.0, 0.0]


def test_trainable_statistics_are_refused():
    with pytest.raises(ConfigError, match="cannot train the batch statistics"):
        run("BatchNorm", [np.zeros((2, 3))], param=[{"lr_mult": 1}])
