"""ONNX export: onnxruntime reproduces caffelite's forward pass layer by layer."""
import re

import h5py
import numpy as np
import pytest

from caffelite import config
from caffelite.cli import main
from caffelite.errors import ConfigError
from caffelite.net import Net
from caffelite.registry import LAYERS
from conftest import FIXTURES

onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install 'caffelite[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (pip install onnxruntime)")

from caffelite.onnx_export import export_onnx, exportable_types  # noqa: E402

TOL = 1e-4


def build(text: str, seed: int = 0, randomize: bool = True) -> Net:
    net = Net(config.parse_net(text, "prototxt"), seed=seed)
    rng = np.random.default_rng(seed)
    if randomize:
        for name, blobs in net.params.items():
            layer = net.layer_by_name[name]
            for j, blob in enumerate(blobs):
                if layer.type == "BatchNorm":
                    values = [rng.standard_normal(blob.shape), rng.uniform(0.5, 2, blob.shape),
                              np.full(blob.shape, 0.8)][j]
                else:
                    values = rng.standard_normal(blob.shape) * 0.5
                blob.set_data(values)
    return net


def relative_error(got, want) -> float:
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))


def compare(net: Net, feeds: dict | None = None, outputs="all", tmp_path=None, seed=1,
            dynamic_batch=False) -> dict:
    """Export ``net``, run both on ``feeds`` (random by default) and check every output."""
    rng = np.random.default_rng(seed)
    inputs = [top for layer, tops in zip(net.layers, net.top_ids) if layer.type == "Input" for top in tops]
    feeds = feeds or {name: rng.standard_normal(net.blobs[name].shape).astype(np.float32) for name in inputs}
    for name, value in feeds.items():
        net.blobs[name].reshape(value.shape)
        net.blobs[name].set_data(value)
    if outputs == "all":
        outputs = [b for b in net.blobs if b not in inputs]
    model = export_onnx(net, outputs=outputs, dynamic_batch=dynamic_batch)
    net.forward()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    results = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    assert set(results) == set(outputs or net.output_blob_names)
    for name, got in results.items():
        want = net.blobs[name].cpu_data()
        assert got.shape == want.shape, name
        assert relative_error(got, want) <= TOL, (name, relative_error(got, want))
    return results


def input_layer(shape, name="data") -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {dims} }} }} }}\n'


# ---- the nets the issue names -------------------------------------------------------------------
def deploy_from(path, data_shape, drop=("loss", "accuracy", "acc")) -> str:
    """A train/test net in deploy form: its first data layer(s) -> an Input, losses dropped."""
    text = path.read_text()
    layers = re.findall(r"^layer \{.*?(?=^layer \{|\Z)", text, re.M | re.S)
    kept = [layer for layer in layers if not re.search(r'type: "(Data|HDF5Data)"', layer)
            and not any(f'name: "{d}"' in layer for d in drop)]
    return 'name: "deploy"\n' + input_layer(data_shape) + "".join(kept)


def test_lenet(tmp_path):
    net = build(deploy_from(FIXTURES / "lenet" / "lenet_train_test.prototxt", (8, 1, 28, 28)),
                randomize=False)
    net.copy_trained_layers_from(str(FIXTURES / "lenet" / "lenet_iter_10000.caffemodel"))
    x = np.random.default_rng(0).uniform(0, 1, (8, 1, 28, 28)).astype(np.float32)
    compare(net, {"data": x})


def test_fixture_net_every_blob():
    net = build(deploy_from(FIXTURES / "net" / "net.prototxt", (4, 3, 16, 16)), randomize=False)
    net.copy_trained_layers_from(str(FIXTURES / "net" / "fixture_iter_20.caffemodel"))
    with h5py.File(FIXTURES / "net" / "input.h5", "r") as h5:
        x = h5["data"][:4].astype(np.float32)
    results = compare(net, {"data": x})
    assert "prob" in results and "lrn_w" in results and "pool_ave" in results


def bottleneck(name, bottom, width, out, stride, project):
    def conv(n, b, c, k, s=1, p=0):
        return (f'layer {{ name: "{n}" type: "Convolution" bottom: "{b}" top: "{n}" convolution_param '
                f'{{ num_output: {c} kernel_size: {k} stride: {s} pad: {p} bias_term: false }} }}\n'
                f'layer {{ name: "bn_{n}" type: "BatchNorm" bottom: "{n}" top: "{n}" }}\n'
                f'layer {{ name: "scale_{n}" type: "Scale" bottom: "{n}" top: "{n}" '
                f'scale_param {{ bias_term: true }} }}\n')
    text, shortcut = "", bottom
    if project:
        text += conv(f"{name}_proj", bottom, out, 1, stride)
        shortcut = f"{name}_proj"
    text += conv(f"{name}_a", bottom, width, 1, stride)
    text += f'layer {{ name: "{name}_a_relu" type: "ReLU" bottom: "{name}_a" top: "{name}_a" }}\n'
    text += conv(f"{name}_b", f"{name}_a", width, 3, 1, 1)
    text += f'layer {{ name: "{name}_b_relu" type: "ReLU" bottom: "{name}_b" top: "{name}_b" }}\n'
    text += conv(f"{name}_c", f"{name}_b", out, 1)
    text += (f'layer {{ name: "{name}" type: "Eltwise" bottom: "{shortcut}" bottom: "{name}_c" '
             f'top: "{name}" }}\n'
             f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n')
    return text


RESNET = ('name: "mini_resnet"\n' + input_layer((2, 3, 17, 17))
          + 'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" '
            'convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 } }\n'
            'layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }\n'
            'layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }\n'
            'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n'
            'layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" '
            'pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n'
          + bottleneck("res2a", "pool1", 4, 16, 1, True) + bottleneck("res2b", "res2a", 4, 16, 1, False)
          + bottleneck("res3a", "res2b", 8, 32, 2, True)
          + 'layer { name: "pool5" type: "Pooling" bottom: "res3a" top: "pool5" '
            'pooling_param { pool: AVE global_pooling: true } }\n'
            'layer { name: "fc" type: "InnerProduct" bottom: "pool5" top: "fc" '
            'inner_product_param { num_output: 10 } }\n'
            'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n')


def test_resnet_style_net(tmp_path):
    net = build(RESNET)
    assert net.blobs["pool1"].shape == (2, 8, 4, 4) and net.blobs["res3a"].shape == (2, 32, 2, 2)
    compare(net)
    compare(net, outputs=None)
    path = tmp_path / "resnet.onnx"
    export_onnx(net, path)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["data"]
    assert [o.name for o in model.graph.output] == ["prob"]
    assert {"BatchNormalization", "Add", "Mul", "Sum", "GlobalAveragePool", "Gemm"} <= \
        {n.op_type for n in model.graph.node}


def test_dynamic_batch():
    net = build(RESNET)
    x = np.random.default_rng(3).standard_normal((2, 3, 17, 17)).astype(np.float32)
    model = export_onnx(net, dynamic_batch=True)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        xb = np.concatenate([x] * 3)[:batch]
        got = session.run(None, {"data": xb})[0]
        net.blobs["data"].reshape(xb.shape)
        net.blobs["data"].set_data(xb)
        net.forward()
        assert relative_error(got, net.blobs["prob"].cpu_data()) <= TOL


# ---- layer by layer -----------------------------------------------------------------------------
POOLING = [  # (H, W, pooling_param)
    (9, 9, "pool: MAX kernel_size: 3 stride: 2"),                  # exact fit
    (10, 10, "pool: MAX kernel_size: 3 stride: 2"),                # CEIL adds a window
    (10, 10, "pool: AVE kernel_size: 3 stride: 2"),
    (16, 16, "pool: AVE kernel_size: 3 stride: 2 pad: 1"),         # pad + CEIL overhang
    (16, 16, "pool: MAX kernel_size: 3 stride: 2 pad: 1"),
    (7, 7, "pool: AVE kernel_size: 3 stride: 3 pad: 2"),           # Caffe drops a window in the pad
    (7, 7, "pool: MAX kernel_size: 3 stride: 3 pad: 2"),
    (8, 8, "pool: AVE kernel_size: 2 stride: 2"),                  # exact fit, no pad
    (11, 13, "pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 1"),
    (11, 13, "pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 1"),
    (10, 10, "pool: AVE kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR"),
    (10, 10, "pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR"),
    (6, 5, "pool: MAX global_pooling: true"),
    (6, 5, "pool: AVE global_pooling: true"),
]


@pytest.mark.parametrize("h, w, pooling", POOLING)
def test_pooling(h, w, pooling):
    net = build(input_layer((2, 3, h, w)) + f'layer {{ name: "pool" type: "Pooling" bottom: "data" '
                                           f'top: "pool" pooling_param {{ {pooling} }} }}\n')
    compare(net)


def one_layer(layer_type: str, params: str = "", shape=(2, 4, 6, 5), bottoms=("data",), extra="",
              tops=("out",)) -> str:
    bottom = " ".join(f'bottom: "{b}"' for b in bottoms)
    top = " ".join(f'top: "{t}"' for t in tops)
    return (input_layer(shape) + extra +
            f'layer {{ name: "layer" type: "{layer_type}" {bottom} {top} {params} }}\n')


LAYERS_CASES = {
    "conv_group_dilation": one_layer(
        "Convolution", "convolution_param { num_output: 6 kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 1 "
                       "dilation: 2 group: 2 stride: 2 weight_filler { type: 'gaussian' } }"),
    "conv_1x1_no_bias": one_layer("Convolution", "convolution_param { num_output: 3 kernel_size: 1 "
                                                 "bias_term: false }"),
    "conv_3d": one_layer("Convolution", "convolution_param { num_output: 2 kernel_size: 2 pad: 1 }",
                         shape=(2, 3, 4, 5, 3)),
    "deconv_group": one_layer("Deconvolution", "convolution_param { num_output: 4 kernel_size: 4 "
                                               "stride: 2 pad: 1 group: 2 }"),
    "deconv_rect": one_layer("Deconvolution", "convolution_param { num_output: 3 kernel_h: 3 kernel_w: 2 "
                                              "stride_h: 2 stride_w: 1 pad_h: 1 }"),
    "ip_axis2_transpose": one_layer("InnerProduct", "inner_product_param { num_output: 3 axis: 2 "
                                                    "transpose: true }"),
    "ip_axis1": one_layer("InnerProduct", "inner_product_param { num_output: 7 bias_term: false }"),
    "relu": one_layer("ReLU"),
    "leaky_relu": one_layer("ReLU", "relu_param { negative_slope: 0.2 }"),
    "prelu": one_layer("PReLU"),
    "prelu_shared": one_layer("PReLU", "prelu_param { channel_shared: true }"),
    "sigmoid": one_layer("Sigmoid"),
    "tanh": one_layer("TanH"),
    "softmax_axis2": one_layer("Softmax", "softmax_param { axis: 2 }"),
    "softmax_last": one_layer("Softmax", "softmax_param { axis: -1 }"),
    "dropout": one_layer("Dropout", "dropout_param { dropout_ratio: 0.3 }"),
    "lrn_across": one_layer("LRN", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 }"),
    "lrn_across_5": one_layer("LRN", "lrn_param { local_size: 5 alpha: 1.5 beta: 0.6 }", shape=(2, 7, 3, 3)),
    "lrn_within": one_layer("LRN", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 "
                                   "norm_region: WITHIN_CHANNEL }"),
    "batch_norm_2d": one_layer("BatchNorm", shape=(3, 5)),
    "batch_norm_eps": one_layer("BatchNorm", "batch_norm_param { eps: 0.1 }"),
    "scale": one_layer("Scale", "scale_param { bias_term: true }"),
    "scale_two_axes": one_layer("Scale", "scale_param { axis: 1 num_axes: 2 }"),
    "scale_scalar": one_layer("Scale", "scale_param { num_axes: 0 bias_term: true }"),
    "scale_bottom": one_layer("Scale", "scale_param { axis: 0 bias_term: true }",
                              bottoms=("data", "s"), extra=input_layer((2, 4), "s")),
    "bias": one_layer("Bias"),
    "bias_bottom": one_layer("Bias", "bias_param { axis: 1 }", bottoms=("data", "b"),
                             extra=input_layer((4, 6), "b")),
    "mvn": one_layer("MVN"),
    "mvn_across": one_layer("MVN", "mvn_param { across_channels: true }"),
    "mvn_mean_only": one_layer("MVN", "mvn_param { normalize_variance: false }"),
    "eltwise_sum_coeff": one_layer("Eltwise", "eltwise_param { coeff: 0.5 coeff: -2 coeff: 1 }",
                                   bottoms=("data", "b", "data"), extra=input_layer((2, 4, 6, 5), "b")),
    "eltwise_prod": one_layer("Eltwise", "eltwise_param { operation: PROD }", bottoms=("data", "b", "b"),
                              extra=input_layer((2, 4, 6, 5), "b")),
    "eltwise_max": one_layer("Eltwise", "eltwise_param { operation: MAX }", bottoms=("data", "b"),
                             extra=input_layer((2, 4, 6, 5), "b")),
    "concat_axis2": one_layer("Concat", "concat_param { axis: 2 }", bottoms=("data", "b"),
                              extra=input_layer((2, 4, 3, 5), "b")),
    "concat_dim": one_layer("Concat", "concat_param { concat_dim: 1 }", bottoms=("data", "b"),
                            extra=input_layer((2, 2, 6, 5), "b")),
    "slice": one_layer("Slice", "slice_param { axis: 2 slice_point: 1 slice_point: 4 }",
                       tops=("a", "b", "c")),
    "slice_even": one_layer("Slice", "", tops=("a", "b")),
    "flatten": one_layer("Flatten"),
    "flatten_axis2": one_layer("Flatten", "flatten_param { axis: 2 }"),
    "flatten_end": one_layer("Flatten", "flatten_param { axis: 1 end_axis: 2 }"),
    "reshape": one_layer("Reshape", "reshape_param { shape { dim: 0 dim: -1 dim: 3 } }"),
    "reshape_axis": one_layer("Reshape", "reshape_param { axis: 2 shape { dim: 3 dim: 2 dim: 5 } }"),
    "crop": one_layer("Crop", "crop_param { axis: 1 offset: 1 offset: 2 offset: 0 }", bottoms=("data", "ref"),
                      extra=input_layer((2, 2, 3, 4), "ref")),
    "crop_default": one_layer("Crop", "", bottoms=("data", "ref"), extra=input_layer((1, 1, 4, 4), "ref")),
    "split": (input_layer((2, 3)) + 'layer { name: "s" type: "Split" bottom: "data" top: "a" top: "b" }\n'
              'layer { name: "t" type: "TanH" bottom: "a" top: "ta" }\n'
              'layer { name: "u" type: "Sigmoid" bottom: "b" top: "ub" }\n'),
    "in_place_chain": (input_layer((2, 3, 4, 4)) +
                       'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                       'convolution_param { num_output: 2 kernel_size: 1 } }\n'
                       'layer { name: "r" type: "ReLU" bottom: "c" top: "c" }\n'
                       'layer { name: "d" type: "Dropout" bottom: "c" top: "c" }\n'
                       'layer { name: "s" type: "Scale" bottom: "c" top: "c" }\n'),
}
OPTIONAL = {  # layer types added by other families: tested when registered
    "absval": one_layer("AbsVal"),
    "bnll": one_layer("BNLL"),
    "elu": one_layer("ELU", "elu_param { alpha: 0.7 }"),
    "power": one_layer("Power", "power_param { power: 2 scale: 0.5 shift: 3 }"),
    "power_identity": one_layer("Power"),
    "exp": one_layer("Exp", "exp_param { base: 2 scale: 0.5 shift: 0.1 }"),
    "exp_e": one_layer("Exp"),
    "log": one_layer("Log", "log_param { base: 10 scale: 2 shift: 30 }"),
    "log_e": one_layer("Log", "log_param { shift: 10 }"),
    "threshold": one_layer("Threshold", "threshold_param { threshold: 0.2 }"),
    "clip": one_layer("Clip", "clip_param { min: -0.5 max: 0.7 }"),
    "swish": one_layer("Swish", "swish_param { beta: 1.5 }"),
}


@pytest.mark.parametrize("case", sorted(LAYERS_CASES))
def test_layer(case):
    compare(build('name: "t"\n' + LAYERS_CASES[case]))


@pytest.mark.parametrize("case", sorted(OPTIONAL))
def test_optional_layer(case):
    layer_type = re.search(r'name: "layer" type: "(\w+)"', OPTIONAL[case]).group(1)
    if layer_type not in LAYERS:
        pytest.skip(f"{layer_type} is not registered")
    compare(build('name: "t"\n' + OPTIONAL[case]))


def test_lrn_matches_onnx_semantics_exactly():
    """ONNX's LRN divides alpha by size as Caffe does: checked with a large alpha."""
    net = build(one_layer("LRN", "lrn_param { local_size: 3 alpha: 4 beta: 1 k: 1 }", shape=(1, 3, 1, 1)))
    x = np.array([1.0, 2.0, 3.0], np.float32).reshape(1, 3, 1, 1)
    out = compare(net, {"data": x})["out"].ravel()
    # channel 1 sees 1 + 4 + 9 = 14: 2 / (1 + 4 / 3 * 14)
    assert out[1] == pytest.approx(2 / (1 + 4 / 3 * 14), rel=1e-5)


# ---- what cannot be exported ---------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    (one_layer("SoftmaxWithLoss", bottoms=("data", "label"), shape=(2, 3),
               extra=input_layer((2,), "label")), "layer 'layer' (type SoftmaxWithLoss) cannot be exported"),
    (one_layer("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }"), "STOCHASTIC"),
    (one_layer("BatchNorm", "batch_norm_param { use_global_stats: false }"), "use_global_stats"),
])
def test_unexportable_layers_are_named(text, message):
    net = build(text)
    with pytest.raises(ConfigError) as info:
        export_onnx(net)
    assert message in str(info.value) and info.value.layer == "layer"


def test_data_layer_gets_a_deploy_hint():
    net = Net(config.load_net(FIXTURES / "net" / "net.prototxt"))
    with pytest.raises(ConfigError, match=r"layer 'input' \(type HDF5Data\) cannot be exported.*Input layer"):
        export_onnx(net)


def test_exportable_types():
    types = exportable_types()
    for name in ("Input", "Convolution", "Deconvolution", "Pooling", "InnerProduct", "BatchNorm", "Scale",
                 "Eltwise", "Concat", "Slice", "Crop", "LRN", "MVN", "Softmax", "Split", "Dropout"):
        assert name in types


def test_cli_export(tmp_path, capsys):
    deploy = tmp_path / "deploy.yaml"
    text = deploy_from(FIXTURES / "net" / "net.prototxt", (4, 3, 16, 16))
    (tmp_path / "deploy.prototxt").write_text(text)
    main(["convert", str(tmp_path / "deploy.prototxt"), str(deploy)])
    out = tmp_path / "model.onnx"
    code = main(["export", "--model", str(deploy), "--weights", str(FIXTURES / "net" / "fixture_iter_20.caffemodel"),
                 "--format", "onnx", str(out), "--verify", "--dynamic_batch"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "onnxruntime vs caffelite: largest relative error" in err
    assert onnx.load(str(out)).graph.output[0].name == "prob"
    code = main(["export", "-model", str(FIXTURES / "net" / "net.prototxt"), str(tmp_path / "bad.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "type HDF5Data" in err and not (tmp_path / "bad.onnx").exists()
