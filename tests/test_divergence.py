"""A NaN/Inf loss stops training with the iteration, the guilty layer, and the last good snapshot."""
import re

import numpy as np
import pytest

from caffelite.cli import main
from caffelite.config import parse_net
from caffelite.diagnose import diagnose
from caffelite.io.solverstate import read_solverstate
from caffelite.io.weights import load_weights
from caffelite.layers.base import TRAIN
from caffelite.net import Net

LAYERS = '''
import numpy as np
from caffelite.layers.base import Layer


class NaNFrom(Layer):
    """Identity; from forward call F on its output holds NaN, from call B on its bottom diff Inf."""
    num_bottom = 1
    num_top = 1

    def setup(self, bottom, top):
        kv = dict(item.split("=") for item in self.param_str.split(",") if item)
        self.fwd, self.bwd = int(kv.get("forward", -1)), int(kv.get("backward", -1))
        self.calls = 0

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data
        if 0 <= self.fwd <= self.calls:
            top[0].data[0, 0] = np.nan
        self.calls += 1

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff
        if 0 <= self.bwd <= self.calls - 1:
            bottom[0].diff[0, 0] = np.inf
'''

NET = """name: tiny
layer:
  - {{name: data, type: DummyData, top: [x, t],
     dummy_data_param: {{shape: [{{dim: [4, 6]}}, {{dim: [4, 3]}}], data_filler: [{data_filler}]}}}}
  - {{name: ip1, type: InnerProduct, bottom: x, top: h,
     inner_product_param: {{num_output: 5, weight_filler: {{type: gaussian, std: 0.3}}}}}}
  - {{name: bad, type: Python, bottom: h, top: h2,
     python_param: {{module: divergence_layers, layer: NaNFrom, param_str: "{param_str}"}}}}
  - {{name: ip2, type: InnerProduct, bottom: h2, top: y,
     inner_product_param: {{num_output: 3, weight_filler: {{type: gaussian, std: 0.3}}}}}}
  - {{name: loss, type: EuclideanLoss, bottom: [y, t], top: loss}}
"""

SOLVER = """net: net.yaml
base_lr: 0.01
momentum: 0.9
lr_policy: fixed
max_iter: 20
snapshot: 5
snapshot_prefix: snaps/tiny
random_seed: 1
solver_mode: CPU
display: 0
"""


def train(tmp_path, monkeypatch, capsys, param_str="", data_filler="{type: gaussian}", extra=()):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "divergence_layers.py").write_text(LAYERS)
    (tmp_path / "net.yaml").write_text(NET.format(param_str=param_str, data_filler=data_filler))
    (tmp_path / "solver.yaml").write_text(SOLVER)
    code = main(["train", "--solver", "solver.yaml", "--run_dir", "none", *extra])
    err = capsys.readouterr().err
    return code, err, err.strip().splitlines()[-1]


def snapshot_iters(tmp_path):
    return sorted(int(m.group(1)) for p in (tmp_path / "snaps").glob("tiny_iter_*.caffemodel")
                  if (m := re.search(r"_iter_(\d+)\.caffemodel$", p.name)))


def test_forward_nan_names_the_layer_and_keeps_the_last_good_snapshot(tmp_path, monkeypatch, capsys):
    code, err, line = train(tmp_path, monkeypatch, capsys, "forward=7")
    assert code == 4
    assert "Traceback" not in err
    assert line.startswith("caffelite train: error: net.yaml:7: iteration 7: the loss is nan")
    assert "layer 'bad' (Python) produced NaN in its output 'h2' from finite inputs (forward)" in line
    assert "resume with --snapshot snaps/tiny_iter_5.solverstate" in line
    assert "lower base_lr" in line and "clip_gradients" in line
    # Stopped at once: no later snapshot, in particular no final one of the diverged weights.
    assert snapshot_iters(tmp_path) == [5]
    assert read_solverstate(tmp_path / "snaps/tiny_iter_5.solverstate").iter == 5
    for layer in load_weights(str(tmp_path / "snaps/tiny_iter_5.caffemodel")).layer:
        for blob in layer.blobs:
            assert np.isfinite(blob.data).all()


def test_backward_inf_is_found_when_gradients_are_clipped(tmp_path, monkeypatch, capsys):
    code, _, line = train(tmp_path, monkeypatch, capsys, "backward=7", extra=["--set", "clip_gradients=100"])
    assert code == 4
    assert "iteration 7: the gradient's L2 norm is inf" in line
    assert "layer 'bad' (Python) produced Inf in the gradient of its input 'h' from finite gradients (backward)" in line
    assert snapshot_iters(tmp_path) == [5]


def test_weights_broken_by_an_update_are_never_snapshotted(tmp_path, monkeypatch, capsys):
    # The gradient turns Inf at iteration 9; its update breaks ip1; iteration 10 would snapshot them.
    code, _, line = train(tmp_path, monkeypatch, capsys, "backward=9")
    assert code == 4
    assert "before the snapshot of iteration 10: the weights are not finite" in line
    assert "the weights of layer(s) 'ip1' hold" in line
    assert "resume with --snapshot snaps/tiny_iter_5.solverstate" in line
    assert snapshot_iters(tmp_path) == [5]


def test_non_finite_input_data_is_reported_as_such(tmp_path, monkeypatch, capsys):
    code, _, line = train(tmp_path, monkeypatch, capsys, data_filler="{type: constant, value: .nan}")
    assert code == 4
    assert "iteration 0: the loss is nan" in line
    assert "the input 'x' from layer 'data' (DummyData) holds NaN" in line
    assert "no snapshot was written yet" in line


def test_log_of_negative_input_is_diagnosed_by_name():
    net = Net(parse_net("""name: logs
layer:
  - {name: in, type: Input, top: x, input_param: {shape: {dim: [2, 3]}}}
  - {name: scale, type: Power, bottom: x, top: s, power_param: {scale: 2.0}}
  - {name: log, type: Log, bottom: s, top: l}
  - {name: loss, type: EuclideanLoss, bottom: [l, x], top: loss}
"""), phase=TRAIN, dtype=np.float64)
    net.blobs["x"].data[...] = -np.arange(1, 7).reshape(2, 3)
    with np.errstate(invalid="ignore"):
        assert not np.isfinite(net.forward())
    found = diagnose(net)
    assert (found.stage, found.layer, found.blob) == ("forward", "log", "l")
    assert "layer 'log' (Log) produced NaN" in found.detail


def test_diagnose_reports_nothing_for_a_healthy_net():
    net = Net(parse_net("""name: ok
layer:
  - {name: in, type: Input, top: [x, t], input_param: {shape: [{dim: [2, 3]}, {dim: [2, 4]}]}}
  - {name: ip, type: InnerProduct, bottom: x, top: y, inner_product_param: {num_output: 4}}
  - {name: loss, type: EuclideanLoss, bottom: [y, t], top: loss}
"""), phase=TRAIN, dtype=np.float64)
    found = diagnose(net)
    assert found.stage is None
    assert "did not repeat" in found.detail


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
