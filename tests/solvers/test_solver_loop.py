"""The training loop: iter_size, exact resume, snapshots, test nets, requests, logs."""
import io
import logging
import os
import re
from datetime import datetime

import numpy as np
import pytest

from conftest import FIXTURES
from solver_testing import solver_param_for
from caffelite.errors import ConfigError
from caffelite.io.solverstate import extra_path, read_solverstate
from caffelite.io.weights import load_weights
from caffelite.layers.base import DataLayer
from caffelite.log import setup_logging
from caffelite.io.blob_proto import blob_proto_to_array
from caffelite.proto import pb
from caffelite.registry import LAYERS, register_layer
from caffelite.solvers.base import create_solver, resolve_snapshot_prefix

N_ITEMS = 7  # not a multiple of the batch, so batches wrap around unevenly

if "TestSeqData" not in LAYERS:
    @register_layer("TestSeqData")
    class SeqDataLayer(DataLayer):
        """Items cursor, cursor+1, ... (mod N_ITEMS) of a fixed data set, one array per top;
        ``input_param.shape`` gives each top's (batch, ...) shape; a top named 'label' holds classes."""

        num_top = (1, None)
        param_name = "input_param"

        def setup(self, bottom, top):
            self.shapes = [tuple(int(d) for d in s.dim) for s in self.param.shape]
            rng = np.random.default_rng(3)
            self.sources = [rng.integers(0, 10, size=(N_ITEMS, *s[1:])).astype(float)
                            if name == "label" else rng.normal(size=(N_ITEMS, *s[1:]))
                            for name, s in zip(self.layer_param.top, self.shapes)]
            self.cursor = 0

        def reshape(self, bottom, top):
            for blob, shape in zip(top, self.shapes):
                blob.reshape(shape)

        def forward(self, bottom, top):
            index = (self.cursor + np.arange(self.shapes[0][0])) % N_ITEMS
            for blob, source in zip(top, self.sources):
                blob.set_data(source[index])
            self.cursor = int((self.cursor + len(index)) % N_ITEMS)

        def state_dict(self):
            return {**super().state_dict(), "cursor": self.cursor}

        def load_state_dict(self, state):
            super().load_state_dict(state)
            self.cursor = state["cursor"]


def net_text(batch: int = 4, dropout: bool = True) -> str:
    drop = ('layer { name: "drop" type: "Dropout" bottom: "h" top: "h" dropout_param { dropout_ratio: 0.3 } }'
            if dropout else "")
    return f"""
name: "tiny"
layer {{ name: "data" type: "TestSeqData" top: "x" top: "t"
        input_param {{ shape {{ dim: {batch} dim: 6 }} shape {{ dim: {batch} dim: 3 }} }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
        inner_product_param {{ num_output: 8 weight_filler {{ type: "gaussian" std: 0.3 }}
                               bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "h" top: "h" }}
{drop}
layer {{ name: "ip2" type: "InnerProduct" bottom: "h" top: "y"
        inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }}
"""


def solver_param(tmp_path=None, batch=4, dropout=True, **fields) -> "pb.SolverParameter":
    sp = pb.SolverParameter(base_lr=0.05, momentum=0.9, lr_policy="step", gamma=0.5, stepsize=70,
                            weight_decay=1e-3, max_iter=20, random_seed=1701)
    return solver_param_for(sp, net_text(batch, dropout), tmp_path, "tiny", fields)


class Recorder:
    """A solver callback keeping what was displayed and tested."""

    def __init__(self):
        self.displayed, self.tested, self.snapshots = [], [], []

    def on_display(self, solver, outputs):
        self.displayed.append((solver.iter, float(solver.smoothed_loss), outputs))

    def on_test(self, solver, test_net_id, results):
        self.tested.append((solver.iter, test_net_id, results))

    def on_snapshot(self, solver, model_path, state_path):
        self.snapshots.append((solver.iter, model_path, state_path))


def params_of(solver):
    return [b.cpu_data().copy() for b in solver.net.learnable_params]


# ---- iter_size ----------------------------------------------------------------------------
def test_iter_size_equals_bigger_batch():
    a = create_solver(solver_param(batch=4, dropout=False, iter_size=2), dtype=np.float64)
    b = create_solver(solver_param(batch=8, dropout=False, iter_size=1), dtype=np.float64)
    for x, y in zip(params_of(a), params_of(b)):
        np.testing.assert_array_equal(x, y)
    a.step(6)
    b.step(6)
    for x, y in zip(params_of(a), params_of(b)):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-13)
    assert a.smoothed_loss == pytest.approx(b.smoothed_loss, rel=1e-10)


# ---- exact resume -------------------------------------------------------------------------------
@pytest.mark.parametrize("type_, fmt, dtype", [
    ("SGD", pb.SolverParameter.BINARYPROTO, np.float32),
    ("Adam", pb.SolverParameter.HDF5, np.float32),
    ("Nesterov", pb.SolverParameter.BINARYPROTO, np.float64),
])
def test_resume_is_bit_exact(tmp_path, type_, fmt, dtype):
    def run(folder, resume=None):
        folder.mkdir()
        fields = dict(type=type_, snapshot_format=fmt, max_iter=200, snapshot=100, test_iter=[3],
                      test_interval=50, display=25, average_loss=10)
        if type_ == "Adam":
            fields.update(base_lr=0.01, momentum=0.9)
        solver = create_solver(solver_param(folder, **fields), dtype=dtype)
        recorder = Recorder()
        solver.callbacks.append(recorder)
        solver.solve(resume)
        return solver, recorder

    whole, whole_rec = run(tmp_path / "whole")
    ext = ".solverstate.h5" if fmt == pb.SolverParameter.HDF5 else ".solverstate"
    state = tmp_path / "whole" / f"tiny_iter_100{ext}"
    assert state.exists() and os.path.exists(extra_path(state))
    resumed, resumed_rec = run(tmp_path / "resumed", resume=str(state))
    assert resumed.iter == whole.iter == 200
    assert resumed.current_step == whole.current_step == 2
    for x, y in zip(params_of(whole), params_of(resumed)):
        assert x.dtype == dtype
        np.testing.assert_array_equal(x, y)
    for x, y in zip(whole.history, resumed.history):
        np.testing.assert_array_equal(x.cpu_data(), y.cpu_data())
    assert whole.net.state_dict() == resumed.net.state_dict()
    assert whole.test_nets[0].state_dict() == resumed.test_nets[0].state_dict()
    # The displayed (smoothed) losses and test scores after the snapshot are the same too.
    assert [d for d in whole_rec.displayed if d[0] >= 100] == resumed_rec.displayed
    assert [t for t in whole_rec.tested if t[0] >= 100] == resumed_rec.tested


def test_resume_without_sidecar_works_like_caffe(tmp_path):
    first = create_solver(solver_param(tmp_path, max_iter=10, snapshot=5), dtype=np.float64)
    first.solve()
    state = tmp_path / "tiny_iter_5.solverstate"
    os.remove(extra_path(state))
    second = create_solver(solver_param(tmp_path, max_iter=10), dtype=np.float64)
    second.restore(str(state))
    assert second.iter == 5
    weights = load_weights(str(tmp_path / "tiny_iter_5.caffemodel"))
    ip1 = [l for l in weights.layer if l.name == "ip1"][0]
    np.testing.assert_array_equal(second.net.params["ip1"][0].cpu_data(), blob_proto_to_array(ip1.blobs[0]))
    assert second.net.layer_by_name["data"].cursor == 0  # no sidecar: the data starts over


def test_restore_finds_weights_beside_the_state(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    sp = solver_param(max_iter=4, snapshot=4)
    sp.snapshot_prefix = "tiny"  # relative: learned_net is written relative to the run's folder
    create_solver(sp, dtype=np.float64).solve()
    assert read_solverstate("tiny_iter_4.solverstate").learned_net == "tiny_iter_4.caffemodel"
    monkeypatch.chdir(tmp_path)
    solver = create_solver(solver_param(max_iter=4), dtype=np.float64)
    solver.restore("a/tiny_iter_4.solverstate")
    assert solver.iter == 4


def test_restore_a_caffemodel_is_refused(tmp_path):
    solver = create_solver(solver_param(tmp_path, max_iter=2), dtype=np.float64)
    solver.solve()
    model = tmp_path / "tiny_iter_2.caffemodel"
    with pytest.raises(ConfigError, match="is a weights file, not a solver state; use --weights"):
        solver.restore(str(model))
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(model.read_bytes())
    with pytest.raises(ConfigError, match="is a weights file"):
        solver.restore(str(renamed))


def test_restore_with_another_solver_type_is_refused(tmp_path):
    create_solver(solver_param(tmp_path, max_iter=2), dtype=np.float64).solve()
    adam = create_solver(solver_param(tmp_path, type="Adam", max_iter=2), dtype=np.float64)
    with pytest.raises(ConfigError, match="holds 4 history blobs; this Adam solver needs 8"):
        adam.restore(str(tmp_path / "tiny_iter_2.solverstate"))


# ---- snapshots, requests -----------------------------------------------------------------------
def test_snapshot_files_and_final_snapshot(tmp_path):
    solver = create_solver(solver_param(tmp_path, max_iter=7, snapshot=3, snapshot_diff=True), dtype=np.float32)
    solver.solve()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"tiny_iter_{i}{ext}" for i in (3, 6, 7)
                           for ext in (".caffemodel", ".solverstate", ".solverstate.json"))
    state = read_solverstate(str(tmp_path / "tiny_iter_7.solverstate"))
    assert state.iter == 7 and state.learned_net == str(tmp_path / "tiny_iter_7.caffemodel")
    weights = load_weights(str(tmp_path / "tiny_iter_7.caffemodel"))
    ip2 = [l for l in weights.layer if l.name == "ip2"][0]
    assert len(ip2.blobs[0].diff) == ip2.blobs[0].shape.dim[0] * ip2.blobs[0].shape.dim[1]


def test_no_duplicate_final_snapshot(tmp_path):
    rec = Recorder()
    solver = create_solver(solver_param(tmp_path, max_iter=6, snapshot=3), dtype=np.float64)
    solver.callbacks.append(rec)
    solver.solve()
    assert [s[0] for s in rec.snapshots] == [3, 6]


def test_request_snapshot_and_stop(tmp_path, logs):
    class Asker:
        def on_iteration_end(self, solver):
            if solver.iter == 3:
                solver.request_snapshot()
            if solver.iter == 5:
                solver.request_stop()

    rec = Recorder()
    solver = create_solver(solver_param(tmp_path, max_iter=50), dtype=np.float64)
    solver.callbacks += [Asker(), rec]
    solver.solve()
    assert solver.iter == 5
    assert [s[0] for s in rec.snapshots] == [3, 5]  # asked at 3; snapshot_after_train at the stop
    assert "Optimization stopped early." in logs
    assert "Optimization Done." not in logs


def test_stop_during_test(tmp_path):
    solver = create_solver(solver_param(tmp_path, max_iter=50, test_iter=[5], test_interval=10),
                           dtype=np.float64)
    solver.step(10)
    solver.request_stop()
    solver.step(5)  # testing at iteration 10 sees the request first
    assert solver.requested_early_exit and solver.iter == 10


@pytest.mark.parametrize("prefix, source, want", [
    (None, "/x/solver.prototxt", "/x/solver"),
    (None, "/x/lenet_solver.yaml", "/x/lenet_solver"),
    ("out/", "/x/solver.prototxt", os.path.join("out/", "solver")),
    ("snaps/lenet", "/x/solver.prototxt", "snaps/lenet"),
    (None, None, None),
])
def test_snapshot_prefix_rules(prefix, source, want):
    sp = pb.SolverParameter()
    if prefix is not None:
        sp.snapshot_prefix = prefix
    assert resolve_snapshot_prefix(sp, source) == want


def test_existing_folder_prefix(tmp_path):
    sp = pb.SolverParameter(snapshot_prefix=str(tmp_path))
    assert resolve_snapshot_prefix(sp, "conf/my_solver.prototxt") == str(tmp_path / "my_solver")


def test_prefix_needed(tmp_path):
    sp = solver_param(max_iter=2)
    sp.snapshot_after_train = True
    with pytest.raises(ConfigError, match="snapshot_prefix"):
        create_solver(sp)


# ---- test nets ------------------------------------------------------------------------------------
def test_test_nets_from_generic_net(logs):
    sp = solver_param(max_iter=4, test_iter=[2, 3], test_interval=2, test_compute_loss=True)
    sp.test_state.add(stage=["a"])
    sp.test_state.add(stage=["b"])
    solver = create_solver(sp, dtype=np.float64)
    assert len(solver.test_nets) == 2
    assert [list(n.state.stage) for n in solver.test_nets] == [["a"], ["b"]]
    assert solver.net.phase == 0 and all(n.phase == 1 for n in solver.test_nets)
    solver.net.params["ip1"][0].data[...] = 0.5  # test nets share the train net's weights
    assert np.all(solver.test_nets[1].params["ip1"][0].cpu_data() == 0.5)
    rec = Recorder()
    solver.callbacks.append(rec)
    solver.step(4)
    assert [(t[0], t[1]) for t in rec.tested] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert any(m.startswith("Test loss: ") for m in logs)
    assert "Iteration 2, Testing net (#1)" in logs


def test_test_scores_are_means_over_test_iter(logs):
    sp = solver_param(max_iter=1, test_iter=[3], test_interval=1, dropout=False)
    solver = create_solver(sp, dtype=np.float64)
    net = solver.test_nets[0]
    expected = np.mean([net.forward() for _ in range(3)])
    net.layer_by_name["data"].cursor = 0
    results = solver.test(0)
    assert results == [("loss", pytest.approx(expected, rel=1e-12), 1.0)]
    line = [m for m in logs if "Test net output #0" in m][-1]
    assert re.fullmatch(r"    Test net output #0: loss = (\S+) \(\* 1 = \1 loss\)", line)


@pytest.mark.parametrize("fields, match", [
    (dict(test_iter=[2], test_interval=5, test_state=[pb.NetState(), pb.NetState()]), "test_state"),
    (dict(average_loss=0), "average_loss"),
    (dict(iter_size=0), "iter_size"),
])
def test_solver_param_checks(fields, match):
    with pytest.raises(ConfigError, match=match):
        create_solver(solver_param(**fields))


def test_train_net_must_be_unique():
    sp = solver_param()
    sp.train_net = "other.prototxt"
    with pytest.raises(ConfigError, match="more than one train net"):
        create_solver(sp)


# ---- logs ------------------------------------------------------------------------------------------
PARSE_LOG = {  # Caffe's tools/extra/parse_log.py
    "iteration": re.compile(r"Iteration (\d+)"),
    "train": re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)"),
    "test": re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)"),
    "lr": re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)"),
}
GLOG = re.compile(r"I(\d{2})(\d{2}) (\d\d:\d\d:\d\d\.\d{6}) \d+ [\w.]+\.py:\d+\] (.*)")


def test_log_lines_have_caffe_shape(tmp_path):
    stream = io.StringIO()
    setup_logging(stream)
    try:
        solver = create_solver(solver_param(tmp_path, max_iter=4, display=2, test_iter=[2], test_interval=2,
                                            lr_policy="inv", gamma=1e-4, power=0.75, base_lr=0.01))
        solver.solve()
    finally:
        logger = logging.getLogger("caffelite")
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    messages = []
    for line in stream.getvalue().splitlines():
        m = GLOG.fullmatch(line)
        if m is None:  # continuation lines of the multi-line parameter dump
            continue
        datetime(2024, int(m.group(1)), int(m.group(2)))  # parse_log.py reads the date like this
        datetime.strptime(m.group(3), "%H:%M:%S.%f")
        messages.append(m.group(4))
    assert "Iteration 2, lr = 0.0099985" in messages
    assert "Learning Rate Policy: inv" in messages
    tail = messages[messages.index("Iteration 4, Testing net (#0)") - 3:]
    assert tail[0] == f"Snapshotting to binary proto file {tmp_path / 'tiny_iter_4.caffemodel'}"
    assert tail[1] == f"Snapshotting solver state to binary proto file {tmp_path / 'tiny_iter_4.solverstate'}"
    assert re.fullmatch(r"Iteration 4, loss = [\d.e+-]+", tail[2])
    assert tail[-1] == "Optimization Done."
    train = [m for m in messages if PARSE_LOG["train"].search(m)]
    assert re.fullmatch(r"    Train net output #0: loss = (\S+) \(\* 1 = \1 loss\)", train[0])
    assert len(train) == 2 and len([m for m in messages if PARSE_LOG["test"].search(m)]) == 3
    assert [PARSE_LOG["lr"].search(m).group(1) for m in messages if "lr = " in m] == ["0.01", "0.0099985"]


# ---- real Caffe snapshots ---------------------------------------------------------------------------
def _layers_available(net_path) -> bool:
    from caffelite import config

    return all(l.type in LAYERS for l in config.load_net(net_path).layer)


@pytest.mark.parametrize("folder, solver_file, state_file, n_hist", [
    ("lenet", "lenet_solver.prototxt", "lenet_iter_10000.solverstate", 8),
    ("net", "solver.prototxt", "fixture_iter_20.solverstate", 36),
    ("net", "solver_h5.prototxt", "fixture_h5_iter_12.solverstate.h5", 18),
])
def test_restore_real_caffe_snapshot(request, tmp_path, folder, solver_file, state_file, n_hist):
    from caffelite import config

    base = FIXTURES / folder
    sp = config.load_solver(base / solver_file, [f"snapshot_prefix={tmp_path / 'x'}"])
    if not _layers_available(sp.net):
        pytest.skip("layers of this net are not all registered yet")
    solver = create_solver(sp, source=str(base / solver_file))
    request.addfinalizer(solver.close)  # releases the LMDB handles of the data layers
    solver.restore(str(base / state_file))
    state = read_solverstate(str(base / state_file))
    assert solver.iter == state.iter and solver.current_step == state.current_step
    assert len(solver.history) == n_hist
    for blob, array in zip(solver.history, state.history):
        np.testing.assert_array_equal(blob.cpu_data(), array.reshape(blob.shape))
    weights = load_weights(str(base / state.learned_net))
    for layer in weights.layer:
        for blob, proto in zip(solver.net.params.get(layer.name, []), layer.blobs):
            np.testing.assert_array_equal(blob.cpu_data(), blob_proto_to_array(proto).reshape(blob.shape))
