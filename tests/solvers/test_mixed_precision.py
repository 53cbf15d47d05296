"""Mixed precision: float16 nets, float32 master weights, dynamic loss scaling, float32
snapshots, exact resume; bfloat16 refused on the CPU. The last section runs on a GPU, where the
overflow check, the update and the loss scale live on the device (flat_update.py,
kernels/mixed.py); it is skipped cleanly without CuPy and a GPU."""

import numpy as np
import pytest

from caffelite.backend import Device
from caffelite.errors import ConfigError, TrainingError
from caffelite.io.weights import load_weights, save_weights
from caffelite.layers.base import DataLayer
from caffelite.io.blob_proto import blob_proto_to_array
from caffelite.proto import pb
from caffelite.registry import LAYERS, register_layer
from caffelite.solvers.base import create_solver
from caffelite.solvers.flat_update import FlatUpdate
from caffelite.solvers.mixed_precision import LossScaler
from conftest import gpu_ready
from solver_testing import solver_param_for

N_ITEMS, DIM, CLASSES = 48, 8, 4

if "MixedPrecisionTestData" not in LAYERS:
    @register_layer("MixedPrecisionTestData")
    class _ClassData(DataLayer):
        """A fixed, learnable classification set: x = centre[label] + noise, batches in order."""

        num_top = 2
        param_name = "input_param"

        def setup(self, bottom, top):
            self.batch = int(self.param.shape[0].dim[0])
            rng = np.random.default_rng(11)
            centres = rng.normal(size=(CLASSES, DIM)) * 2
            self.labels = np.arange(N_ITEMS) % CLASSES
            self.x = centres[self.labels] + rng.normal(size=(N_ITEMS, DIM)) * 0.7
            self.cursor = 0

        def reshape(self, bottom, top):
            top[0].reshape((self.batch, DIM))
            top[1].reshape((self.batch,))

        def forward(self, bottom, top):
            index = (self.cursor + np.arange(self.batch)) % N_ITEMS
            top[0].set_data(self.x[index])
            top[1].set_data(self.labels[index].astype(float))
            self.cursor = int((self.cursor + self.batch) % N_ITEMS)

        def state_dict(self):
            return {**super().state_dict(), "cursor": self.cursor}

        def load_state_dict(self, state):
            super().load_state_dict(state)
            self.cursor = state["cursor"]


NET = """
name: "mp"
layer { name: "data" type: "MixedPrecisionTestData" top: "x" top: "label"
        input_param { shape { dim: 12 dim: 8 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
        inner_product_param { num_output: 16 weight_filler { type: "gaussian" std: 0.3 }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "bn" type: "BatchNorm" bottom: "h" top: "h" }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "y"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "y" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "y" bottom: "label" top: "acc" include { phase: TEST } }
"""


def solver_param(tmp_path=None, **fields):
    sp = pb.SolverParameter(base_lr=0.05, momentum=0.9, lr_policy="fixed", weight_decay=1e-4,
                            max_iter=60, random_seed=1701, display=0)
    return solver_param_for(sp, NET, tmp_path, "mp", fields)


class LossLog:
    def __init__(self):
        self.losses = []

    def on_iteration_end(self, solver):
        self.losses.append(float(solver.loss))


def train(sp, iters=None):
    solver = create_solver(sp)
    record = LossLog()
    solver.callbacks.append(record)
    solver.step(iters if iters is not None else sp.max_iter)
    return solver, record.losses


# ---- training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("type_", ["SGD", "Adam"])
def test_float16_trains_like_float32(type_):
    extra = {"base_lr": 0.01, "momentum": 0.9} if type_ == "Adam" else {}
    full, full_losses = train(solver_param(type=type_, **extra))
    half, half_losses = train(solver_param(type=type_, compute_dtype="float16", **extra))
    # The net computes in float16; the update's weights and history are float32.
    assert all(p.dtype == np.float16 for p in half.net.learnable_params)
    assert all(p.dtype == np.float32 for p in half.learnable_params)
    assert all(h.dtype == np.float32 for h in half.history)
    assert all(p.dtype == np.float16 for net in half.test_nets for layer in net.layers for p in layer.blobs)
    # Same start (fp16-rounded fillers), same descent.
    first, last = np.mean(half_losses[:5]), np.mean(half_losses[-10:])
    assert last < 0.3 * first
    assert abs(np.mean(full_losses[-10:]) - last) < 0.1 * np.mean(full_losses[:5])
    assert abs(full_losses[0] - half_losses[0]) < 0.02 * full_losses[0]
    # The compute-dtype net holds the master weights, rounded.
    for master, p, lr in zip(half.learnable_params, half.net.learnable_params, half.net.params_lr):
        if lr:
            np.testing.assert_array_equal(p.cpu_data(), master.cpu_data().astype(np.float16))


def test_test_net_runs_in_float16_and_scores():
    solver = create_solver(solver_param(compute_dtype="float16", test_iter=[4], test_interval=30,
                                        max_iter=60))
    solver.solve()
    accuracy = dict((name, value) for name, value, _ in solver.test_results[-1])["acc"]
    assert accuracy > 0.8


# ---- loss scaling --------------------------------------------------------------------------------
class InjectOverflow:
    """Writes an Inf into one gradient of the compute-dtype net at the given iterations."""

    def __init__(self, iterations):
        self.iterations = set(iterations)

    def on_gradients_ready(self, solver):
        if solver.iter in self.iterations:
            solver.net.learnable_params[0].diff[0, 0] = np.inf


def test_overflow_is_skipped_logged_and_halves_the_scale(logs):
    solver = create_solver(solver_param(compute_dtype="float16", loss_scale=1024))
    solver.callbacks.append(InjectOverflow([5, 6]))
    solver.step(5)
    masters = [p.cpu_data().copy() for p in solver.learnable_params]
    history = [h.cpu_data().copy() for h in solver.history]
    assert solver.mixed.scaler.scale == 1024
    solver.step(2)  # iterations 5 and 6 overflow
    assert solver.iter == 7
    for before, p in zip(masters, solver.learnable_params):
        np.testing.assert_array_equal(before, p.cpu_data())
    for before, h in zip(history, solver.history):
        np.testing.assert_array_equal(before, h.cpu_data())
    assert solver.mixed.scaler.scale == 256
    assert "Iteration 5: gradient overflow, skipping the update; loss scale -> 512" in logs
    assert "Iteration 6: gradient overflow, skipping the update; loss scale -> 256" in logs
    solver.step(1)  # a clean iteration updates again
    assert any(not np.array_equal(b, p.cpu_data()) for b, p in zip(masters, solver.learnable_params))


def test_loss_scale_multiplies_the_loss_gradient():
    solver = create_solver(solver_param(compute_dtype="float16", loss_scale=256, dynamic_loss_scale=False))
    solver.step(1)
    loss_top = solver.net.blobs["loss"]
    assert float(loss_top.cpu_diff()) == 256.0
    # The master gradient is the unscaled one: compare with a float32 solver's first gradient.
    full = create_solver(solver_param())
    full.net.clear_param_diffs()
    full.net.forward_backward()
    half = create_solver(solver_param(compute_dtype="float16", loss_scale=256))
    half.net.clear_param_diffs()
    half.mixed.before_forward()
    half.net.forward_backward()
    assert half.mixed.unscale()
    for master, p in zip(half.learnable_params, full.net.learnable_params):
        np.testing.assert_allclose(master.cpu_diff(), p.cpu_diff(), rtol=0.05, atol=2e-3)


def test_scale_doubles_after_clean_window_and_is_capped(logs):
    solver = create_solver(solver_param(compute_dtype="float16", loss_scale=1024, loss_scale_window=4))
    solver.step(8)
    assert solver.mixed.scaler.scale == 4096
    assert "Iteration 3: 4 iterations without overflow; loss scale -> 2048" in logs
    # 65536 * loss weight 1 does not fit float16 (max 65504): capped at 32768.
    capped = create_solver(solver_param(compute_dtype="float16"))
    assert capped.mixed.scaler.scale == 32768
    assert any("does not fit float16" in line for line in logs)


def test_static_scale_skips_but_keeps_the_scale(logs):
    solver = create_solver(solver_param(compute_dtype="float16", loss_scale=128, dynamic_loss_scale=False))
    solver.callbacks.append(InjectOverflow([2]))
    solver.step(4)
    assert solver.mixed.scaler.scale == 128
    assert "Iteration 2: gradient overflow, skipping the update; loss scale -> 128" in logs


def test_scale_below_one_is_a_training_error():
    solver = create_solver(solver_param(compute_dtype="float16", loss_scale=1))
    solver.callbacks.append(InjectOverflow([0]))
    with pytest.raises(TrainingError, match="overflow even with loss scale 1"):
        solver.step(1)


def test_loss_scaler_rule():
    scaler = LossScaler(8, window=2, max_scale=16)
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 16
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 16  # capped
    scaler.update(True)
    assert (scaler.scale, scaler.clean) == (8, 0)


# ---- snapshots and resume ----------------------------------------------------------------------
def test_snapshots_hold_float32_master_weights(tmp_path):
    solver = create_solver(solver_param(tmp_path, compute_dtype="float16", max_iter=10))
    solver.solve()
    model = load_weights(str(tmp_path / "mp_iter_10.caffemodel"))
    stored = {layer.name: [blob_proto_to_array(b) for b in layer.blobs] for layer in model.layer if layer.blobs}
    masters = dict(zip((name for name, _ in solver.net._param_state._where), solver.learnable_params))
    assert set(stored) == {"ip1", "bn", "ip2"}
    for (name, j), master in zip(solver.net._param_state._where, solver.learnable_params):
        array = stored[name][j]
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array.reshape(master.shape), master.cpu_data())
    # Full precision: the trained float32 weights are not all float16 values.
    ip1 = stored["ip1"][0]
    assert not np.array_equal(ip1, ip1.astype(np.float16).astype(np.float32))
    # The BatchNorm statistics (lr_mult 0) are the compute net's, which BatchNorm updates itself.
    np.testing.assert_array_equal(stored["bn"][0], solver.net.layer_by_name["bn"].blobs[0].cpu_data())
    assert masters  # the mapping covers every learnable blob


@pytest.mark.parametrize("fmt, type_, iter_size", [(pb.SolverParameter.BINARYPROTO, "Adam", 1),
                                                    (pb.SolverParameter.HDF5, "SGD", 2)])
def test_resume_is_exact(tmp_path, fmt, type_, iter_size):
    def run(folder, resume=None):
        folder.mkdir()
        sp = solver_param(folder, compute_dtype="float16", loss_scale=512, loss_scale_window=7,
                          max_iter=40, snapshot=20, type=type_, base_lr=0.01, snapshot_format=fmt,
                          iter_size=iter_size)
        solver = create_solver(sp)
        solver.callbacks.append(InjectOverflow([13, 27]))
        solver.solve(resume)
        return solver

    whole = run(tmp_path / "whole")
    ext = ".solverstate.h5" if fmt == pb.SolverParameter.HDF5 else ".solverstate"
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / f"mp_iter_20{ext}"))
    assert whole.iter == resumed.iter == 40
    assert whole.mixed.scaler.state_dict() == resumed.mixed.scaler.state_dict()
    for a, b in zip(whole.learnable_params, resumed.learnable_params):
        np.testing.assert_array_equal(a.cpu_data(), b.cpu_data())
    for a, b in zip(whole.net.learnable_params, resumed.net.learnable_params):
        np.testing.assert_array_equal(a.cpu_data(), b.cpu_data())
    for a, b in zip(whole.history, resumed.history):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a.cpu_data(), b.cpu_data())
    assert whole.smoothed_loss == resumed.smoothed_loss


def test_weights_file_loads_into_the_masters_at_full_precision(tmp_path):
    source = create_solver(solver_param(max_iter=5))
    source.step(5)
    path = str(tmp_path / "start.caffemodel")
    save_weights(source.net, path)
    half = create_solver(solver_param(compute_dtype="float16", weights=[path]))
    for a, b in zip(source.net.learnable_params, half.learnable_params):
        np.testing.assert_array_equal(a.cpu_data(), b.cpu_data())
    for a, b in zip(source.net.learnable_params, half.net.learnable_params):
        np.testing.assert_array_equal(a.cpu_data().astype(np.float16), b.cpu_data())


# ---- settings ---------------------------------------------------------------------------------------
def test_float32_compute_dtype_changes_nothing():
    a, a_losses = train(solver_param(max_iter=10))
    b, b_losses = train(solver_param(max_iter=10, compute_dtype="float32"))
    assert a.mixed is None and b.mixed is None
    assert a_losses == b_losses


def test_bfloat16_is_refused_on_the_cpu():
    with pytest.raises(ConfigError, match="bfloat16 needs a GPU"):
        create_solver(solver_param(compute_dtype="bfloat16"))


def test_unknown_compute_dtype():
    with pytest.raises(ConfigError, match="unknown compute_dtype 'half'"):
        create_solver(solver_param(compute_dtype="half"))


def test_pycaffe_copy_from_fills_the_masters(tmp_path):
    from caffelite.api import Solver as ApiSolver

    source = create_solver(solver_param(max_iter=5))
    source.step(5)
    path = str(tmp_path / "w.caffemodel")
    save_weights(source.net, path)
    solver = ApiSolver(create_solver(solver_param(compute_dtype="float16")))
    solver.net.copy_from(path)
    for a, b in zip(source.net.learnable_params, solver.core.learnable_params):
        np.testing.assert_array_equal(a.cpu_data(), b.cpu_data())
    solver.step(1)  # the update starts from the loaded weights, not the old masters
    moved = [np.abs(a.cpu_data() - b.cpu_data()).max() for a, b in
             zip(source.net.learnable_params, solver.core.learnable_params)]
    assert max(moved) < 0.5


# ---- on a GPU: the device update (no host round trip, recorded as a CUDA graph) ---------------
def on_gpu(test):
    test = pytest.mark.skipif(not gpu_ready(), reason="no GPU: CuPy is not installed or no CUDA "
                                                      "device is visible")(test)
    return pytest.mark.gpu(test)


def gpu_solver(monkeypatch, *, device_update=True, graph=True, tmp_path=None, **fields):
    monkeypatch.setenv("CAFFELITE_CUDA_GRAPH", "1" if graph else "0")
    if not device_update:  # the per-parameter update, checked on the host every iteration
        monkeypatch.setattr(FlatUpdate, "applies", staticmethod(lambda solver: False))
    return create_solver(solver_param(tmp_path, compute_dtype="float16", **fields), device=Device.gpu(0))


def state_of(solver):
    return [[b.cpu_data().copy() for b in blobs]
            for blobs in (solver.learnable_params, solver.history, solver.net.learnable_params)]


def recorded(solver) -> bool:
    return solver._graph is not None and solver._graph.graph is not None


@pytest.mark.parametrize("type_", ["SGD", "Nesterov"])
@on_gpu
def test_device_update_equals_the_host_checked_update(monkeypatch, type_):
    runs = []
    for device_update in (False, True):
        solver = gpu_solver(monkeypatch, device_update=device_update, type=type_, weight_decay=1e-3)
        solver.step(12)
        assert (solver._flat is not None) == device_update == recorded(solver)
        runs.append(state_of(solver))
        monkeypatch.undo()
    for expected, got in zip(*runs):
        for a, b in zip(expected, got):
            np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("graph", [True, False], ids=["graph", "eager"])
@on_gpu
def test_device_overflow_is_skipped_logged_and_halves_the_scale(monkeypatch, logs, graph):
    solver = gpu_solver(monkeypatch, graph=graph, loss_scale=1024)
    solver.step(3)
    before = state_of(solver)
    # weight * S is Inf in float16 for S = 2^18 and 2^17 and 2^16: three skipped updates.
    solver.mixed.device_state[0] = 2.0 ** 18
    solver.step(3)
    assert recorded(solver) == graph
    for expected, got in zip(before[:2], state_of(solver)[:2]):  # masters and history
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b)
    assert solver.mixed.scaler.scale == 32768
    assert "Iterations 3 to 5: 3 gradient overflows, updates skipped; loss scale -> 32768" in logs
    solver.step(1)  # a clean iteration updates again
    assert any(not np.array_equal(a, b) for a, b in zip(before[0], state_of(solver)[0]))
    assert solver.mixed.scaler.scale == 32768 and solver.mixed.scaler.clean == 1


@on_gpu
def test_device_overflow_at_scale_one_is_a_training_error(monkeypatch):
    solver = gpu_solver(monkeypatch, loss_scale=1)
    solver.callbacks.append(InjectOverflow([1]))
    solver.step(1)
    with pytest.raises(TrainingError, match="iteration 1: the gradients overflow even with loss scale 1"):
        solver.step(1)


@pytest.mark.parametrize("inject", [[], [3, 9]], ids=["graph", "overflows"])
@on_gpu
def test_device_scaler_resumes_exactly(monkeypatch, tmp_path, logs, inject):
    def run(folder, resume=None):
        folder.mkdir()
        solver = gpu_solver(monkeypatch, tmp_path=folder, loss_scale=512, loss_scale_window=4,
                            max_iter=14, snapshot=7, type="Nesterov")
        if inject:
            solver.callbacks.append(InjectOverflow(inject))
        solver.solve(resume)
        assert solver._flat is not None and recorded(solver) == (not inject)
        return solver

    whole = run(tmp_path / "whole")
    if not inject:  # 14 clean iterations: doubled after iterations 3, 7 and 11
        assert whole.mixed.scaler.scale == 4096
        assert "Loss scale -> 4096 (doubled after each 4 iterations without overflow)" in logs
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "mp_iter_7.solverstate"))
    assert whole.iter == resumed.iter == 14
    assert whole.mixed.scaler.state_dict() == resumed.mixed.scaler.state_dict()
    for expected, got in zip(state_of(whole), state_of(resumed)):
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b)
