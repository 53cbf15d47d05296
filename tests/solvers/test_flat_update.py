"""The one-kernel GPU update (flat_update.py) equals the per-parameter update, and survives a
parameter blob given new memory. GPU only (skipped cleanly without CuPy and a GPU)."""
import numpy as np
import pytest
from google.protobuf import text_format

from caffelite.backend import Device
from caffelite.proto import pb
from caffelite.solvers import flat_update
from caffelite.solvers.base import create_solver
from conftest import gpu_ready

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu_ready(), reason="no GPU: CuPy is not installed or no CUDA device is visible")]

NET = """
name: "flat"
layer { name: "data" type: "DummyData" top: "x" top: "t"
        dummy_data_param { shape { dim: 8 dim: 5 } shape { dim: 8 dim: 3 }
                           data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.3 }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "bn" type: "BatchNorm" bottom: "h" top: "h" }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "y"
        param { lr_mult: 0.5 decay_mult: 3 }
        inner_product_param { num_output: 3 bias_term: false weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""


def run(type_, flat: bool, monkeypatch, replace_at=None, **fields):
    monkeypatch.setattr(flat_update.FlatUpdate, "applies", staticmethod(lambda solver: flat))
    sp = pb.SolverParameter(type=type_, base_lr=0.05, momentum=0.9, lr_policy="step", gamma=0.5,
                            stepsize=3, weight_decay=0.01, max_iter=10, random_seed=3,
                            snapshot_after_train=False, **fields)
    sp.net_param.CopyFrom(text_format.Parse(NET, pb.NetParameter()))
    solver = create_solver(sp, device=Device.gpu(0))
    for it in range(8):
        if it == replace_at:
            blob = solver.net.learnable_params[0]
            blob.data = blob.data * 0.5  # new memory: the arena must notice
        solver.step(1)
    assert (solver._flat is not None) == flat
    params = [p.cpu_data().copy() for p in solver.net.learnable_params]
    history = [h.cpu_data().copy() for h in solver.history]
    return params, history


@pytest.mark.parametrize("type_, fields", [("SGD", {}), ("Nesterov", {}), ("SGD", {"iter_size": 2})])
def test_flat_update_equals_the_per_parameter_update(monkeypatch, type_, fields):
    per_param = run(type_, False, monkeypatch, **fields)
    flat = run(type_, True, monkeypatch, **fields)
    for expected, got in zip(per_param[0] + per_param[1], flat[0] + flat[1]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_flat_update_follows_a_blob_given_new_memory(monkeypatch):
    per_param = run("SGD", False, monkeypatch, replace_at=4)
    flat = run("SGD", True, monkeypatch, replace_at=4)
    for expected, got in zip(per_param[0], flat[0]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
