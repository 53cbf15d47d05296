"""The shared scratch arena (im2col.ARENA): layers take their per-call buffers from it."""
import numpy as np
import pytest

from caffelite import config
from caffelite.layers import conv_dft, convolution, cpu_kernels
from caffelite.layers.base import TRAIN
from caffelite.layers.im2col import Arena, fill_outside
from caffelite.net import Net

# One layer of every engine that takes scratch from the arena: columns, or flat without the
# compiled kernels (conv1: 3 channels), DFT (conv2: 5x5, many channels, forced below),
# im2col + GEMM (conv3: stride 2), phased MAX pooling, AVE pooling, both LRN regions.
NET = """
name: arena
layer:
  - {name: data, type: Input, top: data, input_param: {shape: {dim: [%(n)d, 3, 20, 20]}}}
  - {name: target, type: Input, top: target, input_param: {shape: {dim: [%(n)d, 8, 2, 2]}}}
  - {name: conv1, type: Convolution, bottom: data, top: conv1,
     convolution_param: {num_output: 16, kernel_size: 3, pad: 1,
                         weight_filler: {type: gaussian, std: 0.1}, bias_filler: {type: gaussian}}}
  - {name: pool1, type: Pooling, bottom: conv1, top: pool1,
     pooling_param: {pool: MAX, kernel_size: 3, stride: 2}}
  - {name: norm1, type: LRN, bottom: pool1, top: norm1, lrn_param: {local_size: 3}}
  - {name: conv2, type: Convolution, bottom: norm1, top: conv2,
     convolution_param: {num_output: 16, kernel_size: 5, pad: 2,
                         weight_filler: {type: gaussian, std: 0.1}, bias_filler: {type: gaussian}}}
  - {name: norm2, type: LRN, bottom: conv2, top: norm2,
     lrn_param: {local_size: 3, norm_region: WITHIN_CHANNEL}}
  - {name: conv3, type: Convolution, bottom: norm2, top: conv3,
     convolution_param: {num_output: 8, kernel_size: 3, stride: 2,
                         weight_filler: {type: gaussian, std: 0.1}}}
  - {name: pool2, type: Pooling, bottom: conv3, top: pool2,
     pooling_param: {pool: AVE, kernel_size: 2, stride: 2}}
  - {name: loss, type: EuclideanLoss, bottom: [pool2, target], top: loss}
"""


def _net(n: int) -> Net:
    net = Net(config.parse_net(NET % {"n": n}), phase=TRAIN, seed=7, dtype=np.float64)
    rng = np.random.default_rng(n)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    net.blobs["target"].data[...] = rng.standard_normal(net.blobs["target"].shape)
    return net


def _results(net: Net) -> list:
    return ([net.blobs[name].data.copy() for name in ("conv1", "pool1", "conv2", "pool2")]
            + [net.blobs["data"].diff.copy()] + [p.diff.copy() for p in net.learnable_params])


@pytest.fixture(params=["compiled", "numpy"])
def kernels(request, monkeypatch):
    """With the compiled CPU kernels (cpu_kernels.py) and without."""
    if request.param == "numpy":
        monkeypatch.setattr(cpu_kernels, "LIB", None)
    return request.param


def test_engines_as_configured(monkeypatch, kernels):
    monkeypatch.setattr(convolution, "FORCE_ENGINE", None)
    monkeypatch.setattr(conv_dft, "DFT_ADVANTAGE", 1e9)
    net = _net(12)
    layers = dict(zip(net.layer_names, net.layers))
    first = layers["conv1"].compiled if kernels == "compiled" else layers["conv1"].flat
    assert first is not None and layers["conv1"].cpu_engine is first
    assert layers["conv2"].dft is not None
    assert layers["conv3"].cpu_engine is None


def _fresh(self, shape, dtype, fill=None, role=None):
    """Arena.get without sharing: a new array per request, never zero unless asked."""
    return np.full(shape, 77 if fill is None else fill, dtype)


def test_interleaved_nets_match_unshared_buffers(monkeypatch, kernels):
    """With the arena, and another net running between a forward and its backward (so all the
    shared scratch is overwritten), the results equal those with a fresh array per request:
    nothing a layer reads was left in the arena by an earlier call."""
    monkeypatch.setattr(conv_dft, "DFT_ADVANTAGE", 1e9)   # (conv2 on the DFT engine)
    with monkeypatch.context() as patch:
        patch.setattr(Arena, "get", _fresh)
        alone = _net(12)
        alone.clear_param_diffs()
        alone.forward_backward()
        expected = _results(alone)

    first, other = _net(12), _net(16)   # (a larger batch: larger scratch)
    first.clear_param_diffs()
    other.clear_param_diffs()
    first.forward()
    other.forward_backward()
    first.backward()
    for got, want in zip(_results(first), expected):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_scope_reuses_memory_and_roles():
    arena = Arena()
    for call in range(2):   # the first call sizes the block, the second runs in it
        with arena.scope():
            a = arena.get((100,), np.float32, fill=1)
            assert arena.get((100,), np.float32, role="r") is arena.get((100,), np.float32, role="r")
            b = arena.get((10,), np.float64)
            assert not np.shares_memory(a, b)
            with arena.scope():
                inner = arena.get((50,), np.float32)
            again = arena.get((50,), np.float32)
            assert (a == 1).all()
    assert arena.nbytes() >= arena.high
    assert np.shares_memory(inner, again)   # the inner scope's memory went back
    assert np.shares_memory(a, arena.block)


def test_get_outside_a_scope_is_an_error():
    try:
        Arena().get((1,), np.float32)
    except RuntimeError:
        return
    raise AssertionError("no error")


def test_fill_outside_sets_only_the_border():
    a = np.zeros((2, 5, 6))
    fill_outside(a, (slice(None), slice(1, 4), slice(2, 3)), 7)
    expected = np.full((2, 5, 6), 7.0)
    expected[:, 1:4, 2:3] = 0
    np.testing.assert_array_equal(a, expected)
    b = np.ones(3)
    fill_outside(b, (slice(0, 0),), 0)   # (an empty box: everything)
    assert not b.any()
