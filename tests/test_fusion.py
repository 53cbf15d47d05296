"""BatchNorm + in-place Scale fused on a GPU (caffelite/fusion.py): which pairs fuse (checked on
every device), and on a GPU a fused net computes what the unfused net computes, forward and
backward, in TRAIN and TEST (skipped cleanly without CuPy and a GPU)."""
import numpy as np
import pytest
from google.protobuf import text_format

from caffelite import debug_info, fusion
from caffelite.backend import CPU, Device
from caffelite.layers.base import TEST, TRAIN
from caffelite.net import Net
from caffelite.proto import pb
from conftest import gpu_ready

def on_gpu(test):
    test = pytest.mark.skipif(not gpu_ready(), reason="no GPU: CuPy is not installed or no CUDA "
                                                      "device is visible")(test)
    return pytest.mark.gpu(test)


def net_text(bn_top="c", scale_top="c", scale_param="bias_term: true", extra="", frozen=False):
    """conv -> BatchNorm (c -> bn_top) -> Scale (bn_top -> scale_top) -> ReLU -> InnerProduct;
    ``frozen``: conv and Scale not learned (lr_mult 0), so nothing below ip needs a backward."""
    freeze = "param { lr_mult: 0 } param { lr_mult: 0 }" if frozen else ""
    return f"""
name: "fuse"
layer {{ name: "data" type: "Input" top: "x" top: "t" input_param {{ shape {{ dim: 4 dim: 3 dim: 6 dim: 5 }}
                                                                 shape {{ dim: 4 dim: 2 }} }} }}
layer {{ name: "conv" type: "Convolution" bottom: "x" top: "c" {freeze}
        convolution_param {{ num_output: 6 kernel_size: 3 pad: 1 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "bn" type: "BatchNorm" bottom: "c" top: "{bn_top}" }}
layer {{ name: "scale" type: "Scale" bottom: "{bn_top}" top: "{scale_top}" {freeze}
        scale_param {{ {scale_param} filler {{ type: "uniform" min: 0.5 max: 1.5 }}
                      bias_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "{scale_top}" top: "{scale_top}" }}
layer {{ name: "ip" type: "InnerProduct" bottom: "{scale_top}" top: "y"
        inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
{extra}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }}
"""


def build(text, phase=TRAIN, device=CPU, seed=5):
    return Net(text_format.Parse(text, pb.NetParameter()), phase=phase, device=device, seed=seed)


# ---- which pairs fuse (device-independent) -----------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    (net_text(), True),
    (net_text(bn_top="n", scale_top="n"), True),  # BatchNorm not in place
    (net_text(scale_param="bias_term: false"), True),
    (net_text(bn_top="n", scale_top="s"), False),  # Scale not in place: BatchNorm's output is seen
    (net_text(scale_param="bias_term: true axis: 2"), False),  # not per channel
    # Another reader of the blob comes after the in-place layers: it sees Scale's output anyway.
    (net_text(extra='layer { name: "spy" type: "Reduction" bottom: "c" top: "s" }'), True),
], ids=["in-place", "batch-norm-not-in-place", "no-bias", "scale-not-in-place", "axis-2", "read-later"])
def test_which_pairs_fuse(text, expected):
    net = build(text)
    assert fusion.fusable(net, net.layer_names.index("bn")) == expected
    assert not fusion.fusable(net, net.layer_names.index("conv"))


def test_global_statistics_fuse_only_when_scale_needs_no_backward():
    # Scale's gradient needs the normalised x, which BatchNorm keeps only with batch statistics.
    assert not fusion.fusable(build(net_text(), phase=TEST), 2)
    assert fusion.fusable(build(net_text(frozen=True), phase=TEST), 2)


def test_nothing_fuses_on_the_cpu():
    net = build(net_text())
    assert fusion.fuse(net) == 0
    assert net.layer_by_name["bn"].fused_scale is None


# ---- on a GPU: fused equals unfused -------------------------------------------------------------
def run(net, x, t):
    net.blobs["x"].set_data(x)
    net.blobs["t"].set_data(t)
    net.clear_param_diffs()
    loss = net.forward()
    net.backward()
    tops = {name: net.blobs[name].cpu_data().copy() for name in ("c", "y")}
    diffs = [p.cpu_diff().copy() for p in net.learnable_params]
    stats = [b.cpu_data().copy() for b in net.layer_by_name["bn"].blobs]
    return loss, tops, diffs, stats


@pytest.mark.parametrize("phase, frozen, scale_param", [
    (TRAIN, False, "bias_term: true"), (TRAIN, False, "bias_term: false"),
    (TEST, True, "bias_term: true"),  # global statistics: fused only without a backward below ip
], ids=["train", "train-no-bias", "test-frozen"])
@on_gpu
def test_fused_pair_computes_what_the_layers_compute(monkeypatch, phase, frozen, scale_param):
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((4, 3, 6, 5)) * 2 + 1, rng.standard_normal((4, 2))
    text = net_text(scale_param=scale_param, frozen=frozen)
    results = []
    for enabled in ("1", "0"):
        monkeypatch.setenv("CAFFELITE_FUSE", enabled)
        net = build(text, phase=phase, device=Device.gpu(0))
        bn = net.layer_by_name["bn"]
        for blob, value in zip(bn.blobs, ([0.5] * 6, [2.0] * 6, [1.0])):  # statistics for TEST
            blob.set_data(np.asarray(value))
        assert (bn.fused_scale is not None) == (enabled == "1")
        results.append(run(net, x, t))
        net.close()
    fused, plain = results
    assert fused[0] == pytest.approx(plain[0], rel=1e-5)
    for name in fused[1]:
        np.testing.assert_allclose(fused[1][name], plain[1][name], rtol=1e-5, atol=1e-5)
    for a, b in zip(fused[2] + fused[3], plain[2] + plain[3]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@on_gpu
def test_pairs_fuse_on_the_gpu_and_debug_info_unfuses():
    net = build(net_text(), device=Device.gpu(0))
    bn, scale = net.layer_by_name["bn"], net.layer_by_name["scale"]
    assert bn.fused_scale is scale and scale.fused_into is bn
    debug_info.attach(net)
    assert bn.fused_scale is None and scale.fused_into is None
    net.close()
