"""Legacy Caffe net/solver upgrades (V0, V1, net-level inputs, BatchNorm specs, solver_type)."""
import logging

import numpy as np
import pytest
from google.protobuf import text_format

from conftest import FIXTURES
from caffelite.errors import ConfigError
from caffelite.proto import pb
from caffelite.upgrade import (V1_TYPES, net_needs_upgrade, solver_needs_upgrade, upgrade_net,
                               upgrade_solver)


def net(text):
    return text_format.Parse(text, pb.NetParameter())


def solver(text):
    return text_format.Parse(text, pb.SolverParameter())


def assert_same(got, expected_text):
    expected = net(expected_text)
    assert got == expected, (f"got:\n{text_format.MessageToString(got)}\n"
                             f"expected:\n{text_format.MessageToString(expected)}")


# ---- V1 -----------------------------------------------------------------------
V1_LENET = """
name: "LeNet"
layers { name: "mnist" type: DATA top: "data" top: "label"
  data_param { source: "mnist_train_lmdb" backend: LMDB batch_size: 64 scale: 0.00390625
               mean_file: "mean.binaryproto" crop_size: 24 mirror: true }
  include: { phase: TRAIN } }
layers { name: "mnist" type: DATA top: "data" top: "label"
  data_param { source: "mnist_test_lmdb" backend: LMDB batch_size: 100 scale: 0.00390625 }
  include: { phase: TEST } }
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 20 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "norm1" type: LRN bottom: "pool1" top: "norm1"
  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layers { name: "ip1" type: INNER_PRODUCT bottom: "norm1" top: "ip1"
  blobs_lr: 1 blobs_lr: 2
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layers { name: "relu1" type: RELU bottom: "ip1" top: "ip1" }
layers { name: "drop1" type: DROPOUT bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.5 } }
layers { name: "accuracy" type: ACCURACY bottom: "ip1" bottom: "label" top: "accuracy"
  include: { phase: TEST } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip1" bottom: "label" top: "loss" loss_weight: 2 }
"""

CURRENT_LENET = """
name: "LeNet"
layer { name: "mnist" type: "Data" top: "data" top: "label"
  data_param { source: "mnist_train_lmdb" backend: LMDB batch_size: 64 }
  transform_param { scale: 0.00390625 mean_file: "mean.binaryproto" crop_size: 24 mirror: true }
  include: { phase: TRAIN } }
layer { name: "mnist" type: "Data" top: "data" top: "label"
  data_param { source: "mnist_test_lmdb" backend: LMDB batch_size: 100 }
  transform_param { scale: 0.00390625 }
  include: { phase: TEST } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 20 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "ip1" type: "InnerProduct" bottom: "norm1" top: "ip1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy"
  include: { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss"
  loss_weight: 2 }
"""


def test_v1_lenet_upgrades_to_current(caplog):
    old = net(V1_LENET)
    before = old.SerializeToString()
    assert net_needs_upgrade(old)
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        new = upgrade_net(old, "lenet.prototxt")
    assert_same(new, CURRENT_LENET)
    assert old.SerializeToString() == before  # the input is left alone
    assert not net_needs_upgrade(new) and upgrade_net(new) is new
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "lenet.prototxt" in lines[0] and "V1 layers" in lines[0]
    assert "transform_param" in lines[0] and "caffelite convert" in lines[0]


def test_v1_image_and_window_data_transform_fields():
    new = upgrade_net(net("""
      layers { name: "img" type: IMAGE_DATA top: "data" top: "label"
        image_data_param { source: "list.txt" batch_size: 4 mirror: true crop_size: 8
                           new_height: 10 } }
      layers { name: "win" type: WINDOW_DATA top: "d2" top: "l2"
        window_data_param { source: "w.txt" mean_file: "m.binaryproto" scale: 2 fg_fraction: 0.5 } }
      layers { name: "h5" type: HDF5_DATA top: "d3" hdf5_data_param { source: "h.txt" batch_size: 2 } }
    """))
    assert_same(new, """
      layer { name: "img" type: "ImageData" top: "data" top: "label"
        image_data_param { source: "list.txt" batch_size: 4 new_height: 10 }
        transform_param { mirror: true crop_size: 8 } }
      layer { name: "win" type: "WindowData" top: "d2" top: "l2"
        window_data_param { source: "w.txt" fg_fraction: 0.5 }
        transform_param { mean_file: "m.binaryproto" scale: 2 } }
      layer { name: "h5" type: "HDF5Data" top: "d3" hdf5_data_param { source: "h.txt" batch_size: 2 } }
    """)


def test_v1_param_names_and_share_mode():
    new = upgrade_net(net("""
      layers { name: "a" type: INNER_PRODUCT bottom: "x" top: "a" param: "w" param: "b"
               blob_share_mode: PERMISSIVE blobs_lr: 3 inner_product_param { num_output: 2 } }
    """))
    assert_same(new, """
      layer { name: "a" type: "InnerProduct" bottom: "x" top: "a"
              param { name: "w" share_mode: PERMISSIVE lr_mult: 3 } param { name: "b" }
              inner_product_param { num_output: 2 } }
    """)


@pytest.mark.parametrize("enum_name", sorted(V1_TYPES))
def test_every_v1_type_maps(enum_name):
    old = pb.NetParameter()
    old.layers.add(name="l", type=pb.V1LayerParameter.LayerType.Value(enum_name))
    assert upgrade_net(old).layer[0].type == V1_TYPES[enum_name]


def test_v1_type_names():
    assert V1_TYPES["SOFTMAX_LOSS"] == "SoftmaxWithLoss"
    assert V1_TYPES["TANH"] == "TanH" and V1_TYPES["IM2COL"] == "Im2col"
    assert V1_TYPES["HDF5_OUTPUT"] == "HDF5Output"
    assert V1_TYPES["SIGMOID_CROSS_ENTROPY_LOSS"] == "SigmoidCrossEntropyLoss"
    # every V1 enum value except NONE is covered
    names = set(pb.V1LayerParameter.LayerType.keys()) - {"NONE"}
    assert names == set(V1_TYPES)


def test_v1_fields_all_exist_in_layer_parameter():
    fields = pb.LayerParameter.DESCRIPTOR.fields_by_name
    special = {"type", "layer", "param", "blob_share_mode", "blobs_lr", "weight_decay"}
    for fd in pb.V1LayerParameter.DESCRIPTOR.fields:
        if fd.name in special:
            continue
        assert fd.name in fields, fd.name
        assert fields[fd.name].message_type == fd.message_type, fd.name
        assert fields[fd.name].is_repeated == fd.is_repeated, fd.name


def test_v1_layer_without_type_names_the_layer():
    with pytest.raises(ConfigError) as err:
        upgrade_net(net('layers { name: "mystery" bottom: "x" top: "y" }'), "old.prototxt")
    assert "mystery" in str(err.value) and "old.prototxt" in str(err.value)


def test_layer_and_layers_together_is_an_error():
    with pytest.raises(ConfigError, match="both"):
        upgrade_net(net('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }'))


def test_v1_caffemodel_keeps_blobs():
    old = pb.NetParameter(name="CaffeNet")
    old.input.append("data")  # old caffemodels carry the input names only
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 3, 2, 2)), rng.standard_normal(4)
    conv = old.layers.add(name="conv1", type=pb.V1LayerParameter.CONVOLUTION)
    conv.bottom.append("data")
    conv.top.append("conv1")
    conv.blobs_lr.extend([1, 2])
    conv.convolution_param.num_output = 4
    blob = conv.blobs.add(num=4, channels=3, height=2, width=2)
    blob.data.extend(w.ravel().tolist())
    conv.blobs.add(num=1, channels=1, height=1, width=4).data.extend(b.tolist())
    relu = old.layers.add(name="relu1", type=pb.V1LayerParameter.RELU)
    relu.bottom.append("conv1")
    relu.top.append("conv1")
    loaded = pb.NetParameter.FromString(old.SerializeToString())  # as read from disk
    new = upgrade_net(loaded)
    assert len(new.input) == 0 and len(new.layers) == 0
    assert [lp.name for lp in new.layer] == ["conv1", "relu1"]  # no Input layer
    got = new.layer[0]
    assert got.type == "Convolution" and len(got.blobs) == 2
    assert list(got.blobs) == list(conv.blobs)
    assert (got.blobs[0].num, got.blobs[0].channels, got.blobs[0].height,
            got.blobs[0].width) == (4, 3, 2, 2)
    np.testing.assert_allclose(got.blobs[0].data, w.ravel(), rtol=1e-6)
    assert [p.lr_mult for p in got.param] == [1, 2]


# ---- V0 -----------------------------------------------------------------------
V0_NET = """
name: "CaffeNetV0"
layers { layer { name: "data" type: "data" source: "train_leveldb" meanfile: "mean.binaryproto"
                 batchsize: 256 cropsize: 227 mirror: true scale: 0.5 rand_skip: 3 }
         top: "data" top: "label" }
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 96 kernelsize: 11 stride: 4 group: 2
                 biasterm: false weight_filler { type: "gaussian" std: 0.01 }
                 blobs_lr: 1. weight_decay: 1. }
         bottom: "pad1" top: "conv1" }
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 } bottom: "conv1"
         top: "pool1" }
layers { layer { name: "norm1" type: "lrn" local_size: 5 alpha: 0.0001 beta: 0.75 k: 2 }
         bottom: "pool1" top: "norm1" }
layers { layer { name: "pad2" type: "padding" pad: 1 } bottom: "norm1" top: "pad2" }
layers { layer { name: "pool2" type: "pool" pool: MAX kernelsize: 3 stride: 1 } bottom: "pad2"
         top: "pool2" }
layers { layer { name: "cat" type: "concat" concat_dim: 1 } bottom: "pool2" bottom: "norm1"
         top: "cat" }
layers { layer { name: "fc6" type: "innerproduct" num_output: 10 bias_filler { type: "constant"
                 value: 1 } blobs_lr: 1. blobs_lr: 2. weight_decay: 1. weight_decay: 0. }
         bottom: "cat" top: "fc6" }
layers { layer { name: "drop6" type: "dropout" dropout_ratio: 0.4 } bottom: "fc6" top: "fc6" }
layers { layer { name: "loss" type: "softmax_loss" } bottom: "fc6" bottom: "label" top: "loss" }
"""

V0_EXPECTED = """
name: "CaffeNetV0"
layer { name: "data" type: "Data" top: "data" top: "label"
        data_param { source: "train_leveldb" batch_size: 256 rand_skip: 3 }
        transform_param { mean_file: "mean.binaryproto" crop_size: 227 mirror: true scale: 0.5 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 decay_mult: 1 }
        convolution_param { num_output: 96 kernel_size: 11 stride: 4 group: 2 pad: 2
                            bias_term: false weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
        lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 k: 2 } }
layer { name: "pool2" type: "Pooling" bottom: "norm1" top: "pool2"
        pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "cat" type: "Concat" bottom: "pool2" bottom: "norm1" top: "cat"
        concat_param { concat_dim: 1 } }
layer { name: "fc6" type: "InnerProduct" bottom: "cat" top: "fc6"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 10 bias_filler { type: "constant" value: 1 } } }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" dropout_param { dropout_ratio: 0.4 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc6" bottom: "label" top: "loss" }
"""


def test_v0_net_upgrades_and_folds_padding(caplog):
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        new = upgrade_net(net(V0_NET), "caffenet_v0.prototxt")
    assert_same(new, V0_EXPECTED)
    assert len(caplog.records) == 1 and "V0 layers" in caplog.records[0].getMessage()


def test_v0_deploy_with_inputs_and_blobs():
    old = net("""
      input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
      layers { layer { name: "ip" type: "innerproduct" num_output: 2
                       blobs { num: 1 channels: 1 height: 2 width: 3 data: [1, 2, 3, 4, 5, 6] } }
               bottom: "data" top: "ip" }
      layers { layer { name: "prob" type: "softmax" } bottom: "ip" top: "prob" }
    """)
    assert_same(upgrade_net(old), """
      layer { name: "input" type: "Input" top: "data"
              input_param { shape { dim: [1, 3, 8, 8] } } }
      layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
              blobs { num: 1 channels: 1 height: 2 width: 3 data: [1, 2, 3, 4, 5, 6] }
              inner_product_param { num_output: 2 } }
      layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
    """)


def test_v0_window_and_hdf5_fields():
    new = upgrade_net(net("""
      layers { layer { name: "w" type: "window_data" source: "win.txt" batchsize: 8
                       det_fg_threshold: 0.6 det_bg_threshold: 0.4 det_fg_fraction: 0.3
                       det_context_pad: 16 det_crop_mode: "square" } top: "d" top: "l" }
      layers { layer { name: "h" type: "hdf5_data" source: "h5.txt" batchsize: 2 } top: "x" }
      layers { layer { name: "o" type: "hdf5_output" hdf5_output_param { file_name: "o.h5" } }
               bottom: "x" }
      layers { layer { name: "img" type: "images" source: "list.txt" shuffle_images: true
                       new_height: 32 new_width: 30 } top: "im" top: "lb" }
    """))
    assert_same(new, """
      layer { name: "w" type: "WindowData" top: "d" top: "l"
              window_data_param { source: "win.txt" batch_size: 8 fg_threshold: 0.6
                                  bg_threshold: 0.4 fg_fraction: 0.3 context_pad: 16
                                  crop_mode: "square" } }
      layer { name: "h" type: "HDF5Data" top: "x" hdf5_data_param { source: "h5.txt" batch_size: 2 } }
      layer { name: "o" type: "HDF5Output" bottom: "x" hdf5_output_param { file_name: "o.h5" } }
      layer { name: "img" type: "ImageData" top: "im" top: "lb"
              image_data_param { source: "list.txt" shuffle: true new_height: 32 new_width: 30 } }
    """)


def test_v0_unknown_type_names_layer_and_type():
    with pytest.raises(ConfigError) as err:
        upgrade_net(net('layers { layer { name: "odd" type: "warp_ctc" } top: "x" }'),
                    "v0.prototxt")
    text = str(err.value)
    assert "odd" in text and "warp_ctc" in text and "v0.prototxt" in text


def test_v0_padding_into_non_conv_is_an_error():
    with pytest.raises(ConfigError, match="padding"):
        upgrade_net(net("""
          input: "data"
          layers { layer { name: "pad" type: "padding" pad: 1 } bottom: "data" top: "p" }
          layers { layer { name: "relu" type: "relu" } bottom: "p" top: "r" }
        """))


def test_v0_field_on_wrong_type_is_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        new = upgrade_net(net('input: "x" layers { layer { name: "r" type: "relu" num_output: 3 } '
                              'bottom: "x" top: "x" }'))
    assert_same(new, 'layer { name: "r" type: "ReLU" bottom: "x" top: "x" }')
    assert any("num_output" in r.getMessage() for r in caplog.records)


def test_v0_mixed_with_v1_is_an_error():
    with pytest.raises(ConfigError, match="mixes"):
        upgrade_net(net('layers { layer { name: "a" type: "relu" } bottom: "x" top: "x" } '
                        'layers { name: "b" type: RELU bottom: "x" top: "x" }'))


# ---- net-level inputs ---------------------------------------------------------
RELU = 'layer { name: "relu" type: "ReLU" bottom: "data" top: "out" }'


def test_input_dim_becomes_input_layer_first():
    new = upgrade_net(net('name: "deploy" input: "data" input_dim: 10 input_dim: 3 '
                          'input_dim: 227 input_dim: 227 ' + RELU))
    assert_same(new, 'name: "deploy" layer { name: "input" type: "Input" top: "data" '
                     'input_param { shape { dim: [10, 3, 227, 227] } } } ' + RELU)


def test_input_shape_becomes_input_layer_first():
    new = upgrade_net(net('input: "data" input_shape { dim: [2, 3, 4] } '
                          'input: "label" input_shape { dim: 2 } force_backward: true ' + RELU))
    assert_same(new, 'force_backward: true layer { name: "input" type: "Input" top: "data" '
                     'top: "label" input_param { shape { dim: [2, 3, 4] } shape { dim: 2 } } } '
                     + RELU)


def test_two_inputs_with_input_dim():
    new = upgrade_net(net('input: "a" input: "b" input_dim: [1, 2, 3, 4, 5, 6, 7, 8]'))
    assert [list(s.dim) for s in new.layer[0].input_param.shape] == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_v1_with_inputs_gets_input_layer_first():
    new = upgrade_net(net('input: "data" input_dim: [1, 1, 2, 2] '
                          'layers { name: "r" type: RELU bottom: "data" top: "r" }'))
    assert [(lp.name, lp.type) for lp in new.layer] == [("input", "Input"), ("r", "ReLU")]


@pytest.mark.parametrize("text", [
    'input: "data" input_dim: 1 input_dim: 3 input_dim: 8',               # 3 dims, not 4
    'input: "a" input: "b" input_dim: [1, 2, 3, 4]',                      # dims for one input
    'input: "a" input: "b" input_shape { dim: 1 }',                       # one shape, two inputs
    'input_shape { dim: 1 }',                                             # shape, no input
    'input: "a" input_shape { dim: 1 } input_dim: [1, 2, 3, 4]',          # both forms
])
def test_input_count_mismatch_is_a_config_error(text):
    with pytest.raises(ConfigError):
        upgrade_net(net(text + " " + RELU), "deploy.prototxt")


# ---- BatchNorm ParamSpecs -----------------------------------------------------
def test_batch_norm_three_param_specs_get_zero_multipliers():
    old = net('layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" '
              'param { lr_mult: 1 } param { lr_mult: 1 } param { name: "s" lr_mult: 1 } }')
    assert_same(upgrade_net(old), 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" '
                                  'param { lr_mult: 0 decay_mult: 0 } '
                                  'param { lr_mult: 0 decay_mult: 0 } '
                                  'param { name: "s" lr_mult: 0 decay_mult: 0 } }')
    done = net('layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" '
               'param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 } '
               'param { lr_mult: 0 decay_mult: 0 } }')
    assert upgrade_net(done) is done


# ---- current nets are left alone ----------------------------------------------
def test_current_net_is_returned_as_is(caplog):
    current = net(CURRENT_LENET)
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        assert upgrade_net(current, "lenet.prototxt") is current
    assert not caplog.records
    assert upgrade_net(pb.NetParameter()) is not None


def _fixture_files(pattern):
    return sorted(FIXTURES.rglob(pattern))


@pytest.mark.skipif(not FIXTURES.exists(), reason="shared fixtures not present")
def test_fixture_prototxts_need_no_upgrade():
    files = _fixture_files("*.prototxt")
    assert files
    nets = 0
    for path in files:
        text = path.read_text()
        try:
            param = text_format.Parse(text, pb.NetParameter())
        except text_format.ParseError:
            param = text_format.Parse(text, pb.SolverParameter())
            assert not solver_needs_upgrade(param), path
            assert upgrade_solver(param) is param
            continue
        nets += 1
        assert not net_needs_upgrade(param), path
        assert upgrade_net(param, str(path)) is param
    assert nets >= 3


@pytest.mark.skipif(not FIXTURES.exists(), reason="shared fixtures not present")
def test_fixture_caffemodels_need_no_upgrade():
    for path in _fixture_files("*.caffemodel"):
        param = pb.NetParameter.FromString(path.read_bytes())
        assert not net_needs_upgrade(param), path


# ---- solvers ------------------------------------------------------------------
@pytest.mark.parametrize("enum_name, type_name", [
    ("SGD", "SGD"), ("NESTEROV", "Nesterov"), ("ADAGRAD", "AdaGrad"),
    ("RMSPROP", "RMSProp"), ("ADADELTA", "AdaDelta"), ("ADAM", "Adam")])
def test_solver_type_upgrades(enum_name, type_name, caplog):
    old = solver(f'net: "n.prototxt" base_lr: 0.01 solver_type: {enum_name}')
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        new = upgrade_solver(old)
    assert new.type == type_name and not new.HasField("solver_type")
    assert new.net == "n.prototxt" and new.base_lr == pytest.approx(0.01)
    assert old.HasField("solver_type")  # input untouched
    assert len(caplog.records) == 1 and "caffelite convert" in caplog.records[0].getMessage()


def test_solver_type_and_type_agreeing_is_fine():
    new = upgrade_solver(solver('solver_type: ADAM type: "Adam"'))
    assert new.type == "Adam" and not new.HasField("solver_type")


def test_solver_type_and_type_disagreeing_is_an_error():
    with pytest.raises(ConfigError, match="disagree"):
        upgrade_solver(solver('solver_type: NESTEROV type: "Adam"'), "solver.prototxt")


def test_current_solver_is_returned_as_is():
    current = solver('net: "n.prototxt" type: "Adam" base_lr: 0.001')
    assert not solver_needs_upgrade(current)
    assert upgrade_solver(current) is current


def test_solver_embedded_legacy_net_is_upgraded():
    new = upgrade_solver(solver('net_param { layers { name: "r" type: RELU bottom: "x" '
                                'top: "x" } } test_net_param { input: "x" input_dim: [1, 1, 1, 1] }'))
    assert [lp.type for lp in new.net_param.layer] == ["ReLU"]
    assert [lp.type for lp in new.test_net_param[0].layer] == ["Input"]
    assert not solver_needs_upgrade(new)


# ---- end to end through Net ---------------------------------------------------
def test_v1_deploy_builds_a_net():
    from caffelite.registry import LAYERS
    if "Input" not in LAYERS:
        pytest.skip("Input layer not implemented yet")
    from caffelite.net import Net
    old = net("""
      input: "data" input_dim: [2, 3, 1, 1]
      layers { name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip" blobs_lr: 1 blobs_lr: 2
               inner_product_param { num_output: 4 weight_filler { type: "gaussian" } } }
      layers { name: "relu" type: RELU bottom: "ip" top: "ip" }
      layers { name: "prob" type: SOFTMAX bottom: "ip" top: "prob" }
    """)
    built = Net(old, source="deploy.prototxt")
    assert built.layer_names == ["input", "ip", "relu", "prob"]
    assert built.blobs["prob"].shape == (2, 4)
