"""Net semantics: state rules, splits, in-place, loss weights, sharing, backward pruning."""
import numpy as np
import pytest

from caffelite import config
from caffelite.errors import ConfigError
from caffelite.layers.base import TEST, TRAIN
from caffelite.net import Net
from caffelite.net_state import filter_net, insert_splits, make_state, state_meets_rule
from caffelite.proto import pb


def net_from(yaml_text: str, **kwargs) -> Net:
    return Net(config.parse_net(yaml_text), **kwargs)


def rule(**fields):
    return pb.NetStateRule(**fields)


# ---- NetState rules -----------------------------------------------------------------
def test_state_rules():
    state = make_state(TRAIN, 2, ["a", "b"])
    assert state_meets_rule(state, rule(phase=TRAIN))
    assert not state_meets_rule(state, rule(phase=TEST))
    assert state_meets_rule(state, rule(min_level=2, max_level=2))
    assert not state_meets_rule(state, rule(min_level=3))
    assert not state_meets_rule(state, rule(max_level=1))
    assert state_meets_rule(state, rule(stage=["a", "b"]))
    assert not state_meets_rule(state, rule(stage=["a", "c"]))
    assert not state_meets_rule(state, rule(not_stage=["b"]))
    assert state_meets_rule(state, rule(not_stage=["c"]))


def test_filter_include_exclude():
    param = config.parse_net("""
layer:
  - {name: a, type: Input, include: {phase: TRAIN}}
  - {name: b, type: Input, include: [{phase: TEST}, {stage: deploy}]}
  - {name: c, type: Input, exclude: {phase: TEST}}
  - {name: d, type: Input}
""")
    names = lambda state: [l.name for l in filter_net(param, state).layer]  # noqa: E731
    assert names(make_state(TRAIN)) == ["a", "c", "d"]
    assert names(make_state(TEST)) == ["b", "d"]
    assert names(make_state(TRAIN, 0, ["deploy"])) == ["a", "b", "c", "d"]


def test_include_and_exclude_together_is_an_error():
    param = config.parse_net("layer: [{name: a, type: Input, include: {phase: TRAIN}, exclude: {phase: TEST}}]")
    with pytest.raises(ConfigError, match="both include and exclude"):
        filter_net(param, make_state(TRAIN))


# ---- splits ------------------------------------------------------------------------------
def test_insert_splits_names_and_loss_weight():
    param = config.parse_net("""
layer:
  - {name: data, type: Input, top: x}
  - {name: ip, type: InnerProduct, bottom: x, top: y, loss_weight: 2}
  - {name: relu, type: ReLU, bottom: y, top: z}
  - {name: sig, type: Sigmoid, bottom: x, top: w}
""")
    out = insert_splits(param)
    assert [l.name for l in out.layer] == ["data", "x_data_0_split", "ip", "y_ip_0_split", "relu", "sig"]
    x_split = out.layer[1]
    assert list(x_split.top) == ["x_data_0_split_0", "x_data_0_split_1"]
    assert out.layer[2].bottom[0] == "x_data_0_split_0"
    assert out.layer[5].bottom[0] == "x_data_0_split_1"
    y_split = out.layer[3]
    assert list(y_split.loss_weight) == [2, 0]
    assert len(out.layer[2].loss_weight) == 0
    assert out.layer[4].bottom[0] == "y_ip_0_split_1"


NET = """
name: tiny
layer:
  - {name: data, type: Input, top: [x, t], input_param: {shape: [{dim: [4, 3]}, {dim: [4, 2]}]}}
  - {name: ip1, type: InnerProduct, bottom: x, top: h,
     inner_product_param: {num_output: 5, weight_filler: {type: gaussian, std: 0.5}, bias_filler: {type: gaussian}}}
  - {name: relu, type: ReLU, bottom: h, top: h}
  - {name: ip2, type: InnerProduct, bottom: h, top: y,
     inner_product_param: {num_output: 2, weight_filler: {type: gaussian, std: 0.5}}}
  - {name: loss, type: EuclideanLoss, bottom: [y, t], top: loss}
"""


def make_tiny(text=NET, **kwargs):
    net = net_from(text, seed=3, **kwargs)
    rs = np.random.default_rng(0)
    for name in ("x", "t"):
        net.blobs[name].set_data(rs.standard_normal(net.blobs[name].shape))
    return net


def test_in_place_and_outputs():
    net = make_tiny()
    assert "h" in net.blobs and net.top_vecs[2][0] is net.bottom_vecs[2][0]
    assert net.output_blob_names == ["loss"]
    loss = net.forward()
    y = net.blobs["y"].cpu_data()
    t = net.blobs["t"].cpu_data()
    assert loss == pytest.approx(np.sum((y - t) ** 2) / 4 / 2, rel=1e-5)


def test_backward_pruning_and_param_gradient_accumulates():
    net = make_tiny()
    # Data layer tops need no gradient; every other layer feeds the loss.
    assert net.layer_need_backward == [False, True, True, True, True]
    net.clear_param_diffs()
    net.forward_backward()
    first = net.params["ip1"][0].cpu_diff().copy()
    assert np.any(first != 0)
    net.forward_backward()  # backward ADDS into parameter diffs
    np.testing.assert_allclose(net.params["ip1"][0].cpu_diff(), 2 * first, rtol=1e-6)


def test_lr_mult_zero_means_no_backward():
    text = NET.replace("bottom: x, top: h,", "bottom: x, top: h, param: [{lr_mult: 0}, {lr_mult: 0}],")
    net = make_tiny(text)
    assert net.layer_need_backward[1] is False
    assert net.params_lr[:2] == [0.0, 0.0]


def test_force_backward_reaches_data_but_not_labels():
    net = make_tiny("force_backward: true\n" + NET)
    assert all(net.layer_need_backward)
    loss_layer = net.layer_names.index("loss")
    # EuclideanLoss allows both bottoms to be forced; a SoftmaxWithLoss label would not be.
    assert net.bottom_need_backward[loss_layer] == [True, True]
    net.forward_backward()
    assert np.any(net.blobs["x"].cpu_diff() != 0)


def test_propagate_down_false_stops_a_bottom():
    text = NET.replace("bottom: [y, t], top: loss", "bottom: [y, t], top: loss, propagate_down: [false, false]")
    net = make_tiny(text)
    # As in Caffe, the loss layer itself still runs (with nothing to propagate); nothing below it does.
    assert net.layer_need_backward == [False, False, False, False, True]
    assert net.bottom_need_backward[-1] == [False, False]


def test_loss_weight_scales_loss_and_gradients():
    base = make_tiny()
    base.clear_param_diffs()
    loss1 = base.forward_backward()
    g1 = base.params["ip2"][0].cpu_diff().copy()
    heavy = make_tiny(NET.replace("top: loss}", "top: loss, loss_weight: 3}"))
    heavy.clear_param_diffs()
    loss3 = heavy.forward_backward()
    assert loss3 == pytest.approx(3 * loss1, rel=1e-6)
    np.testing.assert_allclose(heavy.params["ip2"][0].cpu_diff(), 3 * g1, rtol=1e-5)


SHARED = """
layer:
  - {name: data, type: Input, top: [x, t], input_param: {shape: [{dim: [4, 3]}, {dim: [4, 3]}]}}
  - {name: a, type: InnerProduct, bottom: x, top: y1, param: [{name: w}, {name: b}],
     inner_product_param: {num_output: 3, weight_filler: {type: gaussian}}}
  - {name: b, type: InnerProduct, bottom: y1, top: y2, param: [{name: w}, {name: b}],
     inner_product_param: {num_output: 3, weight_filler: {type: gaussian}}}
  - {name: loss, type: EuclideanLoss, bottom: [y2, t], top: loss}
"""


def test_parameter_sharing():
    net = make_tiny(SHARED)
    assert len(net.learnable_params) == 2
    wa, wb = net.params["a"][0], net.params["b"][0]
    np.testing.assert_array_equal(wa.cpu_data(), wb.cpu_data())
    wa.mutable_cpu_data()[0, 0] = 42.0
    assert wb.cpu_data()[0, 0] == 42.0
    net.clear_param_diffs()
    net.forward_backward()
    # One diff holds the sum of both layers' gradients.
    assert wa.cpu_diff() is not None and np.shares_memory(wa.cpu_diff(), wb.cpu_diff())


def test_sharing_shape_mismatch_is_an_error():
    text = SHARED.replace("bottom: y1, top: y2, param: [{name: w}, {name: b}],\n     inner_product_param: {num_output: 3",
                          "bottom: y1, top: y2, param: [{name: w}, {name: b}],\n     inner_product_param: {num_output: 4")
    with pytest.raises(ConfigError, match="cannot share param 'w'"):
        make_tiny(text)


@pytest.mark.parametrize("text, message", [
    ("layer: [{name: a, type: Nope}]", "unknown layer type 'Nope'"),
    ("layer: [{name: a, type: ReLU, bottom: x, top: y}]", "bottom 'x' is not produced"),
    ("layer: [{name: a, type: Input, top: x, input_param: {shape: {dim: 1}}},"
     " {name: b, type: Input, top: x, input_param: {shape: {dim: 1}}}]", "produced by more than one layer"),
])
def test_build_errors_name_the_layer(text, message):
    with pytest.raises(ConfigError, match=message):
        net_from(text)


def test_error_names_file_and_line(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text("name: x\nlayer:\n  - {name: a, type: Input, top: x, input_param: {shape: {dim: 1}}}\n"
                    "  - {name: bad, type: ReLU, bottom: nothing, top: y}\n")
    with pytest.raises(ConfigError) as info:
        Net(config.load_net(path), source=str(path))
    text = str(info.value)
    assert f"{path}:4" in text and "layer 'bad'" in text


def test_to_proto_round_trip_and_copy():
    net = make_tiny()
    proto = net.to_proto()
    other = make_tiny()
    other.params["ip1"][0].set_data(0)
    other.copy_trained_layers_from(proto)
    np.testing.assert_array_equal(other.params["ip1"][0].cpu_data(), net.params["ip1"][0].cpu_data())


def test_copy_shape_mismatch_says_rename():
    proto = make_tiny().to_proto()
    wider = make_tiny(NET.replace("num_output: 5", "num_output: 6"))
    with pytest.raises(ConfigError, match="rename the layer"):
        wider.copy_trained_layers_from(proto)
