"""NetSpec: pycaffe-style net building in Python, emitted as a NetParameter or YAML."""
import numpy as np
import pytest

import caffelite
from caffelite import config
from caffelite.errors import ConfigError
from caffelite.net import Net
from caffelite.net_spec import NetSpec, layers as L, params as P, to_proto
from caffelite.proto import pb
from conftest import FIXTURES, REPO

MNIST = FIXTURES / "mnist"


def lenet(train_source: str, test_source: str) -> NetSpec:
    """configs/lenet/lenet_train_test.yaml, written with NetSpec."""
    n = NetSpec(name="LeNet")
    transform = dict(scale=0.00390625)
    n.data, n.label = L.Data(name="mnist", include=dict(phase=caffelite.TRAIN), transform_param=transform,
                             source=train_source, batch_size=64, backend=P.Data.LMDB, ntop=2)
    n.data, n.label = L.Data(name="mnist", include={"phase": "TEST"}, transform_param=transform,
                             source=test_source, batch_size=100, backend="LMDB", ntop=2)
    lr = [dict(lr_mult=1), dict(lr_mult=2)]
    fillers = dict(weight_filler=dict(type="xavier"), bias_filler=dict(type="constant"))
    n.conv1 = L.Convolution(n.data, param=lr, num_output=20, kernel_size=5, stride=1, **fillers)
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.conv2 = L.Convolution(n.pool1, param=lr, num_output=50, kernel_size=5, stride=1, **fillers)
    n.pool2 = L.Pooling(n.conv2, pool="MAX", kernel_size=2, stride=2)
    n.ip1 = L.InnerProduct(n.pool2, param=lr, num_output=500, **fillers)
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, param=lr, num_output=10, **fillers)
    n.accuracy = L.Accuracy(n.ip2, n.label, include=dict(phase=caffelite.TEST))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n


def test_lenet_equals_the_shipped_config():
    n = lenet("../../data/mnist/mnist_train_lmdb", "../../data/mnist/mnist_test_lmdb")
    text = n.to_yaml()
    want = config.parse_net((REPO / "configs" / "lenet" / "lenet_train_test.yaml").read_text())
    assert config.parse_net(text) == want
    assert n.to_proto() == want
    assert config.parse_net(n.to_prototxt(), "prototxt") == want


def test_lenet_from_yaml_builds_and_runs():
    n = lenet(str(MNIST / "mnist_train_lmdb"), str(MNIST / "mnist_test_lmdb"))
    param = config.parse_net(n.to_yaml())
    net = Net(param, phase=caffelite.TEST)
    try:
        assert net.layer_names == ["mnist", "label_mnist_1_split", "conv1", "pool1", "conv2", "pool2",
                                   "ip1", "relu1", "ip2", "ip2_ip2_0_split", "accuracy", "loss"]
        assert net.blobs["pool2"].shape == (100, 50, 4, 4)
        assert [b.shape for b in net.params["ip1"]] == [(500, 800), (500,)]
        loss = net.forward()
        assert np.isfinite(loss) and 0 <= float(net.blobs["accuracy"].cpu_data()) <= 1
    finally:
        net.close()


def test_keywords_go_to_the_right_messages():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 8, 8]))
    n.label = L.Input(shape=[dict(dim=[2])])
    n.deconv = L.Deconvolution(n.data, num_output=4, kernel_size=2, stride=2, bias_term=False,
                               param=dict(lr_mult=0), propagate_down=[True])
    n.loss = L.SoftmaxWithLoss(n.deconv, n.label, axis=1, ignore_label=3, normalize=True,
                               loss_weight=2, propagate_down=[True, False])
    n.silence = L.Silence(n.data, ntop=0)
    param = n.to_proto()
    data, label, deconv, loss, silence = param.layer
    assert list(data.input_param.shape[0].dim) == [2, 3, 8, 8]
    assert list(label.input_param.shape[0].dim) == [2]
    assert deconv.convolution_param.num_output == 4 and list(deconv.convolution_param.kernel_size) == [2]
    assert deconv.convolution_param.bias_term is False and deconv.param[0].lr_mult == 0
    assert loss.softmax_param.axis == 1
    assert loss.loss_param.ignore_label == 3 and loss.loss_param.normalize
    assert list(loss.loss_weight) == [2] and list(loss.propagate_down) == [True, False]
    assert silence.name == "silence" and list(silence.bottom) == ["data"] and not silence.top
    assert silence.type == "Silence"


def test_names_in_place_and_autonames():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    hidden = L.InnerProduct(n.data, num_output=3)  # never assigned: auto-named
    n.act = L.ReLU(hidden, in_place=True)
    top_a, top_b = L.Slice(n.act, slice_point=1, ntop=2)
    n.first = top_a
    n.out = L.Concat(top_a, L.TanH(top_b), axis=1)
    layers = {lp.name: lp for lp in n.to_proto().layer}
    assert list(layers) == ["data", "InnerProduct1", "act", "first", "TanH1", "out"]
    assert list(layers["InnerProduct1"].top) == ["InnerProduct1"]
    assert list(layers["act"].bottom) == list(layers["act"].top) == ["InnerProduct1"]
    assert list(layers["first"].top) == ["first", "first_1"]
    assert list(layers["TanH1"].bottom) == ["first_1"]
    assert layers["out"].concat_param.axis == 1
    net = Net(n.to_proto())
    assert net.blobs["out"].shape == (1, 3)


def test_to_proto_of_tops():
    data = L.Input(shape=dict(dim=[1, 4]))
    out = L.Sigmoid(L.InnerProduct(data, num_output=2))
    param = to_proto(out, name="tiny")
    assert param.name == "tiny" and [lp.type for lp in param.layer] == ["Input", "InnerProduct", "Sigmoid"]
    assert out.to_proto() == pb.NetParameter(layer=param.layer)


def test_a_residual_block():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 8, 6, 6]))
    n.conv = L.Convolution(n.data, num_output=8, kernel_size=3, pad=1, bias_term=False,
                           weight_filler=dict(type="msra"))
    n.bn = L.BatchNorm(n.conv, in_place=True)
    n.scale = L.Scale(n.bn, bias_term=True, in_place=True)
    n.relu = L.ReLU(n.scale, in_place=True)
    n.sum = L.Eltwise(n.data, n.relu, operation=P.Eltwise.SUM, coeff=[1, 0.5])
    net = caffelite.Net(n.to_proto())
    x = np.random.default_rng(0).standard_normal((2, 8, 6, 6)).astype(np.float32)
    out = net.forward(data=x)["sum"]
    conv = net.blobs["conv"].data  # conv after BN, Scale and ReLU in place
    np.testing.assert_allclose(out, x + 0.5 * conv, rtol=1e-5, atol=1e-6)
    assert [lp.name for lp in n.to_proto().layer] == ["data", "conv", "bn", "scale", "relu", "sum"]


def test_unknown_keyword_is_a_config_error():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    n.ip = L.InnerProduct(n.data, num_ouput=3)
    with pytest.raises(ConfigError) as info:
        n.to_proto()
    assert "num_ouput" in str(info.value) and "num_output" in str(info.value)


def test_keyword_of_another_message_gives_a_hint():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    n.ip = L.InnerProduct(n.data, num_output=3, mean_file="x")
    with pytest.raises(ConfigError, match="transform_param"):
        n.to_proto()


def test_bad_values():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    n.pool = L.Pooling(n.data, pool="MAXIMUM")
    with pytest.raises(ConfigError, match="MAXIMUM"):
        n.to_proto()
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    n.ip = L.InnerProduct(n.data, num_output="three")
    with pytest.raises(ConfigError, match="three"):
        n.to_proto()
    with pytest.raises(ConfigError, match="expected a layer's top"):
        n.x = 3
    with pytest.raises(ConfigError, match="not a top"):
        L.ReLU("data")


def test_params_enums():
    assert P.Pooling.AVE == 1 and P.Eltwise.PROD == 0 and P.Loss.VALID == 1
    assert P.Data.LMDB == 1 and P.LRN.WITHIN_CHANNEL == 1
    with pytest.raises(AttributeError):
        P.Pooling.MEDIAN  # noqa: B018
    assert caffelite.L is L and caffelite.P is P
