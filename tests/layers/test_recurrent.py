"""RNN and LSTM against plain NumPy references (loops over time and streams),
with gradient checks for every input and parameter."""
import math

import numpy as np
import pytest

from caffelite.errors import ConfigError
from layer_testing import check_gradient, forward, make_layer, setup

T, N, H = 3, 2, 3
FILLER = {"type": "uniform", "min": -0.6, "max": 0.6}


def params(expose=False, num_output=H):
    return {"recurrent_param": {"num_output": num_output, "weight_filler": FILLER,
                                "bias_filler": FILLER, "expose_hidden": expose}}


def sig(v):
    return 1.0 / (1.0 + math.exp(-v))


def ref_rnn(x, cont, blobs, static=None, h0=None):
    W_xh, b_h = blobs[0], blobs[1]
    W_s = blobs[2] if static is not None else None
    W_hh, W_ho, b_o = blobs[-3:]
    Hn = b_h.size
    steps, streams = cont.shape
    xf = x.reshape(steps, streams, -1)
    h = np.zeros((streams, Hn)) if h0 is None else h0.reshape(streams, Hn).copy()
    out = np.zeros((steps, streams, Hn))
    for t in range(steps):
        new_h = np.zeros_like(h)
        for n in range(streams):
            a = W_hh @ (cont[t, n] * h[n]) + W_xh @ xf[t, n] + b_h
            if static is not None:
                a = a + W_s @ static[n].reshape(-1)
            new_h[n] = np.tanh(a)
            out[t, n] = np.tanh(W_ho @ new_h[n] + b_o)
        h = new_h
    return out, h


def ref_lstm(x, cont, blobs, static=None, h0=None, c0=None):
    W_xc, b_c = blobs[0], blobs[1]
    W_s = blobs[2] if static is not None else None
    W_hc = blobs[-1]
    Hn = W_hc.shape[1]
    steps, streams = cont.shape
    xf = x.reshape(steps, streams, -1)
    h = np.zeros((streams, Hn)) if h0 is None else h0.reshape(streams, Hn).copy()
    c = np.zeros((streams, Hn)) if c0 is None else c0.reshape(streams, Hn).copy()
    out = np.zeros((steps, streams, Hn))
    for t in range(steps):
        for n in range(streams):
            gate = W_hc @ (cont[t, n] * h[n]) + W_xc @ xf[t, n] + b_c
            if static is not None:
                gate = gate + W_s @ static[n].reshape(-1)
            for d in range(Hn):
                i = sig(gate[d])
                f = sig(gate[Hn + d])
                o = sig(gate[2 * Hn + d])
                g = math.tanh(gate[3 * Hn + d])
                c[n, d] = cont[t, n] * f * c[n, d] + i * g
                h[n, d] = o * math.tanh(c[n, d])
            out[t, n] = h[n]
    return out, h, c


@pytest.fixture
def rs():
    return np.random.default_rng(5)


@pytest.fixture
def cont():
    # Stream 0 restarts at t = 2, stream 1 runs on; both start a sequence at t = 0.
    return np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]])


def build(type, bottoms, num_top=1, **fields):
    layer = make_layer(type, **fields)
    bottom, top = setup(layer, bottoms, num_top)
    return layer, bottom, top, forward(layer, bottom, top)


def blob_data(layer):
    return [b.cpu_data().copy() for b in layer.blobs]


# ---- RNN -------------------------------------------------------------------
def test_rnn_params_in_caffe_order(rs, cont):
    x = rs.standard_normal((T, N, 2, 2))
    layer, _, _, _ = build("RNN", [x, cont], **params())
    assert [b.shape for b in layer.blobs] == [(H, 4), (H,), (H, H), (H, H), (H,)]
    assert [b.name for b in layer.blobs] == [f"layer_{n}" for n in
                                             ("W_xh", "b_h", "W_hh", "W_ho", "b_o")]
    xs = rs.standard_normal((N, 5))
    layer, _, _, _ = build("RNN", [x, cont, xs], **params())
    assert [b.shape for b in layer.blobs] == [(H, 4), (H,), (H, 5), (H, H), (H, H), (H,)]


def test_rnn_forward_with_reset(rs, cont):
    x = rs.standard_normal((T, N, 4))
    layer, _, _, (out,) = build("RNN", [x, cont], **params())
    assert out.shape == (T, N, H)
    np.testing.assert_allclose(out, ref_rnn(x, cont, blob_data(layer))[0], rtol=1e-12, atol=1e-14)


def test_rnn_gradient(rs, cont):
    layer, bottom, top, _ = build("RNN", [rs.standard_normal((T, N, 4)), cont], **params())
    assert check_gradient(layer, bottom, top, check_bottom=[0]) > 0


def test_rnn_static_input(rs, cont):
    x, xs = rs.standard_normal((T, N, 4)), rs.standard_normal((N, 2, 2))
    layer, bottom, top, (out,) = build("RNN", [x, cont, xs], **params())
    np.testing.assert_allclose(out, ref_rnn(x, cont, blob_data(layer), static=xs)[0],
                               rtol=1e-12, atol=1e-14)
    assert check_gradient(layer, bottom, top, check_bottom=[0, 2]) > 0


def test_rnn_expose_hidden(rs):
    cont = np.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    x, h0 = rs.standard_normal((T, N, 4)), rs.standard_normal((1, N, H))
    layer, bottom, top, (out, hT) = build("RNN", [x, cont, h0], num_top=2, **params(True))
    ref_out, ref_h = ref_rnn(x, cont, blob_data(layer), h0=h0)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(hT, ref_h[None], rtol=1e-12, atol=1e-14)
    assert check_gradient(layer, bottom, top, check_bottom=[0, 2]) > 0


def test_rnn_expose_hidden_with_static_input(rs):
    cont = np.ones((T, N))
    x, xs, h0 = rs.standard_normal((T, N, 4)), rs.standard_normal((N, 3)), rs.standard_normal((1, N, H))
    layer, bottom, top, (out, hT) = build("RNN", [x, cont, xs, h0], num_top=2, **params(True))
    ref_out, ref_h = ref_rnn(x, cont, blob_data(layer), static=xs, h0=h0)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(hT, ref_h[None], rtol=1e-12, atol=1e-14)
    assert check_gradient(layer, bottom, top, check_bottom=[0, 2, 3]) > 0


def test_rnn_state_carries_over_between_passes(rs):
    cont = np.ones((T, N))
    x1, x2 = rs.standard_normal((T, N, 4)), rs.standard_normal((T, N, 4))
    layer, bottom, top, (out1,) = build("RNN", [x1, cont], **params())
    blobs = blob_data(layer)
    ref1, h1 = ref_rnn(x1, cont, blobs)
    np.testing.assert_allclose(out1, ref1, rtol=1e-12, atol=1e-14)
    bottom[0].set_data(x2)
    (out2,) = forward(layer, bottom, top)
    np.testing.assert_allclose(out2, ref_rnn(x2, cont, blobs, h0=h1)[0], rtol=1e-12, atol=1e-14)
    layer.reset()
    (out3,) = forward(layer, bottom, top)
    np.testing.assert_allclose(out3, ref_rnn(x2, cont, blobs)[0], rtol=1e-12, atol=1e-14)


def test_rnn_batch_size_may_change(rs):
    layer, bottom, top, _ = build("RNN", [rs.standard_normal((T, N, 4)), np.zeros((T, N))],
                                  **params())
    x = rs.standard_normal((T, 4, 4))
    cont = np.zeros((T, 4))
    bottom[0].reshape(x.shape)
    bottom[0].set_data(x)
    bottom[1].reshape(cont.shape)
    bottom[1].set_data(cont)
    (out,) = forward(layer, bottom, top)
    np.testing.assert_allclose(out, ref_rnn(x, cont, blob_data(layer))[0], rtol=1e-12, atol=1e-14)


def test_rnn_float32(rs, cont):
    x = rs.standard_normal((T, N, 4))
    layer = make_layer("RNN", dtype=np.float32, **params())
    bottom, top = setup(layer, [x.astype(np.float32), cont.astype(np.float32)])
    (out,) = forward(layer, bottom, top)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref_rnn(x, cont, [b.astype(float) for b in blob_data(layer)])[0],
                               rtol=1e-5, atol=1e-6)
    top[0].set_diff(np.ones(out.shape))
    layer.backward(top, [True, False], bottom)
    assert bottom[0].diff.dtype == np.float32 and layer.blobs[0].diff.dtype == np.float32


# ---- LSTM ------------------------------------------------------------------
def test_lstm_params_in_caffe_order(rs, cont):
    x, xs = rs.standard_normal((T, N, 4)), rs.standard_normal((N, 5))
    layer, _, _, _ = build("LSTM", [x, cont], **params())
    assert [b.shape for b in layer.blobs] == [(4 * H, 4), (4 * H,), (4 * H, H)]
    assert [b.name for b in layer.blobs] == ["layer_W_xc", "layer_b_c", "layer_W_hc"]
    layer, _, _, _ = build("LSTM", [x, cont, xs], **params())
    assert [b.shape for b in layer.blobs] == [(4 * H, 4), (4 * H,), (4 * H, 5), (4 * H, H)]
    assert layer.blobs[2].name == "layer_W_xc_static"


def test_lstm_forward_with_reset(rs, cont):
    x = rs.standard_normal((T, N, 2, 2))
    layer, _, _, (out,) = build("LSTM", [x, cont], **params())
    assert out.shape == (T, N, H)
    np.testing.assert_allclose(out, ref_lstm(x, cont, blob_data(layer))[0], rtol=1e-12, atol=1e-14)


def test_lstm_gradient(rs, cont):
    layer, bottom, top, _ = build("LSTM", [rs.standard_normal((T, N, 4)), cont], **params())
    assert check_gradient(layer, bottom, top, check_bottom=[0]) > 0


def test_lstm_static_input(rs, cont):
    x, xs = rs.standard_normal((T, N, 3)), rs.standard_normal((N, 4))
    layer, bottom, top, (out,) = build("LSTM", [x, cont, xs], **params())
    np.testing.assert_allclose(out, ref_lstm(x, cont, blob_data(layer), static=xs)[0],
                               rtol=1e-12, atol=1e-14)
    assert check_gradient(layer, bottom, top, check_bottom=[0, 2]) > 0


def test_lstm_expose_hidden(rs):
    cont = np.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    x = rs.standard_normal((T, N, 4))
    h0, c0 = rs.standard_normal((1, N, H)), rs.standard_normal((1, N, H))
    layer, bottom, top, (out, hT, cT) = build("LSTM", [x, cont, h0, c0], num_top=3,
                                               **params(True))
    ref_out, ref_h, ref_c = ref_lstm(x, cont, blob_data(layer), h0=h0, c0=c0)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(hT, ref_h[None], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(cT, ref_c[None], rtol=1e-12, atol=1e-14)
    assert check_gradient(layer, bottom, top, check_bottom=[0, 2, 3]) > 0


def test_lstm_expose_hidden_with_static_input(rs):
    cont = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x, xs = rs.standard_normal((T, N, 4)), rs.standard_normal((N, 2))
    h0, c0 = rs.standard_normal((1, N, H)), rs.standard_normal((1, N, H))
    layer, bottom, top, (out, hT, cT) = build("LSTM", [x, cont, xs, h0, c0], num_top=3,
                                               **params(True))
    ref_out, ref_h, ref_c = ref_lstm(x, cont, blob_data(layer), static=xs, h0=h0, c0=c0)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(cT, ref_c[None], rtol=1e-12, atol=1e-14)
    assert check_gradient(layer, bottom, top, check_bottom=[0, 2, 3, 4]) > 0


def test_lstm_state_carries_over_between_passes(rs):
    cont = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    x1, x2 = rs.standard_normal((T, N, 4)), rs.standard_normal((T, N, 4))
    layer, bottom, top, (out1,) = build("LSTM", [x1, cont], **params())
    blobs = blob_data(layer)
    ref1, h1, c1 = ref_lstm(x1, cont, blobs)
    np.testing.assert_allclose(out1, ref1, rtol=1e-12, atol=1e-14)
    bottom[0].set_data(x2)
    (out2,) = forward(layer, bottom, top)
    np.testing.assert_allclose(out2, ref_lstm(x2, cont, blobs, h0=h1, c0=c1)[0],
                               rtol=1e-12, atol=1e-14)
    layer.reset()
    (out3,) = forward(layer, bottom, top)
    np.testing.assert_allclose(out3, ref_lstm(x2, cont, blobs)[0], rtol=1e-12, atol=1e-14)


def test_lstm_loads_caffe_weights(rs, cont):
    """Setting the blobs (as a caffemodel load does) drives the computation."""
    x = rs.standard_normal((T, N, 4))
    layer, bottom, top, _ = build("LSTM", [x, cont], **params())
    new = [rs.standard_normal(b.shape) * 0.3 for b in layer.blobs]
    for blob, values in zip(layer.blobs, new):
        blob.set_data(values)
    (out,) = forward(layer, bottom, top)
    np.testing.assert_allclose(out, ref_lstm(x, cont, new)[0], rtol=1e-12, atol=1e-14)


# ---- errors ----------------------------------------------------------------
@pytest.mark.parametrize("type", ["RNN", "LSTM"])
def test_recurrent_errors(rs, cont, type):
    x = rs.standard_normal((T, N, 4))
    with pytest.raises(ConfigError, match="num_output"):
        build(type, [x, cont], recurrent_param={"num_output": 0})
    with pytest.raises(ConfigError, match="cont must be"):
        build(type, [x, cont[:, :1]], **params())
    with pytest.raises(ConfigError, match="bottoms"):
        build(type, [x, cont], num_top=1 + (2 if type == "LSTM" else 1), **params(True))
    with pytest.raises(ConfigError, match=r"must be \(1, 2, 3\)"):
        extra = [np.zeros((1, N, H + 1))] * (2 if type == "LSTM" else 1)
        build(type, [x, cont] + extra, num_top=1 + len(extra), **params(True))
    layer, bottom, top, _ = build(type, [x, cont], **params())
    bottom[1].set_diff(7.0)
    top[0].set_diff(np.ones((T, N, H)))
    layer.backward(top, [True, True], bottom)  # cont gets no gradient, as in Caffe
    assert np.all(bottom[1].cpu_diff() == 0)
    assert not layer.allow_force_backward(1) and layer.allow_force_backward(0)
