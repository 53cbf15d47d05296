"""Model-zoo style deploy nets (AlexNet, CaffeNet, GoogLeNet, VGG-16, ResNet-50) build with
Caffe's blob shapes and parameter counts; written here as prototxt generators in the BVLC style.

The nets are built without a forward pass. Their weights use Caffe's default filler
(constant 0), swapped for a broadcast view in this file so 138M parameters cost one write,
not a float64 temporary. ResNet-50 and GoogLeNet are also exported to ONNX (random weights)
and checked against caffelite with onnxruntime when it is installed.
"""
import re

import numpy as np
import pytest

from caffelite import config
from caffelite.net import Net
from caffelite.registry import FILLERS
from caffelite.yaml_writer import message_to_yaml


@pytest.fixture(autouse=True)
def cheap_constant_filler(monkeypatch):
    FILLERS.names()  # load the built-in fillers before replacing one
    monkeypatch.setitem(FILLERS._entries, "constant",
                        lambda param, shape, rng: np.broadcast_to(np.float32(param.value), shape))


# ---- prototxt generators, BVLC style ---------------------------------------------------------
def _input(shape):
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}\n'


def conv(name, bottom, num, k, stride=1, pad=0, group=1, bias=True, top=None):
    top = top or name
    extra = f" stride: {stride}" if stride != 1 else ""
    extra += f" pad: {pad}" if pad else ""
    extra += f" group: {group}" if group != 1 else ""
    extra += "" if bias else " bias_term: false"
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top}"\n'
            f'  param {{ lr_mult: 1 decay_mult: 1 }}' + (' param { lr_mult: 2 decay_mult: 0 }' if bias else '') +
            f'\n  convolution_param {{ num_output: {num} kernel_size: {k}{extra} }} }}\n')


def relu(name, blob):
    return f'layer {{ name: "{name}" type: "ReLU" bottom: "{blob}" top: "{blob}" }}\n'


def pool(name, bottom, k, s, method="MAX", pad=0, top=None):
    extra = f" pad: {pad}" if pad else ""
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{top or name}"\n'
            f'  pooling_param {{ pool: {method} kernel_size: {k} stride: {s}{extra} }} }}\n')


def lrn(name, bottom):
    return (f'layer {{ name: "{name}" type: "LRN" bottom: "{bottom}" top: "{name}"\n'
            f'  lrn_param {{ local_size: 5 alpha: 0.0001 beta: 0.75 }} }}\n')


def fc(name, bottom, num):
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}"\n'
            f'  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}\n'
            f'  inner_product_param {{ num_output: {num} }} }}\n')


def drop(name, blob, ratio=0.5):
    return (f'layer {{ name: "{name}" type: "Dropout" bottom: "{blob}" top: "{blob}"\n'
            f'  dropout_param {{ dropout_ratio: {ratio} }} }}\n')


def softmax(bottom):
    return f'layer {{ name: "prob" type: "Softmax" bottom: "{bottom}" top: "prob" }}\n'


def alexnet(caffenet=False, batch=10):
    t = f'name: "{"CaffeNet" if caffenet else "AlexNet"}"\n' + _input((batch, 3, 227, 227))
    t += conv("conv1", "data", 96, 11, stride=4) + relu("relu1", "conv1")
    if caffenet:
        t += pool("pool1", "conv1", 3, 2) + lrn("norm1", "pool1")
        t += conv("conv2", "norm1", 256, 5, pad=2, group=2) + relu("relu2", "conv2")
        t += pool("pool2", "conv2", 3, 2) + lrn("norm2", "pool2")
        t += conv("conv3", "norm2", 384, 3, pad=1)
    else:
        t += lrn("norm1", "conv1") + pool("pool1", "norm1", 3, 2)
        t += conv("conv2", "pool1", 256, 5, pad=2, group=2) + relu("relu2", "conv2")
        t += lrn("norm2", "conv2") + pool("pool2", "norm2", 3, 2)
        t += conv("conv3", "pool2", 384, 3, pad=1)
    t += relu("relu3", "conv3")
    t += conv("conv4", "conv3", 384, 3, pad=1, group=2) + relu("relu4", "conv4")
    t += conv("conv5", "conv4", 256, 3, pad=1, group=2) + relu("relu5", "conv5")
    t += pool("pool5", "conv5", 3, 2)
    t += fc("fc6", "pool5", 4096) + relu("relu6", "fc6") + drop("drop6", "fc6")
    t += fc("fc7", "fc6", 4096) + relu("relu7", "fc7") + drop("drop7", "fc7")
    t += fc("fc8", "fc7", 1000) + softmax("fc8")
    return t


def vgg16(batch=1):
    t = 'name: "VGG_ILSVRC_16_layers"\n' + _input((batch, 3, 224, 224))
    bottom = "data"
    for stage, (n, width) in enumerate([(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)], 1):
        for i in range(1, n + 1):
            name = f"conv{stage}_{i}"
            t += conv(name, bottom, width, 3, pad=1) + relu(f"relu{stage}_{i}", name)
            bottom = name
        t += pool(f"pool{stage}", bottom, 2, 2)
        bottom = f"pool{stage}"
    t += fc("fc6", "pool5", 4096) + relu("relu6", "fc6") + drop("drop6", "fc6")
    t += fc("fc7", "fc6", 4096) + relu("relu7", "fc7") + drop("drop7", "fc7")
    t += fc("fc8", "fc7", 1000) + softmax("fc8")
    return t


INCEPTION = {  # name: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj)
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128), "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


def inception(name, bottom):
    a, b_red, b, c_red, c, d = INCEPTION[name]
    p = f"inception_{name}"
    t = conv(f"{p}/1x1", bottom, a, 1) + relu(f"{p}/relu_1x1", f"{p}/1x1")
    t += conv(f"{p}/3x3_reduce", bottom, b_red, 1) + relu(f"{p}/relu_3x3_reduce", f"{p}/3x3_reduce")
    t += conv(f"{p}/3x3", f"{p}/3x3_reduce", b, 3, pad=1) + relu(f"{p}/relu_3x3", f"{p}/3x3")
    t += conv(f"{p}/5x5_reduce", bottom, c_red, 1) + relu(f"{p}/relu_5x5_reduce", f"{p}/5x5_reduce")
    t += conv(f"{p}/5x5", f"{p}/5x5_reduce", c, 5, pad=2) + relu(f"{p}/relu_5x5", f"{p}/5x5")
    t += pool(f"{p}/pool", bottom, 3, 1, pad=1)
    t += conv(f"{p}/pool_proj", f"{p}/pool", d, 1) + relu(f"{p}/relu_pool_proj", f"{p}/pool_proj")
    t += (f'layer {{ name: "{p}/output" type: "Concat" bottom: "{p}/1x1" bottom: "{p}/3x3" '
          f'bottom: "{p}/5x5" bottom: "{p}/pool_proj" top: "{p}/output" }}\n')
    return t, f"{p}/output"


def googlenet(batch=1):
    t = 'name: "GoogleNet"\n' + _input((batch, 3, 224, 224))
    t += conv("conv1/7x7_s2", "data", 64, 7, stride=2, pad=3) + relu("conv1/relu_7x7", "conv1/7x7_s2")
    t += pool("pool1/3x3_s2", "conv1/7x7_s2", 3, 2) + lrn("pool1/norm1", "pool1/3x3_s2")
    t += conv("conv2/3x3_reduce", "pool1/norm1", 64, 1) + relu("conv2/relu_3x3_reduce", "conv2/3x3_reduce")
    t += conv("conv2/3x3", "conv2/3x3_reduce", 192, 3, pad=1) + relu("conv2/relu_3x3", "conv2/3x3")
    t += lrn("conv2/norm2", "conv2/3x3") + pool("pool2/3x3_s2", "conv2/norm2", 3, 2)
    bottom = "pool2/3x3_s2"
    for name in ("3a", "3b", "pool3", "4a", "4b", "4c", "4d", "4e", "pool4", "5a", "5b"):
        if name.startswith("pool"):
            t += pool(f"{name}/3x3_s2", bottom, 3, 2)
            bottom = f"{name}/3x3_s2"
        else:
            text, bottom = inception(name, bottom)
            t += text
    t += pool("pool5/7x7_s1", bottom, 7, 1, method="AVE") + drop("pool5/drop_7x7_s1", "pool5/7x7_s1", 0.4)
    t += fc("loss3/classifier", "pool5/7x7_s1", 1000) + softmax("loss3/classifier")
    return t


def bn_scale(name, blob):
    # Caffe's ResNet names: bn<x> / scale<x>, in place.
    return (f'layer {{ name: "bn{name}" type: "BatchNorm" bottom: "{blob}" top: "{blob}"\n'
            f'  batch_norm_param {{ use_global_stats: true }} }}\n'
            f'layer {{ name: "scale{name}" type: "Scale" bottom: "{blob}" top: "{blob}"\n'
            f'  scale_param {{ bias_term: true }} }}\n')


def rconv(name, bottom, num, k, stride=1, pad=0):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"\n'
            f'  convolution_param {{ num_output: {num} kernel_size: {k} pad: {pad} stride: {stride} '
            f'bias_term: false }} }}\n')


def bottleneck(name, bottom, width, out, stride, project):
    t = ""
    if project:
        t += rconv(f"res{name}_branch1", bottom, out, 1, stride) + bn_scale(f"{name}_branch1", f"res{name}_branch1")
        shortcut = f"res{name}_branch1"
    else:
        shortcut = bottom
    a, b, c = (f"res{name}_branch2{x}" for x in "abc")
    t += rconv(a, bottom, width, 1, stride) + bn_scale(f"{name}_branch2a", a) + relu(f"{a}_relu", a)
    t += rconv(b, a, width, 3, 1, 1) + bn_scale(f"{name}_branch2b", b) + relu(f"{b}_relu", b)
    t += rconv(c, b, out, 1) + bn_scale(f"{name}_branch2c", c)
    t += (f'layer {{ name: "res{name}" type: "Eltwise" bottom: "{shortcut}" bottom: "res{name}_branch2c" '
          f'top: "res{name}" }}\n')
    t += relu(f"res{name}_relu", f"res{name}")
    return t, f"res{name}"


def resnet50(batch=1):
    t = 'name: "ResNet-50"\n' + _input((batch, 3, 224, 224))
    t += rconv("conv1", "data", 64, 7, 2, 3) + bn_scale("_conv1", "conv1") + relu("conv1_relu", "conv1")
    t += pool("pool1", "conv1", 3, 2)
    bottom = "pool1"
    for stage, blocks, width in ((2, 3, 64), (3, 4, 128), (4, 6, 256), (5, 3, 512)):
        for b in range(blocks):
            text, bottom = bottleneck(f"{stage}{'abcdef'[b]}", bottom, width, width * 4,
                                      2 if b == 0 and stage > 2 else 1, b == 0)
            t += text
    t += pool("pool5", bottom, 7, 1, method="AVE") + fc("fc1000", "pool5", 1000) + softmax("fc1000")
    return t


# ---- the checks ------------------------------------------------------------------------------------
def build(text: str) -> Net:
    return Net(config.parse_net(text, "prototxt"))


def param_count(net: Net, skip_types=()) -> int:
    return sum(b.count for name, blobs in net.params.items()
               if net.layer_by_name[name].type not in skip_types for b in blobs)


def shapes(net: Net, names) -> dict:
    return {name: net.blobs[name].shape for name in names}


@pytest.mark.parametrize("caffenet", [False, True], ids=["AlexNet", "CaffeNet"])
def test_alexnet_and_caffenet(caffenet):
    net = build(alexnet(caffenet))
    try:
        assert param_count(net) == 60_965_224
        assert shapes(net, ["conv1", "pool1", "conv2", "pool2", "conv5", "pool5", "fc6", "prob"]) == {
            "conv1": (10, 96, 55, 55), "pool1": (10, 96, 27, 27), "conv2": (10, 256, 27, 27),
            "pool2": (10, 256, 13, 13), "conv5": (10, 256, 13, 13), "pool5": (10, 256, 6, 6),
            "fc6": (10, 4096), "prob": (10, 1000)}
        # group 2 halves the input channels of conv2, conv4 and conv5's filters.
        assert net.params["conv2"][0].shape == (256, 48, 5, 5)
        assert net.params["conv4"][0].shape == (384, 192, 3, 3)
        assert net.params["fc6"][0].shape == (4096, 9216)
    finally:
        net.close()


def test_vgg16():
    net = build(vgg16())
    try:
        assert param_count(net) == 138_357_544
        assert shapes(net, ["conv1_2", "pool1", "pool4", "conv5_3", "pool5", "fc6", "prob"]) == {
            "conv1_2": (1, 64, 224, 224), "pool1": (1, 64, 112, 112), "pool4": (1, 512, 14, 14),
            "conv5_3": (1, 512, 14, 14), "pool5": (1, 512, 7, 7), "fc6": (1, 4096), "prob": (1, 1000)}
        assert sum(layer.type == "Convolution" for layer in net.layers) == 13
    finally:
        net.close()


def test_googlenet():
    """The BVLC deploy net (no auxiliary classifiers): 6,998,552 weights and biases."""
    net = build(googlenet())
    try:
        assert param_count(net) == 6_998_552
        assert sum(layer.type == "Convolution" for layer in net.layers) == 57
        assert shapes(net, ["conv1/7x7_s2", "pool1/3x3_s2", "pool2/3x3_s2", "inception_3a/output",
                            "inception_3b/output", "pool3/3x3_s2", "inception_4e/output",
                            "inception_5b/output", "pool5/7x7_s1", "prob"]) == {
            "conv1/7x7_s2": (1, 64, 112, 112), "pool1/3x3_s2": (1, 64, 56, 56),
            "pool2/3x3_s2": (1, 192, 28, 28), "inception_3a/output": (1, 256, 28, 28),
            "inception_3b/output": (1, 480, 28, 28), "pool3/3x3_s2": (1, 480, 14, 14),
            "inception_4e/output": (1, 832, 14, 14), "inception_5b/output": (1, 1024, 7, 7),
            "pool5/7x7_s1": (1, 1024, 1, 1), "prob": (1, 1000)}
    finally:
        net.close()


def test_resnet50():
    """25,557,032 learned values (convolutions without bias, Scale's gamma and beta, fc1000):
    the count torchvision reports, whose BatchNorm weight and bias are Caffe's Scale layer.
    Caffe's BatchNorm layers add their statistics: mean and variance per channel (26,560
    channels in all) and one scale factor each (53 layers), 53,173 values that are not learned."""
    net = build(resnet50())
    try:
        assert param_count(net, skip_types=("BatchNorm",)) == 25_557_032
        batch_norms = [layer for layer in net.layers if layer.type == "BatchNorm"]
        assert len(batch_norms) == 53
        assert sum(b.count for layer in batch_norms for b in layer.blobs) == 2 * 26_560 + 53 == 53_173
        assert param_count(net) == 25_610_205
        assert shapes(net, ["conv1", "pool1", "res2c", "res3a", "res3d", "res4f", "res5c", "pool5",
                            "prob"]) == {
            "conv1": (1, 64, 112, 112), "pool1": (1, 64, 56, 56), "res2c": (1, 256, 56, 56),
            "res3a": (1, 512, 28, 28), "res3d": (1, 512, 28, 28), "res4f": (1, 1024, 14, 14),
            "res5c": (1, 2048, 7, 7), "pool5": (1, 2048, 1, 1), "prob": (1, 1000)}
        assert net.params["res3a_branch1"][0].shape == (512, 256, 1, 1)  # projection shortcut
    finally:
        net.close()


def to_v1(text: str) -> str:
    """A current-format deploy prototxt in the V1 form of the original BVLC files: net-level
    input/input_dim, ``layers`` with enum types, blobs_lr / weight_decay."""
    from caffelite.upgrade import V1_TYPES

    enum = {name: code for code, name in V1_TYPES.items()}
    dims = re.search(r"input_param \{ shape \{ ([^}]*) \} \}", text).group(1)
    out = ['input: "data"'] + [f"input_dim: {d}" for d in re.findall(r"dim: (\d+)", dims)]
    for line in text.splitlines():
        if 'type: "Input"' in line:
            continue
        line = re.sub(r'^layer \{', "layers {", line)
        line = re.sub(r'type: "(\w+)"', lambda m: f"type: {enum[m.group(1)]}", line)
        line = re.sub(r"param \{ lr_mult: (\S+) decay_mult: (\S+) \}", r"blobs_lr: \1 weight_decay: \2", line)
        out.append(line)
    return "\n".join(out) + "\n"


def test_v1_caffenet_deploy():
    text = to_v1(alexnet(caffenet=True))
    assert "layers {" in text and "type: CONVOLUTION" in text and "blobs_lr: 1" in text
    net = build(text)
    try:
        assert net.layer_names[0] == "input" and net.blobs["data"].shape == (10, 3, 227, 227)
        assert param_count(net) == 60_965_224 and net.blobs["prob"].shape == (10, 1000)
    finally:
        net.close()


@pytest.mark.parametrize("make", [alexnet, vgg16, googlenet, resnet50])
def test_yaml_round_trip(make):
    param = config.parse_net(make(), "prototxt")
    assert config.parse_net(message_to_yaml(param)) == param


def randomize(net: Net, seed: int = 0) -> None:
    """He-scaled weights and mild BatchNorm/Scale values, so deep nets stay well conditioned."""
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        layer_type = net.layer_by_name[name].type
        for j, blob in enumerate(blobs):
            if layer_type == "BatchNorm":
                values = [rng.standard_normal(blob.shape) * 0.1, rng.uniform(0.5, 2, blob.shape),
                          np.full(blob.shape, 2.0)][j]
            elif layer_type == "Scale":
                values = rng.uniform(0.5, 1.5, blob.shape) if j == 0 else rng.standard_normal(blob.shape) * 0.1
            elif j == 0:
                values = rng.standard_normal(blob.shape) * np.sqrt(2 * blob.shape[0] / blob.count)
            else:
                values = rng.standard_normal(blob.shape) * 0.1
            blob.set_data(values.astype(np.float32))


@pytest.mark.parametrize("make, logits", [(googlenet, "loss3/classifier"), (resnet50, "fc1000")])
def test_onnx_export_of_zoo_nets(make, logits):
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    pytest.importorskip("onnx", reason="needs onnx")
    from caffelite.onnx_export import export_onnx

    net = build(make())
    try:
        randomize(net)
        x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
        net.blobs["data"].set_data(x)
        net.forward()
        model = export_onnx(net, outputs=[logits, "prob"])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        for name, got in zip([logits, "prob"], session.run(None, {"data": x})):
            want = net.blobs[name].cpu_data()
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), name
    finally:
        net.close()
