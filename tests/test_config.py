"""Net and solver files: YAML and prototxt, line-numbered errors, paths, overrides."""
import os

import pytest
from google.protobuf import text_format

from caffelite import config
from caffelite.errors import ConfigError
from caffelite.proto import pb
from conftest import FIXTURES

BLOCK = """
name: LeNet
layer:
  - name: mnist
    type: Data
    top: [data, label]
    include: {phase: TRAIN}
    transform_param: {scale: 0.00390625}
    data_param: {source: mnist_lmdb, batch_size: 64, backend: LMDB}
  - name: conv1
    type: Convolution
    bottom: data
    top: conv1
    param: [{lr_mult: 1}, {lr_mult: 2}]
    convolution_param:
      num_output: 20
      kernel_size: 5
      weight_filler: {type: xavier}
"""

PROTOTXT = """
name: "LeNet"
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 }
  data_param { source: "mnist_lmdb" batch_size: 64 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } } }
"""


def test_yaml_equals_prototxt():
    assert config.parse_net(BLOCK) == config.parse_net(PROTOTXT, "prototxt")


def test_flow_style_and_scalar_for_repeated():
    net = config.parse_net("layer: [{name: a, type: Input, top: x, input_param: {shape: {dim: 3}}}]")
    assert list(net.layer[0].top) == ["x"]
    assert list(net.layer[0].input_param.shape[0].dim) == [3]


def test_solver_fields_and_enums():
    solver = config.parse_solver("base_lr: 0.01\nlr_policy: inv\nsolver_mode: CPU\ntest_iter: 20\nstepvalue: [1, 2]")
    assert solver.base_lr == pytest.approx(0.01) and solver.lr_policy == "inv"
    assert solver.solver_mode == pb.SolverParameter.CPU
    assert list(solver.test_iter) == [20] and list(solver.stepvalue) == [1, 2]


def test_strings_keep_their_text():
    # YAML would read 1e-3 and yes as a float and a bool; string fields take the text as written.
    net = config.parse_net("name: 1e-3\nlayer: [{name: yes, type: Input}]")
    assert net.name == "1e-3" and net.layer[0].name == "yes"


@pytest.mark.parametrize("text, pattern", [
    ("layer: [{name: a, type: Input, botom: x}]", r"<string>:1: layer 'a': unknown key 'botom' .*did you mean 'bottom'"),
    ("name: x\nlayer:\n  - {name: c, type: Convolution, convolution_param: {num_output: many}}",
     r"<string>:3: layer 'c': 'num_output' takes an integer, got 'many'"),
    ("layer: [{name: p, type: Pooling, pooling_param: {pool: MAXX}}]", r"bad value 'MAXX' for 'pool'.*did you mean 'MAX'"),
    ("layer: [{name: a, type: Input, include: {phase: TRAIN}, include: {phase: TEST}}]", r"key 'include' appears twice"),
    ("layer: [{name: a, type: ReLU, relu_param: 3}]", r"expected a mapping of ReLUParameter fields"),
    ("layer: [{name: a, type: Input, top: [x, [y]]}]", r"'top' takes a single value"),
    ("force_backward: maybe", r"'force_backward' takes true or false"),
    ("name: [unclosed", r"<string>:1: malformed YAML"),
    ("", r"the file is empty"),
])
def test_yaml_errors_name_line_layer_and_fix(text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config.parse_net(text)


def test_prototxt_error_names_line_layer_and_suggestion(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(PROTOTXT.replace("kernel_size: 5", "kernal_size: 5"))
    with pytest.raises(ConfigError) as info:
        config.load_net(path)
    message = str(info.value)
    assert f"{path}:8" in message and "layer 'conv1'" in message
    assert "unknown field 'kernal_size' in ConvolutionParameter" in message
    assert "did you mean 'kernel_size'" in message


def test_layer_lines_are_recorded(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text(BLOCK)
    config.load_net(path)
    assert config.layer_line(path, "mnist") == 4
    assert config.layer_line(path, "conv1") == 10


def test_missing_file():
    with pytest.raises(ConfigError, match="net file not found"):
        config.load_net("no/such/net.yaml")


def test_paths_resolve_against_the_file_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "mnist_lmdb").mkdir()
    (folder / "net.yaml").write_text(BLOCK)
    (folder / "solver.yaml").write_text("net: net.yaml\nsnapshot_prefix: snaps/lenet\nbase_lr: 0.1\n")
    monkeypatch.chdir(tmp_path)
    net = config.load_net("configs/net.yaml")
    assert net.layer[0].data_param.source == os.path.join("configs", "mnist_lmdb")
    solver = config.load_solver("configs/solver.yaml", ["max_iter=7", "snapshot_prefix=out/x", "test_iter=[3, 4]"])
    assert solver.net == os.path.join("configs", "net.yaml")
    assert solver.max_iter == 7 and solver.snapshot_prefix == "out/x" and list(solver.test_iter) == [3, 4]


def test_caffe_root_relative_paths_still_work(tmp_path, monkeypatch):
    (tmp_path / "examples" / "mnist" / "mnist_lmdb").mkdir(parents=True)
    (tmp_path / "examples" / "mnist" / "net.prototxt").write_text(
        PROTOTXT.replace('"mnist_lmdb"', '"examples/mnist/mnist_lmdb"'))
    monkeypatch.chdir(tmp_path)
    net = config.load_net("examples/mnist/net.prototxt")
    assert net.layer[0].data_param.source == "examples/mnist/mnist_lmdb"


@pytest.mark.parametrize("item, pattern", [("max_iter", "key=value"), ("max_itr=3", "did you mean 'max_iter'"),
                                           ("max_iter=lots", "takes an integer")])
def test_bad_overrides(item, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config.apply_overrides(pb.SolverParameter(), [item])


def test_every_fixture_prototxt_loads():
    for path in sorted(FIXTURES.rglob("*.prototxt")):
        message = pb.SolverParameter() if "solver" in path.name else pb.NetParameter()
        text_format.Parse(path.read_text(), message)
        loaded = config.load_solver(path) if "solver" in path.name else config.load_net(path)
        assert loaded.ListFields(), path
