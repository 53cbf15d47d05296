"""InnerProduct: NumPy reference, axis/transpose variants, gradients, real-Caffe numbers."""
import numpy as np
import pytest

from caffelite.errors import ConfigError
from caffelite.io.blob_proto import blob_proto_to_array
from caffelite.proto import pb
from conftest import FIXTURES
from golden import caffe_blob
from layer_testing import check_gradient, forward, run

FILLERS = {"weight_filler": {"type": "gaussian", "std": 0.5},
           "bias_filler": {"type": "uniform", "min": -1, "max": 1}}


def ip_ref(x, weight, bias, axis, transpose):
    """Loop reference: out[m, o] = sum_k x[m, k] W[o, k] + b[o]."""
    M = int(np.prod(x.shape[:axis]))
    K = int(np.prod(x.shape[axis:]))
    X = x.reshape(M, K)
    W = weight.T if transpose else weight
    out = np.zeros((M, W.shape[0]))
    for m in range(M):
        for o in range(W.shape[0]):
            out[m, o] = sum(X[m, k] * W[o, k] for k in range(K)) + (bias[o] if bias is not None else 0)
    return out.reshape(x.shape[:axis] + (W.shape[0],))


@pytest.mark.parametrize("axis,transpose,bias_term", [
    (1, False, True), (1, True, True), (2, True, False), (2, False, True), (-1, False, True),
    (0, False, False)])
def test_forward_and_gradient(axis, transpose, bias_term):
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 2))
    layer, bottom, top, (y,) = run("InnerProduct", [x], inner_product_param={
        "num_output": 4, "axis": axis, "transpose": transpose, "bias_term": bias_term, **FILLERS})
    canonical = axis % 4
    K = int(np.prod(x.shape[canonical:]))
    weight = layer.blobs[0].cpu_data()
    assert weight.shape == ((K, 4) if transpose else (4, K))
    assert len(layer.blobs) == (2 if bias_term else 1)
    bias = layer.blobs[1].cpu_data() if bias_term else None
    assert y.shape == x.shape[:canonical] + (4,)
    np.testing.assert_allclose(y, ip_ref(x, weight, bias, canonical, transpose), rtol=1e-10, atol=1e-12)
    assert check_gradient(layer, bottom, top) > 0


def test_weight_gradient_accumulates():
    x = np.random.default_rng(1).standard_normal((3, 5))
    layer, bottom, top, _ = run("InnerProduct", [x], inner_product_param={"num_output": 2, **FILLERS})
    top[0].set_diff(np.ones((3, 2)))
    layer.blobs[0].set_diff(1.0)
    layer.blobs[1].set_diff(1.0)
    layer.backward(top, [False], bottom)
    np.testing.assert_allclose(layer.blobs[0].cpu_diff(), 1 + np.tile(x.sum(axis=0), (2, 1)))
    np.testing.assert_allclose(layer.blobs[1].cpu_diff(), [4.0, 4.0])


def test_batch_may_change_but_input_size_may_not():
    x = np.random.default_rng(2).standard_normal((2, 3, 4))
    layer, bottom, top, _ = run("InnerProduct", [x], inner_product_param={"num_output": 5, **FILLERS})
    bottom[0].reshape((7, 3, 4))
    assert forward(layer, bottom, top)[0].shape == (7, 5)
    bottom[0].reshape((2, 3, 5))
    with pytest.raises(ConfigError, match="input size"):
        forward(layer, bottom, top)


def test_num_output_required():
    with pytest.raises(ConfigError, match="num_output"):
        run("InnerProduct", [np.zeros((2, 3))])


def test_default_fillers():
    _, _, _, (y,) = run("InnerProduct", [np.ones((2, 3))], inner_product_param={"num_output": 2})
    np.testing.assert_array_equal(y, 0)  # constant 0 weight and bias


@pytest.mark.parametrize("name,bottom_name,transpose", [
    ("ip_a", "flat", False), ("ip_t", "tanh", True), ("ip_g", "reshape_g", False)])
def test_matches_caffe(name, bottom_name, transpose):
    model = pb.NetParameter()
    model.ParseFromString((FIXTURES / "net" / "fixture_iter_20.caffemodel").read_bytes())
    weights = [blob_proto_to_array(b) for b in next(lp for lp in model.layer if lp.name == name).blobs]
    x = caffe_blob(bottom_name).reshape(8, -1)
    expected = caffe_blob(name).reshape(8, -1)
    layer, bottom, top, _ = run("InnerProduct", [x], dtype=np.float32, inner_product_param={
        "num_output": expected.shape[1], "transpose": transpose})
    for blob, w in zip(layer.blobs, weights):
        blob.set_data(w)
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
