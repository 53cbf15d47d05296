"""Pooling: Caffe's loops as reference, CEIL/FLOOR sizes, masks, gradients, real-Caffe numbers."""
import math

import numpy as np
import pytest

from caffelite.errors import ConfigError
from caffelite.layers import cpu_kernels, im2col, pooling
from caffelite.layers.base import TRAIN
from caffelite.proto import pb
from conftest import FIXTURES
from golden import caffe_blob
from layer_testing import check_gradient, forward, make_layer, run, setup

pytestmark = pytest.mark.usefixtures("cpu_parts", "cpu_path")


@pytest.fixture(params=["compiled", "numpy", "numpy, one-plane chunks"])
def cpu_path(request, monkeypatch):
    """The CPU backward as the compiled kernels (cpu_kernels.c), and as NumPy passes with
    phased work in chunks of all the planes and of one plane each."""
    if request.param == "compiled":
        assert cpu_kernels.LIB is not None, "the CPU kernels are not built: pip install -e ."
    else:
        monkeypatch.setattr(cpu_kernels, "LIB", None)
    if request.param.endswith("one-plane chunks"):
        monkeypatch.setattr(pooling, "CHUNK_BYTES", 1)
    return request.param


def out_size(size, k, s, p, ceil_mode=True):
    value = (math.ceil if ceil_mode else math.floor)((size + 2 * p - k) / s) + 1
    if p and (value - 1) * s >= size + p:
        value -= 1
    return value


def pool_ref(x, k, s, p, method, ceil_mode=True):
    """Caffe's CPU loops. Returns (top, mask) with mask = argmax h*W + w (MAX only)."""
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    Ho, Wo = out_size(H, kh, sh, ph, ceil_mode), out_size(W, kw, sw, pw, ceil_mode)
    top = np.zeros((N, C, Ho, Wo))
    mask = np.full((N, C, Ho, Wo), -1.0)
    for n in range(N):
        for c in range(C):
            for oh in range(Ho):
                for ow in range(Wo):
                    hstart, wstart = oh * sh - ph, ow * sw - pw
                    if method == "MAX":
                        hend, wend = min(hstart + kh, H), min(wstart + kw, W)
                        hstart, wstart = max(hstart, 0), max(wstart, 0)
                        best = -np.inf
                        for h in range(hstart, hend):
                            for w in range(wstart, wend):
                                if x[n, c, h, w] > best:
                                    best, mask[n, c, oh, ow] = x[n, c, h, w], h * W + w
                        top[n, c, oh, ow] = best
                    else:
                        hend, wend = min(hstart + kh, H + ph), min(wstart + kw, W + pw)
                        size = (hend - hstart) * (wend - wstart)
                        hstart, wstart = max(hstart, 0), max(wstart, 0)
                        hend, wend = min(hend, H), min(wend, W)
                        top[n, c, oh, ow] = x[n, c, hstart:hend, wstart:wend].sum() / size
    return top, mask


def pp(k=None, s=None, p=None, **extra):
    """pooling_param from (h, w) pairs; equal pairs use the square fields."""
    param = dict(extra)
    for name, value, field in (("kernel", k, "kernel_size"), ("stride", s, "stride"), ("pad", p, "pad")):
        if value is None:
            continue
        if value[0] == value[1]:
            param[field] = value[0]
        else:
            param[f"{name}_h"], param[f"{name}_w"] = value
    return param


@pytest.fixture(params=["batch_first", "batch_last"])
def layout(request, monkeypatch):
    monkeypatch.setattr(im2col, "FORCE_LAYOUT", request.param)
    return request.param


CASES = [
    # shape, kernel, stride, pad, ceil
    ((2, 3, 6, 6), (2, 2), (2, 2), (0, 0), True),
    ((2, 2, 7, 7), (3, 3), (2, 2), (0, 0), True),     # CEIL adds a partial window
    ((2, 2, 7, 7), (3, 3), (2, 2), (0, 0), False),
    ((1, 2, 7, 6), (3, 3), (2, 2), (1, 1), True),     # pad: last window dropped rule
    ((2, 2, 6, 7), (3, 2), (2, 1), (1, 0), True),
    ((2, 1, 5, 8), (2, 3), (3, 2), (1, 1), False),
    ((1, 3, 5, 5), (3, 3), (1, 1), (2, 2), True),
    ((2, 2, 5, 5), (2, 2), (2, 2), (1, 1), True),     # the dropped last window
    ((2, 2, 4, 5), (4, 5), (1, 1), (0, 0), True),     # one window over the whole plane
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("shape,k,s,p,ceil_mode", CASES)
def test_forward_matches_caffe_loops_and_gradient(method, shape, k, s, p, ceil_mode, layout):
    x = np.random.default_rng(0).standard_normal(shape)
    round_mode = "CEIL" if ceil_mode else "FLOOR"
    num_top = 2 if method == "MAX" else 1
    layer, bottom, top, outs = run("Pooling", [x], num_top=num_top,
                                   pooling_param=pp(k, s, p, pool=method, round_mode=round_mode))
    expected, mask = pool_ref(x, k, s, p, method, ceil_mode)
    assert outs[0].shape == expected.shape
    np.testing.assert_allclose(outs[0], expected, rtol=1e-12, atol=1e-12)
    if method == "MAX":
        np.testing.assert_array_equal(outs[1], mask)
    assert check_gradient(layer, bottom, top, max_checks=80) > 0


@pytest.mark.parametrize("phase", [0, 1])
def test_max_gradient_goes_to_first_maximum(phase, layout):
    """Ties: the first maximum in row-major window order gets the whole gradient (as in Caffe)."""
    x = np.array([[[[1.0, 3.0, 3.0],
                    [3.0, 0.0, 2.0],
                    [3.0, 1.0, 3.0]]]]).repeat(2, axis=0)
    layer = make_layer("Pooling", phase=phase, pooling_param=pp((2, 2), (1, 1), pool="MAX"))
    bottom, top = setup(layer, [x])
    (y,) = forward(layer, bottom, top)
    np.testing.assert_array_equal(y[0, 0], [[3, 3], [3, 3]])
    top[0].set_diff(np.arange(1.0, 5.0).reshape(1, 1, 2, 2).repeat(2, axis=0))
    layer.backward(top, [True], bottom)
    # window (0,0) -> (0,1); (0,1) -> (0,1); (1,0) -> (1,0); (1,1) -> (2,2)
    np.testing.assert_array_equal(bottom[0].cpu_diff()[1, 0], [[0, 3, 0], [3, 0, 0], [0, 0, 4]])


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_power_of_two_planes_batch_last(method, monkeypatch):
    """Planes 4 KiB apart take the blocked transpose into batch-last buffers."""
    monkeypatch.setattr(im2col, "FORCE_LAYOUT", "batch_last")
    x = np.random.default_rng(5).standard_normal((5, 2, 32, 32))
    layer, bottom, top, (y,) = run("Pooling", [x], pooling_param={"pool": method, "kernel_size": 3,
                                                                  "stride": 2, "pad": 1})
    assert layer.pixels.batch_last
    np.testing.assert_allclose(y, pool_ref(x, (3, 3), (2, 2), (1, 1), method)[0], rtol=1e-12)
    assert check_gradient(layer, bottom, top, max_checks=40) > 0


def test_overlapping_max_windows_accumulate():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 5.0
    layer, bottom, top, _ = run("Pooling", [x], pooling_param=pp((2, 2), (1, 1), pool="MAX"))
    top[0].set_diff(np.ones((1, 1, 2, 2)))
    layer.backward(top, [True], bottom)
    assert bottom[0].cpu_diff()[0, 0, 1, 1] == 4.0
    assert bottom[0].cpu_diff().sum() == 4.0


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("shape,k,s", [((2, 3, 8, 6), 2, 2),     # phases == the top's grid
                                       ((2, 3, 9, 9), 3, 2),     # overlapping windows
                                       ((2, 2, 7, 7), 1, 2)])    # kernel 1: phases without windows
def test_phased_backward_twice(method, shape, k, s, cpu_parts, cpu_path):
    """The phased backward overwrites each phase with its first window (the compiled one each
    plane): a second backward with another dy must not see the first one's values."""
    x = np.random.default_rng(7).standard_normal(shape)
    layer, bottom, top, (y,) = run("Pooling", [x], phase=TRAIN,
                                   pooling_param={"pool": method, "kernel_size": k, "stride": s})
    assert layer.phased
    assert len(layer.parts) == cpu_parts
    assert (layer.chunk == 1) == cpu_path.endswith("one-plane chunks")
    np.testing.assert_allclose(y, pool_ref(x, (k, k), (s, s), (0, 0), method)[0], rtol=1e-12)
    rs = np.random.default_rng(8)
    grads = []
    for _ in range(2):
        dy = rs.standard_normal(y.shape)
        top[0].set_diff(dy)
        layer.backward(top, [True], bottom)
        grads.append((dy, bottom[0].cpu_diff().copy()))
    fresh, fresh_bottom, fresh_top, _ = run("Pooling", [x], phase=TRAIN,
                                            pooling_param={"pool": method, "kernel_size": k, "stride": s})
    fresh_top[0].set_diff(grads[1][0])
    fresh.backward(fresh_top, [True], fresh_bottom)
    np.testing.assert_array_equal(grads[1][1], fresh_bottom[0].cpu_diff())
    assert check_gradient(layer, bottom, top, max_checks=40) > 0


def test_max_recompute_leaves_the_top_alone():
    """A TEST-phase forward keeps no argmax, so backward finds it again; it must not overwrite
    the top, which an in-place layer (ReLU after pooling) may have changed meanwhile."""
    x = np.random.default_rng(9).standard_normal((2, 3, 8, 8))
    layer, bottom, top, (y,) = run("Pooling", [x], pooling_param={"pool": "MAX", "kernel_size": 2,
                                                                  "stride": 2})
    assert layer.grid_is_top
    top[0].set_data(np.maximum(y, 0))                     # what an in-place ReLU leaves
    dy = np.random.default_rng(10).standard_normal(y.shape)
    top[0].set_diff(dy)
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(top[0].cpu_data(), np.maximum(y, 0))
    windows = x.reshape(2, 3, 4, 2, 4, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 4, 4, 4)
    hit = np.eye(4)[windows.argmax(axis=-1)]              # (2, 3, 4, 4, 4): the argmax offsets
    expected = (hit * dy[..., None]).reshape(2, 3, 4, 4, 2, 2).transpose(0, 1, 2, 4, 3, 5)
    np.testing.assert_array_equal(bottom[0].cpu_diff(), expected.reshape(x.shape))


def test_max_recompute_leaves_an_unphased_top_alone(layout):
    """As above for stride 1 (no phases): batch-first with no pad the top was the output."""
    x = np.random.default_rng(11).standard_normal((2, 3, 6, 6))
    param = {"pool": "MAX", "kernel_size": 2, "stride": 1}
    layer, bottom, top, (y,) = run("Pooling", [x], pooling_param=param)
    assert not layer.phased
    top[0].set_data(np.maximum(y, 0))
    dy = np.random.default_rng(12).standard_normal(y.shape)
    top[0].set_diff(dy)
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(top[0].cpu_data(), np.maximum(y, 0))
    trained, t_bottom, t_top, _ = run("Pooling", [x], phase=TRAIN, pooling_param=param)
    t_top[0].set_diff(dy)
    trained.backward(t_top, [True], t_bottom)
    np.testing.assert_array_equal(bottom[0].cpu_diff(), t_bottom[0].cpu_diff())


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(method):
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 5))
    layer, bottom, top, outs = run("Pooling", [x], num_top=2 if method == "MAX" else 1,
                                   pooling_param={"pool": method, "global_pooling": True})
    assert outs[0].shape == (2, 3, 1, 1)
    expected, mask = pool_ref(x, (4, 5), (1, 1), (0, 0), method)
    np.testing.assert_allclose(outs[0], expected, rtol=1e-12)
    if method == "MAX":
        np.testing.assert_array_equal(outs[1], mask)
    assert check_gradient(layer, bottom, top) > 0


@pytest.mark.parametrize("shape,k,s,p,ceil_mode,out", [
    ((1, 96, 55, 55), 3, 2, 0, True, 27),       # AlexNet pool1
    ((1, 256, 13, 13), 3, 2, 0, True, 6),       # AlexNet pool5
    ((1, 64, 112, 112), 3, 2, 0, True, 56),     # GoogLeNet pool1 (CEIL: 55.5 -> 56)
    ((1, 64, 112, 112), 3, 2, 0, False, 55),
    ((1, 20, 24, 24), 2, 2, 0, True, 12),       # LeNet
    ((1, 32, 32, 32), 3, 2, 0, True, 16),       # CIFAR-10 quick
    ((1, 3, 5, 5), 2, 2, 1, True, 3),           # ceil -> 4, last window starts in the pad -> 3
    ((1, 3, 6, 6), 3, 2, 1, True, 4),
])
def test_caffe_output_shapes(shape, k, s, p, ceil_mode, out):
    layer = make_layer("Pooling", pooling_param={"pool": "MAX", "kernel_size": k, "stride": s, "pad": p,
                                                 "round_mode": "CEIL" if ceil_mode else "FLOOR"})
    _, top = setup(layer, [np.zeros(shape, np.float32)])
    assert top[0].shape == shape[:2] + (out, out)


def test_stochastic_test_phase_is_weighted_average():
    x = np.abs(np.random.default_rng(2).standard_normal((2, 2, 4, 4)))
    x[0, 0, :2, :2] = 0  # a window summing to 0 gives 0
    _, _, _, (y,) = run("Pooling", [x], pooling_param={"pool": "STOCHASTIC", "kernel_size": 2, "stride": 2})
    windows = x.reshape(2, 2, 2, 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 2, 2, 2, 4)
    total = windows.sum(-1)
    expected = np.where(total > 0, (windows ** 2).sum(-1) / np.where(total > 0, total, 1), 0)
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    assert y[0, 0, 0, 0] == 0


def test_stochastic_train_samples_by_value_and_routes_gradient(layout):
    x = np.abs(np.random.default_rng(3).standard_normal((4, 3, 6, 6))) + 0.1
    x[:, :, 0, 0] = 1000.0  # the first window's sample is almost surely this pixel
    layer = make_layer("Pooling", phase=TRAIN, pooling_param={"pool": "STOCHASTIC", "kernel_size": 3,
                                                              "stride": 3})
    bottom, top = setup(layer, [x])
    (y,) = forward(layer, bottom, top)
    assert y.shape == (4, 3, 2, 2)
    windows = x.reshape(4, 3, 2, 3, 2, 3).transpose(0, 1, 2, 4, 3, 5).reshape(4, 3, 2, 2, 9)
    assert np.all((windows == y[..., None]).any(-1))       # every output is a pixel of its window
    np.testing.assert_array_equal(y[:, :, 0, 0], 1000.0)
    top[0].set_diff(np.ones(y.shape))
    layer.backward(top, [True], bottom)
    dx = bottom[0].cpu_diff()
    assert dx.sum() == y.size and set(np.unique(dx)) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.sort(x[dx == 1]), np.sort(y.reshape(-1)))
    # Frequencies follow the values: over many draws, pixel 2x as large is picked ~2x as often.
    z = np.array([[[[1.0, 2.0]]]]).repeat(4000, axis=0)
    layer = make_layer("Pooling", phase=TRAIN, pooling_param={"pool": "STOCHASTIC", "kernel_h": 1,
                                                              "kernel_w": 2, "stride": 2})
    bottom, top = setup(layer, [z])
    (y,) = forward(layer, bottom, top)
    assert 0.62 < np.mean(y == 2.0) < 0.71


@pytest.mark.parametrize("params,message", [
    ({"pool": "MAX"}, "kernel size is missing"),
    ({"pool": "MAX", "kernel_h": 2}, "kernel size is missing"),
    ({"pool": "MAX", "kernel_size": 2, "kernel_h": 2, "kernel_w": 2}, "not both"),
    ({"pool": "MAX", "global_pooling": True, "kernel_size": 2}, "global_pooling"),
    ({"pool": "MAX", "global_pooling": True, "stride": 2}, "global_pooling"),
    ({"pool": "MAX", "kernel_size": 2, "pad": 2}, "smaller than the kernel"),
    ({"pool": "MAX", "kernel_size": 3, "pad": 1, "pad_h": 1, "pad_w": 1}, "pad OR"),
    ({"pool": "MAX", "kernel_size": 3, "stride_h": 2}, "stride OR"),
    ({"pool": "MAX", "kernel_size": 0}, "zero"),
    ({"pool": "STOCHASTIC", "kernel_size": 3, "pad": 1}, "padding"),
    ({"pool": "MAX", "kernel_size": 9}, "output size"),
])
def test_config_errors(params, message):
    with pytest.raises(ConfigError, match=message) as info:
        run("Pooling", [np.zeros((1, 1, 5, 5))], pooling_param=params)
    assert "layer 'layer'" in str(info.value)


def test_mask_top_only_for_max():
    with pytest.raises(ConfigError, match="second"):
        run("Pooling", [np.zeros((1, 1, 4, 4))], num_top=2,
            pooling_param={"pool": "AVE", "kernel_size": 2, "stride": 2})


def test_needs_four_axes():
    with pytest.raises(ConfigError, match="4 axes"):
        run("Pooling", [np.zeros((1, 4, 4))], pooling_param={"pool": "MAX", "kernel_size": 2})


def test_float32_keeps_dtype():
    x = np.random.default_rng(4).standard_normal((2, 3, 7, 7)).astype(np.float32)
    for method in ("MAX", "AVE"):
        layer, bottom, top, (y,) = run("Pooling", [x], dtype=np.float32, pooling_param={
            "pool": method, "kernel_size": 3, "stride": 2, "pad": 1})
        assert y.dtype == np.float32
        expected, _ = pool_ref(x.astype(np.float64), (3, 3), (2, 2), (1, 1), method)
        np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
        top[0].set_diff(np.ones(y.shape, np.float32))
        layer.backward(top, [True], bottom)
        assert bottom[0].cpu_diff().dtype == np.float32


@pytest.mark.parametrize("name,bottom_name,params", [
    ("pool_max", "prelu_g", {"pool": "MAX", "kernel_size": 3, "stride": 2, "pad": 1}),
    ("pool_ave", "prelu_g", {"pool": "AVE", "kernel_size": 3, "stride": 2, "pad": 1}),
    ("gpool", "slice_b", {"pool": "AVE", "global_pooling": True}),
])
def test_matches_caffe(name, bottom_name, params):
    x = caffe_blob(bottom_name)
    expected = caffe_blob(name)
    _, _, _, (y,) = run("Pooling", [x], dtype=np.float32, pooling_param=params)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_max_backward_of_windows_without_a_maximum(cpu_path):
    """Windows of nothing but -inf take their first kernel offset, which may lie in the padding:
    its gradient is dropped (the compiled kernel checks the bounds instead of writing there)."""
    x = np.full((2, 3, 5, 5), -np.inf)
    x[0, 0, 2, 2] = 1.0
    layer, bottom, top, (y,) = run("Pooling", [x], phase=TRAIN,
                                   pooling_param={"pool": "MAX", "kernel_size": 3, "stride": 2, "pad": 1})
    top[0].set_diff(np.ones(y.shape))
    layer.backward(top, [True], bottom)
    dx = bottom[0].cpu_diff()
    # Windows (oh, ow) start at (2 oh - 1, 2 ow - 1): those starting in the padding send their
    # gradient nowhere, the others to that first pixel, or to the one real maximum.
    expected = np.zeros((5, 5))
    expected[1, 1] = expected[1, 3] = expected[3, 1] = expected[3, 3] = 1
    for plane in dx.reshape(-1, 5, 5)[1:]:
        np.testing.assert_array_equal(plane, expected)
    expected[1, 1], expected[2, 2] = 0, 1
    np.testing.assert_array_equal(dx[0, 0], expected)
