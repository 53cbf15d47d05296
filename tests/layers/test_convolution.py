"""Convolution and Deconvolution: loop references, gradients, Caffe's shapes and numbers."""
import itertools

import numpy as np
import pytest

from caffelite.errors import ConfigError
from caffelite.layers import im2col
from caffelite.io.blob_proto import blob_proto_to_array
from caffelite.proto import pb
from conftest import FIXTURES
from golden import caffe_blob
from layer_testing import check_gradient, forward, make_layer, run, setup

FILLERS = {"weight_filler": {"type": "gaussian", "std": 0.5},
           "bias_filler": {"type": "uniform", "min": -1, "max": 1}}


REPEATED = ("kernel_size", "pad", "stride", "dilation")


def cp(params):
    """convolution_param dict with the repeated fields as lists (json_format needs them)."""
    return {k: ([v] if k in REPEATED and not isinstance(v, list) else v) for k, v in params.items()}


def _per_axis(values, n, default):
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    return tuple(values * n if len(values) == 1 else values) if values != [None] else (default,) * n


def conv_ref(x, w, b, stride, pad, dilation, group):
    """Direct loops: y[n, m, o] = sum_{c, k} w[m, c, k] x_pad[n, g*Cg + c, o*s + k*d] + b[m]."""
    N, C = x.shape[:2]
    spatial = x.shape[2:]
    M, Cg = w.shape[:2]
    kernel = w.shape[2:]
    D = len(spatial)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in pad])
    out = tuple((spatial[a] + 2 * pad[a] - dilation[a] * (kernel[a] - 1) - 1) // stride[a] + 1
                for a in range(D))
    y = np.zeros((N, M) + out)
    Mg = M // group
    for n, m in itertools.product(range(N), range(M)):
        g = m // Mg
        for o in itertools.product(*(range(v) for v in out)):
            total = b[m] if b is not None else 0.0
            for c in range(Cg):
                for k in itertools.product(*(range(v) for v in kernel)):
                    pos = tuple(o[a] * stride[a] + k[a] * dilation[a] for a in range(D))
                    total += w[(m, c) + k] * xp[(n, g * Cg + c) + pos]
            y[(n, m) + o] = total
    return y


def deconv_ref(x, w, b, stride, pad, dilation, group):
    """Scatter loops: every input pixel adds w[c, m, k] * x into y_pad[o*s + k*d], then crop."""
    N, C = x.shape[:2]
    spatial = x.shape[2:]
    Cw, Mg = w.shape[:2]
    kernel = w.shape[2:]
    D = len(spatial)
    Cg = C // group
    M = Mg * group
    full = tuple(stride[a] * (spatial[a] - 1) + dilation[a] * (kernel[a] - 1) + 1 for a in range(D))
    y = np.zeros((N, M) + full)
    for n, c in itertools.product(range(N), range(C)):
        g = c // Cg
        for i in itertools.product(*(range(v) for v in spatial)):
            for m in range(Mg):
                for k in itertools.product(*(range(v) for v in kernel)):
                    pos = tuple(i[a] * stride[a] + k[a] * dilation[a] for a in range(D))
                    y[(n, g * Mg + m) + pos] += w[(c, m) + k] * x[(n, c) + i]
    crop = tuple(slice(pad[a], full[a] - pad[a]) for a in range(D))
    y = y[(slice(None), slice(None)) + crop].copy()
    if b is not None:
        y += b.reshape((1, M) + (1,) * D)
    return y


CASES = [
    # (input shape, conv params)
    ((2, 3, 6, 5), {"num_output": 4, "kernel_size": 3}),
    ((2, 3, 7, 7), {"num_output": 2, "kernel_size": 3, "pad": 1, "stride": 2}),
    ((1, 4, 9, 8), {"num_output": 4, "kernel_size": 2, "dilation": 2, "pad": 1, "group": 2}),
    ((2, 2, 6, 7), {"num_output": 3, "kernel_h": 3, "kernel_w": 2, "pad_h": 1, "pad_w": 0,
                    "stride_h": 2, "stride_w": 1, "bias_term": False}),
    ((2, 6, 5, 5), {"num_output": 6, "kernel_size": 3, "group": 3, "pad": 1}),
    ((2, 4, 6, 6), {"num_output": 4, "kernel_size": 3, "group": 4, "pad": 1, "stride": 2}),  # depthwise
    ((2, 3, 5, 5), {"num_output": 6, "kernel_size": 2, "group": 3}),             # channel multiplier 2
    ((3, 2, 5, 6), {"num_output": 3, "kernel_size": [2, 3], "stride": [1, 2], "pad": [0, 1]}),
    ((2, 3, 4, 4), {"num_output": 5, "kernel_size": 1}),                         # 1x1
    ((2, 2, 7), {"num_output": 3, "kernel_size": 3, "stride": 2, "pad": 1}),      # 1-D
    ((1, 2, 4, 3, 4), {"num_output": 2, "kernel_size": 2, "pad": [1, 0, 1]}),    # 3-D
]


def check_float32_close_to_float64(x, params, seed: int) -> None:
    """A Convolution's forward and backward in float32 agree with float64 (whichever engine the
    caller's fixture forces)."""
    results = {}
    for dtype in (np.float32, np.float64):
        layer, bottom, top, (y,) = run("Convolution", [x.astype(dtype)], dtype=dtype, convolution_param=params)
        assert y.dtype == dtype
        top[0].set_diff(np.random.default_rng(seed).standard_normal(y.shape).astype(dtype))
        for blob in layer.blobs:
            blob.set_diff(0)
        layer.backward(top, [True], bottom)
        results[dtype] = [y, bottom[0].cpu_diff().copy()] + [b.cpu_diff().copy() for b in layer.blobs]
    for a, b in zip(results[np.float32], results[np.float64]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def check_one_parameter_frozen(x, frozen: int, seed: int, rtol: float, dtype=np.float64):
    """With parameter ``frozen`` (0: weights, 1: bias) not learned, a 3x3 Convolution's other
    gradient equals the one an unfrozen layer computes from the same dy (whichever engine the
    caller's fixture forces); returns (layer, reference, dy) for further checks."""
    params = cp({"num_output": 2, "kernel_size": 3, "pad": 1, **FILLERS})
    reference, ref_bottom, ref_top, (y,) = run("Convolution", [x], dtype=dtype, convolution_param=params)
    layer, bottom, top, _ = run("Convolution", [x], dtype=dtype, convolution_param=params)
    dy = np.random.default_rng(seed).standard_normal(y.shape).astype(dtype)
    for lay, t in ((reference, ref_top), (layer, top)):
        t[0].set_diff(dy)
        for blob in lay.blobs:
            blob.set_diff(0)
    layer.param_propagate_down[frozen] = False
    reference.backward(ref_top, [False], ref_bottom)
    layer.backward(top, [False], bottom)
    kept = 1 - frozen
    np.testing.assert_allclose(layer.blobs[kept].cpu_diff(), reference.blobs[kept].cpu_diff(), rtol=rtol)
    return layer, reference, dy


#: 2-D cases every CPU engine's tests run (test_conv_flat.py, test_conv_columns.py).
ENGINE_CASES = [
    ((2, 3, 6, 5), {"num_output": 4, "kernel_size": 3}),
    ((2, 3, 7, 7), {"num_output": 2, "kernel_size": 3, "pad": 1}),
    ((1, 4, 9, 8), {"num_output": 4, "kernel_size": 2, "dilation": 2, "pad": 1, "group": 2}),
    ((2, 2, 6, 7), {"num_output": 3, "kernel_h": 3, "kernel_w": 2, "pad_h": 1, "pad_w": 0,
                    "bias_term": False}),
    ((2, 4, 6, 6), {"num_output": 4, "kernel_size": 3, "group": 4, "pad": 1}),   # depthwise
    ((3, 2, 4, 4), {"num_output": 3, "kernel_size": 1, "pad": 1}),              # 1x1 with a pad
]


def layer_expected(layer, x, params):
    """Direct loops with ``layer``'s weights and bias for a Convolution with ``params``."""
    kernel, stride, pad, dilation = _geometry(params, x.ndim - 2)
    w = layer.blobs[0].cpu_data()
    b = layer.blobs[1].cpu_data() if params.get("bias_term", True) else None
    return conv_ref(x, w, b, stride, pad, dilation, params.get("group", 1))


def check_engine_matches_loops(shape, params, engine: str):
    """A Convolution with ``params`` runs on its ``engine`` attribute's engine, matches the direct
    loops and passes the gradient check; returns the layer."""
    x = np.random.default_rng(0).standard_normal(shape)
    layer, bottom, top, (y,) = run("Convolution", [x], convolution_param=cp({**params, **FILLERS}))
    assert getattr(layer, engine) is not None and layer.cpu_engine is getattr(layer, engine)
    np.testing.assert_allclose(y, layer_expected(layer, x, params), rtol=1e-10, atol=1e-10)
    assert check_gradient(layer, bottom, top, max_checks=60) > 0
    return layer


def _geometry(params, D):
    kernel = (params["kernel_h"], params["kernel_w"]) if "kernel_h" in params else \
        _per_axis(params["kernel_size"], D, None)
    stride = (params.get("stride_h", 1), params.get("stride_w", 1)) if "stride_h" in params else \
        _per_axis(params.get("stride", 1), D, 1)
    pad = (params.get("pad_h", 0), params.get("pad_w", 0)) if "pad_h" in params else \
        _per_axis(params.get("pad", 0), D, 0)
    return kernel, stride, pad, _per_axis(params.get("dilation", 1), D, 1)


@pytest.fixture(params=["batch_first", "batch_last"])
def layout(request, monkeypatch):
    """Run a test with each internal pixel order (batch-last needs 2+ items)."""
    monkeypatch.setattr(im2col, "FORCE_LAYOUT", request.param)
    return request.param


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("shape,params", CASES)
def test_forward_matches_loops_and_gradient(kind, shape, params, layout):
    x = np.random.default_rng(0).standard_normal(shape)
    layer, bottom, top, (y,) = run(kind, [x], convolution_param=cp({**params, **FILLERS}))
    D = len(shape) - 2
    kernel, stride, pad, dilation = _geometry(params, D)
    group = params.get("group", 1)
    w = layer.blobs[0].cpu_data()
    b = layer.blobs[1].cpu_data() if params.get("bias_term", True) else None
    assert len(layer.blobs) == (2 if b is not None else 1)
    assert layer.columns.pixels.batch_last == (layout == "batch_last" and shape[0] > 1)
    if kind == "Convolution":
        assert w.shape == (params["num_output"], shape[1] // group) + kernel
        expected = conv_ref(x, w, b, stride, pad, dilation, group)
    else:
        assert w.shape == (shape[1], params["num_output"] // group) + kernel
        expected = deconv_ref(x, w, b, stride, pad, dilation, group)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)
    assert check_gradient(layer, bottom, top, max_checks=60) > 0


def test_transpose_pair():
    """<conv(x), y> == <x, deconv(y)> with the same weights (deconv is conv's adjoint)."""
    rs = np.random.default_rng(3)
    params = {"num_output": 4, "kernel_size": 3, "stride": 2, "pad": 1, "group": 2, "bias_term": False}
    x = rs.standard_normal((2, 6, 7, 9))
    conv, _, _, (cx,) = run("Convolution", [x], convolution_param=cp({**params, **FILLERS}))
    y = rs.standard_normal(cx.shape)
    deconv, bottom, top, _ = run("Deconvolution", [y], convolution_param=cp({**params, "num_output": 6}))
    deconv.blobs[0].set_data(conv.blobs[0].cpu_data())
    (dy,) = forward(deconv, bottom, top)
    assert dy.shape == x.shape
    np.testing.assert_allclose(np.sum(cx * y), np.sum(x * dy), rtol=1e-10)


def test_several_bottoms_share_weights():
    rs = np.random.default_rng(4)
    a, b = rs.standard_normal((2, 2, 5, 5)), rs.standard_normal((2, 2, 5, 5))
    layer, bottom, top, (ya, yb) = run("Convolution", [a, b], num_top=2,
                                       convolution_param=cp({"num_output": 3, "kernel_size": 2, **FILLERS}))
    w, bias = layer.blobs[0].cpu_data(), layer.blobs[1].cpu_data()
    np.testing.assert_allclose(ya, conv_ref(a, w, bias, (1, 1), (0, 0), (1, 1), 1), rtol=1e-10)
    np.testing.assert_allclose(yb, conv_ref(b, w, bias, (1, 1), (0, 0), (1, 1), 1), rtol=1e-10)
    assert check_gradient(layer, bottom, top, max_checks=40) > 0


def test_batch_chunks_and_layouts(monkeypatch):
    """Chunked column buffers and both pixel orders give the same numbers and gradients."""
    x = np.random.default_rng(5).standard_normal((5, 3, 6, 6))
    params = {"num_output": 4, "kernel_size": 3, "pad": 1, "group": 1, **FILLERS}
    _, _, _, (reference,) = run("Convolution", [x], convolution_param=cp(params))
    monkeypatch.setattr(im2col, "MAX_COL_ELEMENTS", 36 * 36 * 2)   # two items per chunk
    for order in ("batch_last", "batch_first"):
        monkeypatch.setattr(im2col, "FORCE_LAYOUT", order)
        for kind in ("Convolution", "Deconvolution"):
            layer, bottom, top, (y,) = run(kind, [x], convolution_param=cp(params))
            assert layer.chunks == [(0, 2), (2, 4), (4, 5)]
            assert layer.columns.pixels.batch_last == (order == "batch_last")
            if kind == "Convolution":
                np.testing.assert_allclose(y, reference, rtol=1e-12, atol=1e-12)
            assert check_gradient(layer, bottom, top, max_checks=30) > 0


def test_power_of_two_maps_batch_last(monkeypatch):
    """Items 2 KiB apart take the blocked transpose into batch-last buffers."""
    x = np.random.default_rng(11).standard_normal((10, 2, 16, 16))
    params = cp({"num_output": 3, "kernel_size": 3, "pad": 1, **FILLERS})
    results = []
    for order in ("batch_first", "batch_last"):
        monkeypatch.setattr(im2col, "FORCE_LAYOUT", order)
        layer, bottom, top, (y,) = run("Convolution", [x.astype(np.float32)], dtype=np.float32,
                                       convolution_param=params)
        assert layer.columns.pixels.batch_last == (order == "batch_last")
        results.append(y)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-5)
    layer, bottom, top, _ = run("Convolution", [x], convolution_param=params)
    assert check_gradient(layer, bottom, top, max_checks=30) > 0


def test_batch_size_may_change():
    layer, bottom, top, _ = run("Convolution", [np.zeros((2, 3, 8, 8))],
                                convolution_param=cp({"num_output": 2, "kernel_size": 3, **FILLERS}))
    x = np.random.default_rng(6).standard_normal((5, 3, 8, 8))
    bottom[0].reshape(x.shape)
    bottom[0].set_data(x)
    (y,) = forward(layer, bottom, top)
    expected = conv_ref(x, layer.blobs[0].cpu_data(), layer.blobs[1].cpu_data(), (1, 1), (0, 0), (1, 1), 1)
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)


def test_axis_flattens_leading_axes():
    x = np.random.default_rng(7).standard_normal((2, 3, 2, 5, 5))
    layer, bottom, top, (y,) = run("Convolution", [x], convolution_param=cp({
        "num_output": 4, "kernel_size": 3, "axis": 2, **FILLERS}))
    assert y.shape == (2, 3, 4, 3, 3)
    expected = conv_ref(x.reshape(6, 2, 5, 5), layer.blobs[0].cpu_data(), layer.blobs[1].cpu_data(),
                        (1, 1), (0, 0), (1, 1), 1)
    np.testing.assert_allclose(y.reshape(expected.shape), expected, rtol=1e-10, atol=1e-10)


def test_default_fillers_are_zero():
    _, _, _, (y,) = run("Convolution", [np.ones((1, 1, 3, 3))],
                        convolution_param=cp({"num_output": 2, "kernel_size": 2}))
    np.testing.assert_array_equal(y, 0)


@pytest.mark.parametrize("shape,params,out", [
    ((1, 3, 227, 227), {"num_output": 96, "kernel_size": 11, "stride": 4}, (96, 55, 55)),   # AlexNet conv1
    ((1, 96, 27, 27), {"num_output": 256, "kernel_size": 5, "pad": 2, "group": 2}, (256, 27, 27)),
    ((1, 3, 224, 224), {"num_output": 64, "kernel_size": 7, "stride": 2, "pad": 3}, (64, 112, 112)),
    ((1, 1, 28, 28), {"num_output": 20, "kernel_size": 5}, (20, 24, 24)),                  # LeNet
    ((1, 4, 10, 10), {"num_output": 2, "kernel_size": 3, "dilation": 2}, (2, 6, 6)),
])
def test_caffe_output_shapes(shape, params, out):
    layer = make_layer("Convolution", convolution_param=cp(params))
    _, top = setup(layer, [np.zeros(shape, np.float32)])
    assert top[0].shape == (1,) + out


def test_deconvolution_output_shape():
    layer = make_layer("Deconvolution", convolution_param=cp({
        "num_output": 3, "kernel_size": 4, "stride": 2, "pad": 1}))
    _, top = setup(layer, [np.zeros((2, 5, 7, 9))])
    assert top[0].shape == (2, 3, 14, 18)
    assert layer.blobs[0].shape == (5, 3, 4, 4)


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("params,message", [
    ({"num_output": 4, "kernel_size": 3, "group": 2}, "divisible by group"),
    ({"num_output": 3, "kernel_size": 3, "group": 2, "_channels": 4}, "multiple of group"),
    ({"num_output": 4}, "kernel_size must be given"),
    ({"num_output": 4, "kernel_size": 0}, "nonzero"),
    ({"num_output": 4, "kernel_h": 3}, "nonzero"),
    ({"num_output": 4, "kernel_size": 3, "kernel_h": 3, "kernel_w": 3}, "not both"),
    ({"num_output": 4, "kernel_size": [3, 3, 3]}, "once per spatial axis"),
    ({"kernel_size": 3}, "num_output"),
    ({"num_output": 2, "kernel_size": 3, "stride_h": 2}, "stride"),
])
def test_config_errors(kind, params, message):
    params = dict(params)
    channels = params.pop("_channels", 3)
    with pytest.raises(ConfigError, match=message) as info:
        run(kind, [np.zeros((1, channels, 5, 5))], convolution_param=cp(params))
    assert "layer 'layer'" in str(info.value) and "(" in str(info.value)


def test_output_too_small():
    with pytest.raises(ConfigError, match="output size"):
        run("Convolution", [np.zeros((1, 1, 3, 3))],
            convolution_param=cp({"num_output": 1, "kernel_size": 5}))
    with pytest.raises(ConfigError, match="output size"):
        run("Deconvolution", [np.zeros((1, 1, 1, 1))],
            convolution_param=cp({"num_output": 1, "kernel_size": 1, "pad": 1}))


def test_channels_cannot_change():
    layer, bottom, top, _ = run("Convolution", [np.zeros((1, 2, 5, 5))],
                                convolution_param=cp({"num_output": 1, "kernel_size": 3}))
    bottom[0].reshape((1, 3, 5, 5))
    with pytest.raises(ConfigError, match="channels"):
        forward(layer, bottom, top)


def test_engines_accepted():
    x = np.random.default_rng(8).standard_normal((1, 2, 5, 5))
    params = {"num_output": 2, "kernel_size": 3, **FILLERS}
    outs = [run("Convolution", [x], convolution_param=cp({**params, "engine": e}))[3][0]
            for e in ("DEFAULT", "CAFFE", "CUDNN")]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


# ---- real Caffe ------------------------------------------------------------------

def caffe_layer(name):
    net = pb.NetParameter()
    net.ParseFromString((FIXTURES / "net" / "fixture_iter_20.caffemodel").read_bytes())
    definition = pb.NetParameter()
    from google.protobuf import text_format
    text_format.Parse((FIXTURES / "net" / "net.prototxt").read_text(), definition)
    params = next(lp for lp in definition.layer if lp.name == name).convolution_param
    weights = [blob_proto_to_array(b) for b in next(lp for lp in net.layer if lp.name == name).blobs]
    return params, weights


@pytest.mark.parametrize("kind,name,bottom_name", [
    ("Convolution", "conv_a", "data"), ("Convolution", "conv_g", "bn_a"),
    ("Deconvolution", "deconv", "elt_prod")])
def test_matches_caffe(kind, name, bottom_name):
    from google.protobuf import json_format
    params, weights = caffe_layer(name)
    x = caffe_blob(bottom_name)
    expected = caffe_blob(name)
    layer, bottom, top, _ = run(kind, [x], dtype=np.float32,
                                convolution_param=json_format.MessageToDict(params))
    for blob, w in zip(layer.blobs, weights):
        assert blob.shape == w.shape
        blob.set_data(w)
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_gradients_match_caffe(monkeypatch):
    """Caffe's parameter gradients for conv_a, conv_g and deconv in the fixture net (TRAIN, batch 1).

    The gradient run started from Caffe's own random weights: W = data + diff of the snapshot.
    """
    from google.protobuf import text_format

    from caffelite.layers.base import TRAIN
    from caffelite.net import Net
    monkeypatch.chdir(FIXTURES / "net")
    definition = pb.NetParameter()
    text_format.Parse((FIXTURES / "net" / "net_nodrop.prototxt").read_text(), definition)
    net = Net(definition, phase=TRAIN)
    snapshot = pb.NetParameter()
    snapshot.ParseFromString((FIXTURES / "net" / "fixture_grad_iter_1.caffemodel").read_bytes())
    grads = {}
    for lp in snapshot.layer:
        if lp.name not in net.layer_by_name:
            continue
        for i, (blob, proto) in enumerate(zip(net.layer_by_name[lp.name].blobs, lp.blobs)):
            data = blob_proto_to_array(proto).astype(np.float64)
            diff = blob_proto_to_array(proto, diff=True).astype(np.float64) if len(proto.diff) else 0.0
            blob.set_data((data + diff).reshape(blob.shape))
            grads[lp.name, i] = diff
    for layer in net.layers:
        for blob in layer.blobs:
            blob.set_diff(0)
    net.forward()
    net.backward()
    for name, count in (("conv_a", 2), ("conv_g", 2), ("deconv", 2)):
        for i in range(count):
            got = net.layer_by_name[name].blobs[i].cpu_diff().reshape(-1)
            expected = np.asarray(grads[name, i]).reshape(-1)
            # conv_a's and deconv's biases feed BatchNorm / MVN: their gradients are ~1e-8 noise.
            tol = 1e-6 if (name, i) in (("conv_a", 1), ("deconv", 1)) else 1e-4 * np.abs(expected).max()
            np.testing.assert_allclose(got, expected, rtol=0, atol=tol, err_msg=f"{name} blob {i}")


# ---- float32 vs float64 ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
def test_float32_matches_float64(kind):
    x = np.random.default_rng(9).standard_normal((4, 6, 9, 9))
    params = {"num_output": 8, "kernel_size": 3, "pad": 1, "stride": 2, "group": 2, **FILLERS}
    results = {}
    for dtype in (np.float32, np.float64):
        layer, bottom, top, (y,) = run(kind, [x.astype(dtype)], dtype=dtype, convolution_param=cp(params))
        assert y.dtype == dtype
        dy = np.random.default_rng(10).standard_normal(y.shape).astype(dtype)
        top[0].set_diff(dy)
        for b in layer.blobs:
            b.set_diff(0)
        layer.backward(top, [True], bottom)
        assert bottom[0].cpu_diff().dtype == dtype
        results[dtype] = [y, bottom[0].cpu_diff().copy()] + [b.cpu_diff().copy() for b in layer.blobs]
    for a, b in zip(results[np.float32], results[np.float64]):
        scale = np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)
