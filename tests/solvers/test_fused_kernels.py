"""The GPU solver kernels (CuPy ElementwiseKernel bodies) checked on the CPU.

``FakeCuPy`` stands in for the cupy module: every attribute is NumPy's, except that
``ElementwiseKernel`` evaluates the kernel's C body with NumPy, statement by statement. A solver
whose ``_xp`` is a FakeCuPy takes its GPU branches (fused updates, L2 decay folded into them,
the device-side gradient norm), so their formulas are compared with the CPU code: same
operations in the same order, hence the same float32 bits (a real GPU may contract a
multiply-add into an FMA: last-bit differences there).
"""
import re
import types

import numpy as np
import pytest
from google.protobuf import text_format

from caffelite.proto import pb
from caffelite import kernels as fused
from caffelite.solvers.base import Solver, create_solver


class FakeElementwiseKernel:
    def __init__(self, in_params: str, out_params: str, operation: str, name: str):
        self.ins = [p.split()[-1] for p in in_params.split(",")]
        self.outs = [p.split()[-1] for p in out_params.split(",")]
        # C to Python: drop declarations ("T g = ...") and casts ("(float)g").
        body = re.sub(r"\((float|double|[A-Z])\)", "", operation)
        self.statements = [re.sub(r"^[A-Za-z_]\w*\s+(?=\w+\s*=)", "", s.strip())
                           for s in body.split(";") if s.strip()]

    def __call__(self, *args):
        names = self.ins + self.outs
        assert len(args) == len(names)
        env = {"sqrt": np.sqrt, **{n: a for n, a in zip(names, args)}}
        outputs = dict(zip(self.outs, args[len(self.ins):]))
        for statement in self.statements:
            exec(statement, {}, env)
        for name, array in outputs.items():
            array[...] = env[name]


class FakeCuPy(types.SimpleNamespace):
    def __getattr__(self, name):
        return getattr(np, name)


FAKE = FakeCuPy(ElementwiseKernel=FakeElementwiseKernel)

NET = """
name: "fk"
layer { name: "data" type: "DummyData" top: "x" top: "t"
        dummy_data_param { shape { dim: 6 dim: 5 } shape { dim: 6 dim: 3 }
                           data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.3 }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "y"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""


@pytest.fixture(autouse=True)
def fresh_kernels(monkeypatch):
    monkeypatch.setattr(fused, "_elementwise", {})


def solver(type_, **fields):
    sp = pb.SolverParameter(type=type_, base_lr=0.05, lr_policy="fixed", weight_decay=0.01,
                            max_iter=10, random_seed=3, snapshot_after_train=False)
    if type_ != "AdaGrad":
        sp.momentum = 0.9
    for key, value in fields.items():
        setattr(sp, key, value)
    sp.net_param.CopyFrom(text_format.Parse(NET, pb.NetParameter()))
    return create_solver(sp)


def on_fake_gpu(s, monkeypatch):
    """Make ``s`` take its GPU code paths with NumPy arrays underneath."""
    monkeypatch.setattr(type(s), "_xp", property(lambda self: FAKE), raising=True)
    return s


@pytest.mark.parametrize("type_, fields", [
    ("SGD", {}), ("Nesterov", {}), ("Adam", {"base_lr": 0.01}),
    ("SGD", {"regularization_type": "L1"}), ("SGD", {"clip_gradients": 0.5}),
    ("Adam", {"iter_size": 2, "clip_gradients": 0.5}),
])
def test_fused_updates_equal_the_cpu_code(monkeypatch, type_, fields):
    cpu = solver(type_, **fields)
    cpu.step(10)
    gpu = on_fake_gpu(solver(type_, **fields), monkeypatch)
    gpu.step(10)
    assert fused._elementwise or fields.get("regularization_type") == "L1"
    for a, b in zip(cpu.net.learnable_params, gpu.net.learnable_params):
        np.testing.assert_array_equal(a.cpu_data(), b.cpu_data())
    for a, b in zip(cpu.history, gpu.history):
        np.testing.assert_array_equal(a.cpu_data(), b.cpu_data())


def test_the_fake_device_really_takes_the_gpu_branch(monkeypatch):
    s = on_fake_gpu(solver("SGD"), monkeypatch)
    s.step(1)
    assert "caffelite_sgd_update" in fused._elementwise
    assert s.fused_l2_decay(0) == np.float32(0.01)  # ip1 weights: decay_mult 1
    assert s.fused_l2_decay(1) == 0                 # ip1 bias: decay_mult 0


def test_mixed_precision_unscale_kernel(monkeypatch):
    s = solver("SGD", compute_dtype="float16", loss_scale=64)
    ref = solver("SGD", compute_dtype="float16", loss_scale=64)
    s.mixed.xp = FAKE  # the GPU branch: one fused kernel per parameter
    for x in (s, ref):
        x.net.clear_param_diffs()
        x.mixed.before_forward()
        x.net.forward_backward()
    assert s.mixed.unscale() and ref.mixed.unscale()
    for a, b in zip(s.learnable_params, ref.learnable_params):
        np.testing.assert_array_equal(a.cpu_diff(), b.cpu_diff())
    s.net.learnable_params[0].diff[0, 0] = np.inf
    assert not s.mixed.unscale()


def test_fake_kernel_translation():
    k = FakeElementwiseKernel("T a, T b", "T c, T d", "T t = a * b; c = (float)t + c; d = sqrt(c);", "k")
    c, d = np.array([1.0, 2.0]), np.zeros(2)
    k(np.array([2.0, 3.0]), np.array([4.0, 0.5]), c, d)
    np.testing.assert_array_equal(c, [9.0, 3.5])
    np.testing.assert_array_equal(d, np.sqrt([9.0, 3.5]))


def test_solver_xp_is_a_property():
    assert isinstance(Solver.__dict__["_xp"], property)
