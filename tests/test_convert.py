"""`caffelite convert` (text and weights formats), the YAML writer and `caffelite layers`."""
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from google.protobuf import text_format

from caffelite import config
from caffelite.cli import main
from caffelite.errors import ConfigError
from caffelite.io.weights import copy_weights, load_weights, save_weights
from caffelite.net import Net
from caffelite.io.blob_proto import blob_proto_to_array
from caffelite.proto import pb
from caffelite.tools.convert import NET_DATASET, convert, read_text
from caffelite.yaml_writer import format_float, format_string, message_to_yaml
from conftest import FIXTURES, REPO

TEXT_FILES = sorted(FIXTURES.glob("**/*.prototxt")) + sorted((REPO / "configs").glob("**/*.yaml"))


def parse_file(path: Path):
    """(message, kind) of a net or solver file, paths as written."""
    return read_text(str(path))


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- text round trips ---------------------------------------------------------------------
@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_text_round_trip_is_lossless(path, tmp_path):
    original, kind = parse_file(path)
    other = "yaml" if path.suffix == ".prototxt" else "prototxt"
    middle = tmp_path / f"a.{other}"
    back = tmp_path / f"b{path.suffix}"
    assert convert(path, middle) == kind
    assert convert(middle, back) == kind
    assert parse_file(middle) == (original, kind)
    assert parse_file(back) == (original, kind)


def test_kind_is_decided_by_content(tmp_path):
    solver = tmp_path / "s.yaml"
    convert(FIXTURES / "lenet" / "lenet_solver.prototxt", solver)
    text = solver.read_text()
    assert "net: lenet_train_test.prototxt" in text and "lr_policy: inv" in text
    net = tmp_path / "n.yaml"
    convert(FIXTURES / "lenet" / "lenet_train_test.prototxt", net)
    assert net.read_text().startswith("name: LeNet\nlayer:\n  - ")
    # Relative paths are copied as written, not resolved.
    assert "source: ../mnist/mnist_train_lmdb" in net.read_text()


def test_unknown_field_names_the_line(tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text('name: "x"\nlayer { name: "a" type: "ReLU"\n  relu_param { negative_slop: 1 } }\n')
    with pytest.raises(ConfigError) as info:
        convert(bad, tmp_path / "out.yaml")
    message = str(info.value)
    assert "bad.prototxt:3" in message and "negative_slop" in message and "negative_slope" in message
    assert not (tmp_path / "out.yaml").exists()


def test_solver_error_is_reported_for_solver_files(tmp_path):
    bad = tmp_path / "solver.yaml"
    bad.write_text("net: a.prototxt\nbase_lr: 0.1\nmax_iter: 10\nlr_polcy: fixed\n")
    with pytest.raises(ConfigError) as info:
        convert(bad, tmp_path / "out.prototxt")
    assert ":4" in str(info.value) and "lr_polcy" in str(info.value) and "lr_policy" in str(info.value)


def test_explicit_kind(tmp_path):
    empty_net = tmp_path / "n.prototxt"
    empty_net.write_text("debug_info: true\n")  # a field of both messages
    convert(empty_net, tmp_path / "a.yaml", kind="solver")
    assert config.parse_solver((tmp_path / "a.yaml").read_text()).debug_info
    assert convert(empty_net, tmp_path / "b.yaml") == "net"


@pytest.mark.parametrize("name", ["net.txt", "net.json", "weights.bin"])
def test_unknown_extension_lists_the_supported_ones(tmp_path, name):
    with pytest.raises(ConfigError) as info:
        convert(FIXTURES / "net" / "net.prototxt", tmp_path / name)
    assert ".prototxt" in str(info.value) and ".caffemodel" in str(info.value) and ".yaml" in str(info.value)


def test_text_to_weights_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot convert prototxt to caffemodel"):
        convert(FIXTURES / "net" / "net.prototxt", tmp_path / "x.caffemodel")


V1_NET = """
name: "V1"
input: "data"
input_dim: 2 input_dim: 1 input_dim: 6 input_dim: 6
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" blobs_lr: 1 blobs_lr: 2
         weight_decay: 1 weight_decay: 0
         convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "ip1" type: INNER_PRODUCT bottom: "conv1" top: "ip1"
         inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layers { name: "prob" type: SOFTMAX bottom: "ip1" top: "prob" }
"""


def test_v1_prototxt_is_upgraded(tmp_path, caplog):
    old = tmp_path / "old.prototxt"
    old.write_text(V1_NET)
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        convert(old, tmp_path / "new.prototxt")
        convert(old, tmp_path / "new.yaml")
    assert "V1 layers" in caplog.text
    new = config.parse_net((tmp_path / "new.prototxt").read_text(), "prototxt")
    assert not len(new.layers) and not len(new.input)
    assert [(lp.name, lp.type) for lp in new.layer] == [
        ("input", "Input"), ("conv1", "Convolution"), ("relu1", "ReLU"), ("ip1", "InnerProduct"),
        ("prob", "Softmax")]
    assert [(p.lr_mult, p.decay_mult) for p in new.layer[1].param] == [(1, 1), (2, 0)]
    assert config.parse_net((tmp_path / "new.yaml").read_text()) == new


def test_v1_caffemodel_is_upgraded_and_loads(tmp_path):
    source = Net(text_format.Parse(V1_NET, pb.NetParameter()), seed=3)
    old = pb.NetParameter(name="V1")
    for name, v1_type in (("conv1", "CONVOLUTION"), ("ip1", "INNER_PRODUCT")):
        layer = old.layers.add(name=name, type=pb.V1LayerParameter.LayerType.Value(v1_type))
        for blob in source.params[name]:
            array = blob.cpu_data()
            legacy = (1,) * (4 - array.ndim) + array.shape
            proto = layer.blobs.add(num=legacy[0], channels=legacy[1], height=legacy[2], width=legacy[3])
            proto.data.extend(array.ravel().tolist())
    (tmp_path / "old.caffemodel").write_bytes(old.SerializeToString())
    convert(tmp_path / "old.caffemodel", tmp_path / "new.caffemodel")
    new = pb.NetParameter.FromString((tmp_path / "new.caffemodel").read_bytes())
    assert not len(new.layers)
    assert [(lp.name, lp.type) for lp in new.layer] == [("conv1", "Convolution"), ("ip1", "InnerProduct")]
    target = Net(text_format.Parse(V1_NET, pb.NetParameter()), seed=4)
    copy_weights(target, str(tmp_path / "new.caffemodel"))
    for name in ("conv1", "ip1"):
        for a, b in zip(source.params[name], target.params[name]):
            np.testing.assert_array_equal(a.cpu_data(), b.cpu_data())


# ---- weights ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["net/fixture_iter_20.caffemodel", "net/fixture_grad_iter_1.caffemodel",
                                  "lenet/lenet_iter_5000.caffemodel"])
def test_caffemodel_h5_caffemodel_is_exact(tmp_path, name):
    original = pb.NetParameter.FromString((FIXTURES / name).read_bytes())
    convert(FIXTURES / name, tmp_path / "w.caffemodel.h5")
    convert(tmp_path / "w.caffemodel.h5", tmp_path / "w.caffemodel")
    assert pb.NetParameter.FromString((tmp_path / "w.caffemodel").read_bytes()) == original
    with h5py.File(tmp_path / "w.caffemodel.h5", "r") as h5:  # Caffe's layout
        assert NET_DATASET in h5
        for layer in original.layer:
            assert layer.name in h5["data"]
            for j, blob in enumerate(layer.blobs):
                np.testing.assert_array_equal(h5["data"][layer.name][str(j)][()], blob_proto_to_array(blob))
        assert ("diff" in h5) == any(len(b.diff) for lp in original.layer for b in lp.blobs)


def fixture_net():
    path = FIXTURES / "net" / "net.prototxt"
    return Net(config.load_net(path), source=str(path))


def params_of(net):
    return {name: [b.cpu_data().copy() for b in blobs] for name, blobs in net.params.items()}


def test_caffe_h5_to_caffemodel_loads_the_same_weights(tmp_path):
    caffe_h5 = FIXTURES / "net" / "fixture_h5_iter_12.caffemodel.h5"
    convert(caffe_h5, tmp_path / "plain.caffemodel")
    convert(caffe_h5, tmp_path / "typed.caffemodel", model=FIXTURES / "net" / "net.prototxt")
    want = fixture_net()
    copy_weights(want, str(caffe_h5))
    for name in ("plain", "typed"):
        net = fixture_net()
        copy_weights(net, str(tmp_path / f"{name}.caffemodel"))
        for layer, arrays in params_of(want).items():
            for a, b in zip(arrays, net.params[layer]):
                np.testing.assert_array_equal(a, b.cpu_data())
    plain = load_weights(tmp_path / "plain.caffemodel")
    typed = load_weights(tmp_path / "typed.caffemodel")
    assert {lp.name for lp in plain.layer if lp.blobs} == {lp.name for lp in typed.layer if lp.blobs}
    assert all(not lp.type for lp in plain.layer)
    assert {lp.name: lp.type for lp in typed.layer}["conv_g"] == "Convolution"
    # Back to HDF5: the same datasets as Caffe's file.
    convert(tmp_path / "plain.caffemodel", tmp_path / "again.caffemodel.h5")
    with h5py.File(caffe_h5, "r") as a, h5py.File(tmp_path / "again.caffemodel.h5", "r") as b:
        for layer in a["data"]:
            for j in a["data"][layer]:
                np.testing.assert_array_equal(a["data"][layer][j][()], b["data"][layer][j][()])


SHARED = """
name: "shared"
layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h" param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "y" param { name: "w" } param { name: "B" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "ip3" type: "InnerProduct" bottom: "y" top: "z" param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
"""


def shared_net(seed):
    return Net(text_format.Parse(SHARED, pb.NetParameter()), seed=seed)


def test_shared_blobs(tmp_path, caplog):
    """ip3 shares both blobs of ip1 (its HDF5 group is empty), ip2 only the weights."""
    (tmp_path / "net.prototxt").write_text(SHARED)
    source = shared_net(1)
    save_weights(source, str(tmp_path / "w.caffemodel.h5"))  # Caffe's layout: sharers store nothing
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        convert(tmp_path / "w.caffemodel.h5", tmp_path / "names.caffemodel")
    assert "layer 'ip2' has no blob 0" in caplog.text and "--model" in caplog.text
    names = load_weights(tmp_path / "names.caffemodel")
    assert [(lp.name, len(lp.blobs)) for lp in names.layer] == [("ip1", 2), ("ip2", 0)]
    convert(tmp_path / "w.caffemodel.h5", tmp_path / "full.caffemodel", model=tmp_path / "net.prototxt")
    full = load_weights(tmp_path / "full.caffemodel")
    assert [(lp.name, lp.type, len(lp.blobs)) for lp in full.layer] == [
        ("data", "Input", 0), ("ip1", "InnerProduct", 2), ("ip2", "InnerProduct", 2),
        ("ip3", "InnerProduct", 2)]
    for path in ("full.caffemodel", "names.caffemodel"):
        target = shared_net(2)
        copy_weights(target, str(tmp_path / path))
        for name in ("ip1", "ip2", "ip3"):
            for a, b in zip(source.params[name], target.params[name]):
                if path == "full.caffemodel" or name != "ip2":
                    np.testing.assert_array_equal(a.cpu_data(), b.cpu_data())


def test_model_is_only_for_h5_to_caffemodel(tmp_path):
    with pytest.raises(ConfigError, match="--model"):
        convert(FIXTURES / "net" / "fixture_iter_20.caffemodel", tmp_path / "w.h5",
                model=FIXTURES / "net" / "net.prototxt")


def test_cli_convert(capsys, tmp_path):
    code, _, err = run_cli(["convert", FIXTURES / "net" / "net.prototxt", tmp_path / "net.yaml"], capsys)
    assert code == 0, err
    assert f"Wrote {tmp_path / 'net.yaml'} (net)" in err
    code, _, err = run_cli(["convert", tmp_path / "net.yaml", tmp_path / "net.bad"], capsys)
    assert code == 2 and "unknown file type '.bad'" in err and "Traceback" not in err
    code, _, err = run_cli(["convert", "-kind", "net", FIXTURES / "net" / "fixture_iter_20.caffemodel",
                            tmp_path / "w.h5"], capsys)
    assert code == 0, err


# ---- the YAML writer ---------------------------------------------------------------------
@pytest.mark.parametrize("text", ["1", "true", "yes", "null", "~", "", "a: b", "a #b", "-x", "[x]",
                                  "{x}", "x, y", "1e5", ".inf", "with space", "quote\"s", "back\\slash",
                                  "tab\tnew\nline", "ünïcødé", "emoji 😀", "\x7f\x01", "  lead",
                                  "inception_3a/1x1", "../data/x_lmdb", "0x10", "010", "=", "*a", "&a"])
def test_strings_read_back_the_same(text):
    written = format_string(text)
    assert yaml.safe_load(f"k: {written}")["k"] == text
    assert yaml.safe_load(f"k: [{written}, {written}]")["k"] == [text, text]
    assert yaml.safe_load(f"k: {{a: {written}}}")["k"]["a"] == text


def test_plain_strings_stay_plain():
    for text in ("conv1", "../mnist/mnist_train_lmdb", "inception_3a/1x1", "xavier", "LMDB"):
        assert format_string(text) == text


@pytest.mark.parametrize("value", [0.1, 1e-4, 5e-5, 0.00390625, 1 / 3, 1e-20, 3.4e38, -2.5e-7, 1e16,
                                   123456.7, 1.0, -3.0, 0.0, -0.0, float("inf"), float("-inf")])
def test_floats_read_back_to_the_same_float32(value):
    text = format_float(value)
    back = yaml.safe_load(f"k: {text}")["k"]
    assert isinstance(back, (int, float))
    assert np.float32(back) == np.float32(value)
    assert len(text) <= 12


def test_float_style():
    assert format_float(0.1) == "0.1" and format_float(1e-4) == "0.0001"
    assert format_float(1.0) == "1" and format_float(1e-20) == "1.0e-20"
    assert format_float(float("nan")) == ".nan"
    assert format_float(1 / 3, single=False) == "0.3333333333333333"


def test_writer_house_style():
    param = config.parse_net("""
name: "x"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" include { phase: TRAIN }
  loss_param { normalization: BATCH_SIZE } }
""", "prototxt")
    text = message_to_yaml(param)
    assert text == (
        "name: x\n"
        "layer:\n"
        "  - {name: data, type: Input, top: data, input_param: {shape: {dim: [1, 3]}}}\n"
        "  - {name: ip, type: InnerProduct, bottom: data, top: ip, param: [{lr_mult: 1}, {lr_mult: 2}],\n"
        "     inner_product_param: {num_output: 10, weight_filler: {type: xavier}}}\n"
        "  - {name: loss, type: SoftmaxWithLoss, bottom: [ip, label], top: loss, include: {phase: TRAIN},\n"
        "     loss_param: {normalization: BATCH_SIZE}}\n")
    assert config.parse_net(text) == param


def test_long_layers_become_block_mappings():
    layer = pb.LayerParameter(name="dummy", type="DummyData")
    layer.top.extend(f"top_with_a_long_name_{i}" for i in range(12))
    for _ in range(6):
        layer.dummy_data_param.shape.add().dim.extend([64, 3, 227, 227])
        layer.dummy_data_param.data_filler.add(type="gaussian", std=0.01)
    param = pb.NetParameter(name="long")
    param.layer.add().CopyFrom(layer)
    text = message_to_yaml(param)
    assert "\n  - name: dummy\n    type: DummyData\n" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    assert config.parse_net(text) == param


def test_empty_sub_message_survives():
    param = pb.NetParameter()
    layer = param.layer.add(name="d", type="Data")
    layer.transform_param.SetInParent()
    assert config.parse_net(message_to_yaml(param)) == param


def test_solver_with_embedded_net_round_trips():
    solver = pb.SolverParameter(base_lr=0.01, max_iter=10, type="Adam")
    solver.net_param.name = "inner"
    solver.net_param.layer.add(name="data", type="Input").top.append("data")
    solver.test_iter.extend([5, 6])
    solver.test_state.add(stage=["a", "b"])
    text = message_to_yaml(solver)
    assert config.parse_solver(text) == solver


# ---- caffelite layers ----------------------------------------------------------------------
def test_layers_lists_every_registered_type(capsys):
    from caffelite.registry import LAYERS

    code, out, _ = run_cli(["layers"], capsys)
    assert code == 0
    for name in LAYERS.names():
        assert f"\n{name}\n" in f"\n{out}"
    assert "  convolution_param (ConvolutionParameter)" in out
    assert f"{len(LAYERS.names())} layer types" in out


def test_layers_one_type(capsys):
    code, out, _ = run_cli(["layers", "--type", "Pooling"], capsys)
    assert code == 0
    assert out.startswith("Pooling\n  pooling_param (PoolingParameter)\n")
    assert "pool            PoolMethod {MAX, AVE, STOCHASTIC} = MAX" in out
    assert "round_mode      RoundMode {CEIL, FLOOR} = CEIL" in out
    code, out, _ = run_cli(["layers", "-type", "Data"], capsys)
    assert "transform_param (TransformationParameter)" in out and "batch_size" in out
    code, out, _ = run_cli(["layers", "--type", "SoftmaxWithLoss"], capsys)
    assert "loss_param (LossParameter)" in out and "ignore_label" in out


def test_layers_unknown_type(capsys):
    code, _, err = run_cli(["layers", "--type", "Convolutin"], capsys)
    assert code == 2 and "did you mean 'Convolution'" in err


def test_layers_names(capsys):
    from caffelite.registry import LAYERS

    code, out, _ = run_cli(["layers", "--names"], capsys)
    assert out.split() == LAYERS.names()
