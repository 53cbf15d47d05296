"""GPU support that can be checked on the CPU: engine choice, device-side losses and checks,
out-of-GPU-memory messages (with a fake out-of-memory type), TF32 switch, device_query."""
import logging
import os
import sys
import types

import numpy as np
import pytest
from google.protobuf import text_format

from caffelite import backend
from caffelite.backend import CPU, DEFERRED, Device
from caffelite.cli import main
from caffelite.errors import DataError, TrainingError
from caffelite.layers import cudnn_conv
from caffelite.layers.base import LayerContext
from caffelite.layers.convolution import ConvolutionLayer
from caffelite.layers.inner_product import InnerProductLayer
from caffelite.net import Net
from caffelite.proto import pb
from caffelite.registry import layer_class
from caffelite.solvers.base import create_solver
from layer_testing import layer_param

OOM_MESSAGE = "Out of memory allocating 1,073,741,824 bytes (allocated so far: 2,147,483,648 bytes)."


class FakeOutOfMemory(MemoryError):
    """Stands for cupy.cuda.memory.OutOfMemoryError."""


@pytest.fixture
def fake_oom(monkeypatch):
    monkeypatch.setattr(backend, "out_of_memory_types", lambda: (FakeOutOfMemory,))
    return FakeOutOfMemory


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(cudnn_conv, "_warned", set())


def conv_param(engine: str | None = None):
    fields = {"num_output": 2, "kernel_size": [3]}
    if engine:
        fields["engine"] = engine
    return layer_param("Convolution", convolution_param=fields)


# ---- engine choice ------------------------------------------------------------------------------
def test_engine_choice_on_the_cpu(fresh_warnings, caplog):
    ctx = LayerContext(device=CPU)
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        assert layer_class(conv_param(), ctx) is ConvolutionLayer
        assert layer_class(conv_param("CAFFE"), ctx) is ConvolutionLayer
        assert not caplog.records  # DEFAULT and CAFFE: silent
        assert layer_class(conv_param("CUDNN"), ctx) is ConvolutionLayer
        assert layer_class(conv_param("CUDNN"), ctx) is ConvolutionLayer
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "engine: CUDNN asked for on the CPU" in warnings[0]


def test_engine_choice_on_a_gpu_without_cudnn(fresh_warnings, monkeypatch, caplog):
    monkeypatch.setattr(cudnn_conv, "_cudnn", None)
    monkeypatch.setattr(cudnn_conv, "_cudnn_error", "ModuleNotFoundError: No module named 'cudnn'")
    ctx = LayerContext(device=Device.gpu(0))  # engine choice reads the device kind only
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        for engine in (None, "CUDNN", None):
            assert layer_class(conv_param(engine), ctx) is ConvolutionLayer
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cuDNN is not available" in warnings[0]
    assert "caffelite[cudnn]" in warnings[0]


def test_engine_choice_on_a_gpu_with_cudnn(fresh_warnings, monkeypatch):
    monkeypatch.setattr(cudnn_conv, "_cudnn", types.SimpleNamespace(data_type=types.SimpleNamespace(
        FLOAT="f", HALF="h", BFLOAT16="b")))
    gpu = LayerContext(device=Device.gpu(0))
    assert layer_class(conv_param(), gpu) is cudnn_conv.CuDNNConvolutionLayer
    assert layer_class(conv_param("CUDNN"), gpu) is cudnn_conv.CuDNNConvolutionLayer
    assert layer_class(conv_param("CAFFE"), gpu) is ConvolutionLayer
    double = LayerContext(device=Device.gpu(0), dtype=np.dtype(np.float64))
    assert layer_class(conv_param(), double) is ConvolutionLayer  # cuDNN: float32/16/bf16 only
    assert issubclass(cudnn_conv.CuDNNConvolutionLayer, ConvolutionLayer)


def test_cudnn_engine_on_the_cpu_computes_the_same(fresh_warnings):
    net_text = """
    name: "e"
    layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ dim: 2 dim: 3 dim: 6 dim: 6 }} }} }}
    layer {{ name: "conv" type: "Convolution" bottom: "x" top: "y"
            convolution_param {{ num_output: 4 kernel_size: 3 {engine}
                                 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
    """
    outs = []
    for engine in ("", "engine: CAFFE", "engine: CUDNN"):
        net = Net(text_format.Parse(net_text.format(engine=engine), pb.NetParameter()), seed=3)
        assert type(net.layers[1]) is ConvolutionLayer
        net.blobs["x"].set_data(np.arange(216, dtype=np.float32).reshape(2, 3, 6, 6) / 100)
        net.forward()
        outs.append(net.blobs["y"].cpu_data().copy())
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


# ---- a tiny trainable net --------------------------------------------------------------------------
NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "x" top: "label"
        dummy_data_param { shape { dim: 16 dim: 5 } shape { dim: 16 }
                           data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
        inner_product_param { num_output: 7 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "y"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "y" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "y" bottom: "label" top: "acc" include { phase: TEST } }
"""


def solver_param(**fields):
    sp = pb.SolverParameter(base_lr=0.1, momentum=0.9, lr_policy="fixed", max_iter=30, random_seed=5,
                            display=10, average_loss=4, test_iter=[2], test_interval=15,
                            snapshot_after_train=False)
    sp.net_param.CopyFrom(text_format.Parse(NET, pb.NetParameter()))
    for key, value in fields.items():
        setattr(sp, key, value)
    return sp


class Displays:
    def __init__(self):
        self.shown = []

    def on_display(self, solver, outputs):
        self.shown.append((solver.iter, float(solver.smoothed_loss), outputs))


# ---- losses kept on the device -----------------------------------------------------------------------
@pytest.mark.parametrize("iter_size", [1, 2])
def test_device_losses_give_the_same_run(iter_size):
    runs = []
    for defer in (False, True):
        solver = create_solver(solver_param(iter_size=iter_size, test_compute_loss=True))
        solver.defer_loss = defer  # what a GPU solver does; here the "device" is NumPy
        shown = Displays()
        solver.callbacks.append(shown)
        solver.solve()
        runs.append((solver, shown.shown))
    (a, a_shown), (b, b_shown) = runs
    assert a_shown == b_shown and len(a_shown) == 3
    assert a.smoothed_loss == b.smoothed_loss and a.loss == b.loss
    assert a.test_results == b.test_results
    for x, y in zip(a.net.learnable_params, b.net.learnable_params):
        np.testing.assert_array_equal(x.cpu_data(), y.cpu_data())


def test_device_losses_are_read_rarely(monkeypatch):
    solver = create_solver(solver_param(display=0, test_interval=0))
    del solver.param.test_iter[:]
    solver.defer_loss = True
    reads = []
    original = solver._drain_losses
    monkeypatch.setattr(solver, "_drain_losses", lambda: (reads.append(len(solver._pending_losses)), original()))
    solver.step(12)
    assert reads == [12]  # once, when step returns


def test_device_loss_nan_is_reported_at_the_next_read():
    solver = create_solver(solver_param(display=5, test_interval=0))
    del solver.param.test_iter[:]
    solver.defer_loss = True
    solver.step(2)
    ip2 = solver.net.layer_by_name["ip2"]
    ip2.blobs[0].set_data(np.full(ip2.blobs[0].shape, np.nan, np.float32))
    with pytest.raises(TrainingError, match=r"iteration 5: the loss is nan \(first seen at iteration 2\)"):
        solver.step(5)


def test_deferred_checks_read_once_and_raise_the_first():
    checks = backend.DeferredChecks()
    checks.add(np.array(False), (np.array(0),), lambda v: DataError(f"first {v}"))
    checks.add(np.array(True), (np.array(7),), lambda v: DataError(f"second {v}"))
    checks.add(np.array(True), (np.array(9),), lambda v: DataError(f"third {v}"))
    with pytest.raises(DataError, match="second 7"):
        checks.raise_first()
    checks.raise_first()  # read: nothing pending


def test_deferred_checks_do_not_change_cpu_label_errors():
    solver = create_solver(solver_param(test_interval=0))
    del solver.param.test_iter[:]
    solver.defer_loss = True
    solver.net.layer_by_name["data"].blobs  # DummyData keeps its label blob filled with 1
    label = solver.net.blobs["label"]
    solver.net.layer_by_name["data"].forward = lambda bottom, top: label.set_data(np.full(16, 5.0))
    assert DEFERRED.active is False
    with pytest.raises(DataError, match="label 5 at position 0 is outside the 3 classes"):
        solver.step(1)
    assert DEFERRED.active is False


# ---- out of GPU memory ---------------------------------------------------------------------------------
def test_out_of_memory_while_training(fake_oom):
    solver = create_solver(solver_param(iter_size=1))
    count = {"n": 0}
    original = solver.net.layer_by_name["ip2"].forward

    def forward(bottom, top):
        count["n"] += 1
        if count["n"] == 4:
            raise fake_oom(OOM_MESSAGE)
        original(bottom, top)

    solver.net.layer_by_name["ip2"].forward = forward
    with pytest.raises(TrainingError) as info:
        solver.step(10)
    message = str(info.value)
    assert "out of GPU memory on cpu while training (iteration 3)" in message
    assert "net 'tiny' at batch size 16" in message
    assert "an allocation of 1.00 GiB failed with 2.00 GiB already in use" in message
    assert "halve batch_size (to 8) and set iter_size: 2 for the same effective batch of 16" in message
    assert info.value.exit_code == 4


def test_out_of_memory_while_building_the_net(fake_oom, monkeypatch):
    def setup(self, bottom, top):
        raise fake_oom(OOM_MESSAGE)

    monkeypatch.setattr(InnerProductLayer, "setup", setup)
    with pytest.raises(TrainingError, match=r"while building the nets: net 'tiny' at batch size 16"):
        create_solver(solver_param(iter_size=2))


def test_out_of_memory_from_the_command_line(fake_oom, monkeypatch, tmp_path, capsys):
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 5\nsolver_mode: CPU\n'
        f'snapshot_after_train: false\nsnapshot_prefix: "{tmp_path}/s"\n')
    monkeypatch.chdir(tmp_path)

    def forward(self, bottom, top):
        raise fake_oom(OOM_MESSAGE)

    monkeypatch.setattr(InnerProductLayer, "forward", forward)
    code = main(["train", "--solver", "solver.prototxt", "--run_dir", "none"])
    err = capsys.readouterr().err
    assert code == 4
    assert "out of GPU memory" in err and "net 'tiny' at batch size 16" in err and "iter_size: 2" in err
    code = main(["test", "--model", "net.prototxt", "--weights", "", "--iterations", "2"])
    err = capsys.readouterr().err
    assert code == 4 and "while testing: net 'tiny' at batch size 16" in err


def test_batch_size_of_a_net_file():
    from caffelite.oom import batch_size_of

    param = text_format.Parse(NET, pb.NetParameter())
    assert batch_size_of(param) == 16
    assert batch_size_of(Net(param, seed=1)) == 16
    data = text_format.Parse('layer { name: "d" type: "Data" top: "x" data_param { batch_size: 32 } }',
                             pb.NetParameter())
    assert batch_size_of(data) == 32


# ---- TF32 and device_query --------------------------------------------------------------------------------
def test_tf32_switch(monkeypatch):
    monkeypatch.setenv("CUPY_TF32", "1")
    before = backend.tf32_enabled()
    try:
        backend.set_tf32(False)
        assert not backend.tf32_enabled() and os.environ["CUPY_TF32"] == "0"
        backend.set_tf32(True)
        assert backend.tf32_enabled() and os.environ["CUPY_TF32"] == "1"
    finally:
        backend.set_tf32(before)


def test_cpu_solver_leaves_tf32_alone(monkeypatch):
    monkeypatch.setenv("CUPY_TF32", "1")
    create_solver(solver_param(allow_tf32=False))
    assert os.environ["CUPY_TF32"] == "1"


def test_device_query_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(backend, "gpu_available", lambda: False)
    assert main(["device_query"]) == 0
    assert "No GPU available" in capsys.readouterr().out


def test_cupy_is_not_imported_on_the_cpu():
    assert "cupy" not in sys.modules or backend.cupy_loaded() is not None
