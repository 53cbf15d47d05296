"""Every update rule against a closed-form NumPy computation over 3 steps.

The net is one test layer holding two parameter blobs W_i with a quadratic
loss whose gradient changes with W and with every forward/backward call, so
momentum, history, iter_size averaging, clipping and weight decay all show.
"""
import numpy as np
import pytest
from google.protobuf import text_format

from caffelite.errors import ConfigError
from caffelite.layers import cpu_kernels
from caffelite.layers.base import Layer
from caffelite.proto import pb
from caffelite.registry import LAYERS, register_layer
from caffelite.solvers.adaptive import AdamSolver
from caffelite.solvers.base import create_solver

SHAPES = [(3, 4), (5,)]


if "TestQuadratic" not in LAYERS:
    @register_layer("TestQuadratic")
    class QuadraticLayer(Layer):
        """loss = sum_i 0.5 * sum(A_i * W_i^2) + c * sum(B_i * W_i), c = 1 + 0.1 * (calls so far);
        dW_i = A_i * W_i + c * B_i."""

        num_bottom = 0
        num_top = 1

        def setup(self, bottom, top):
            rng = np.random.default_rng(7)
            self.blobs = [self.make_blob(s) for s in SHAPES]
            for blob in self.blobs:
                blob.set_data(rng.normal(size=blob.shape))
            self.A = [rng.uniform(0.5, 2.0, size=s) for s in SHAPES]
            self.B = [rng.normal(size=s) for s in SHAPES]
            self.calls = 0

        def reshape(self, bottom, top):
            top[0].reshape(())

        def default_loss_weight(self, top_index):
            return 1.0

        def forward(self, bottom, top):
            c = 1 + 0.1 * self.calls
            top[0].data[...] = sum(0.5 * (a * w.data ** 2).sum() + c * (b * w.data).sum()
                                   for a, b, w in zip(self.A, self.B, self.blobs))

        def backward(self, top, propagate_down, bottom):
            c = 1 + 0.1 * self.calls
            for i, (a, b, w) in enumerate(zip(self.A, self.B, self.blobs)):
                if self.param_propagate_down[i]:
                    w.diff += top[0].diff * (a * w.data + c * b)
            self.calls += 1


NET = """
name: "quad"
layer { name: "quad" type: "TestQuadratic" top: "loss"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0.5 } }
"""


def make_solver(type_: str, dtype=np.float64, net: str = NET, **fields):
    sp = pb.SolverParameter(type=type_, base_lr=0.1, lr_policy="step", gamma=0.5, stepsize=2,
                            max_iter=3, snapshot_after_train=False, random_seed=1)
    for key, value in fields.items():
        setattr(sp, key, value)
    sp.train_net_param.CopyFrom(text_format.Parse(net, pb.NetParameter()))
    return create_solver(sp, dtype=dtype)


def reference(sp, W, A, B, lr_mult, decay_mult, steps):
    """The update rules of CAFFE_REFERENCE section 4, written out plainly."""
    W = [w.astype(np.float64).copy() for w in W]
    H = [np.zeros_like(w) for w in W]
    H2 = [np.zeros_like(w) for w in W]
    calls = 0
    for it in range(steps):
        grads = [np.zeros_like(w) for w in W]
        for _ in range(sp.iter_size):
            c = 1 + 0.1 * calls
            calls += 1
            grads = [g + a * w + c * b for g, a, b, w in zip(grads, A, B, W)]
        if sp.clip_gradients >= 0:
            norm = np.sqrt(sum((g ** 2).sum() for g in grads))
            if norm > sp.clip_gradients:
                grads = [g * (sp.clip_gradients / norm) for g in grads]
        grads = [g / sp.iter_size for g in grads]
        rate = sp.base_lr * sp.gamma ** (it // sp.stepsize)
        m, delta = sp.momentum, sp.delta
        for i, g in enumerate(grads):
            decay = sp.weight_decay * decay_mult[i]
            g = g + decay * (W[i] if sp.regularization_type == "L2" else np.sign(W[i]))
            lr = rate * lr_mult[i]
            if sp.type == "SGD":
                H[i] = m * H[i] + lr * g
                step = H[i]
            elif sp.type == "Nesterov":
                new = m * H[i] + lr * g
                step = (1 + m) * new - m * H[i]
                H[i] = new
            elif sp.type == "AdaGrad":
                H[i] = H[i] + g ** 2
                step = lr * g / (np.sqrt(H[i]) + delta)
            elif sp.type == "RMSProp":
                r = sp.rms_decay
                H[i] = r * H[i] + (1 - r) * g ** 2
                step = lr * g / (np.sqrt(H[i]) + delta)
            elif sp.type == "AdaDelta":
                H[i] = m * H[i] + (1 - m) * g ** 2
                d = g * np.sqrt((H2[i] + delta) / (H[i] + delta))
                H2[i] = m * H2[i] + (1 - m) * d ** 2
                step = lr * d
            elif sp.type == "Adam":
                t = it + 1
                b1, b2 = sp.momentum, sp.momentum2
                H[i] = b1 * H[i] + (1 - b1) * g
                H2[i] = b2 * H2[i] + (1 - b2) * g ** 2
                step = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * H[i] / (np.sqrt(H2[i]) + delta)
            W[i] = W[i] - step
    return W, H, H2


TYPES = {
    "SGD": dict(momentum=0.9),
    "Nesterov": dict(momentum=0.9),
    "AdaGrad": dict(delta=1e-6),
    "RMSProp": dict(rms_decay=0.9, delta=1e-6),
    "AdaDelta": dict(momentum=0.95, delta=1e-6, base_lr=1.0),
    "Adam": dict(momentum=0.9, momentum2=0.999, base_lr=0.01),
}
VARIANTS = {
    "L2": dict(weight_decay=0.01),
    "L1-iter_size2-clip": dict(weight_decay=0.02, regularization_type="L1", iter_size=2, clip_gradients=0.5),
    "no-decay-clip-inactive": dict(clip_gradients=1e6),
}


@pytest.fixture(params=["compiled", "numpy"])
def cpu_step(request, monkeypatch):
    """SGD and Nesterov steps in the compiled CPU kernels (cpu_kernels.c) and in NumPy."""
    if request.param == "compiled":
        assert cpu_kernels.LIB is not None, "the CPU kernels are not built: pip install -e ."
    else:
        monkeypatch.setattr(cpu_kernels, "LIB", None)
    return request.param


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("type_", list(TYPES))
def test_update_matches_closed_form(type_, variant, cpu_step):
    solver = make_solver(type_, **TYPES[type_], **VARIANTS[variant])
    assert solver.fused_step(0) == (cpu_step == "compiled" and type_ in ("SGD", "Nesterov"))
    layer = solver.net.layer_by_name["quad"]
    W0 = [b.cpu_data().copy() for b in layer.blobs]
    solver.step(3)
    W, H, H2 = reference(solver.param, W0, layer.A, layer.B, [1, 2], [1, 0.5], 3)
    for got, want in zip(layer.blobs, W):
        np.testing.assert_allclose(got.cpu_data(), want, rtol=1e-10, atol=1e-14)
    n = len(layer.blobs)
    assert len(solver.history) == n * solver.history_sets
    for i in range(n):
        np.testing.assert_allclose(solver.history[i].cpu_data(), H[i], rtol=1e-10, atol=1e-14)
        if solver.history_sets == 2:  # Caffe's order: all first-set blobs, then all second-set blobs
            np.testing.assert_allclose(solver.history[n + i].cpu_data(), H2[i], rtol=1e-10, atol=1e-14)
    assert solver.iter == 3
    assert solver.current_step == 1  # the step policy's position: floor(2 / 2)


@pytest.mark.parametrize("type_", ["SGD", "Nesterov"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_step_rounds_as_numpy(type_, dtype, monkeypatch):
    """The one-pass compiled step gives the NumPy passes' bits (same order, no fused
    multiply-add), weight decay included."""
    def train():
        solver = make_solver(type_, dtype=dtype, **TYPES[type_], weight_decay=0.01, max_iter=5)
        solver.step(5)
        layer = solver.net.layer_by_name["quad"]
        return [b.cpu_data().copy() for b in layer.blobs] + [h.cpu_data().copy() for h in solver.history]
    compiled = train()
    monkeypatch.setattr(cpu_kernels, "LIB", None)
    for got, want in zip(compiled, train()):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("type_", list(TYPES))
def test_float32_stays_float32(type_):
    solver = make_solver(type_, dtype=np.float32, **TYPES[type_], weight_decay=0.01)
    layer = solver.net.layer_by_name["quad"]
    W0 = [b.cpu_data().astype(np.float64) for b in layer.blobs]
    solver.step(3)
    W, _, _ = reference(solver.param, W0, layer.A, layer.B, [1, 2], [1, 0.5], 3)
    for blob, want in zip(layer.blobs, W):
        assert blob.data.dtype == np.float32
        np.testing.assert_allclose(blob.cpu_data(), want, rtol=2e-4, atol=1e-5)
    assert all(h.data.dtype == np.float32 for h in solver.history)


def test_lr_mult_zero_freezes_a_blob():
    net = NET.replace("param { lr_mult: 2 decay_mult: 0.5 }", "param { lr_mult: 0 decay_mult: 1 }")
    solver = make_solver("SGD", net=net, momentum=0.9, weight_decay=0.1)
    layer = solver.net.layer_by_name["quad"]
    before = [b.cpu_data().copy() for b in layer.blobs]
    solver.step(3)
    np.testing.assert_array_equal(layer.blobs[1].cpu_data(), before[1])
    assert not np.array_equal(layer.blobs[0].cpu_data(), before[0])


def test_legacy_solver_type():
    sp = pb.SolverParameter(solver_type=pb.SolverParameter.ADAM, base_lr=0.1, lr_policy="fixed",
                            snapshot_after_train=False)
    sp.train_net_param.CopyFrom(text_format.Parse(NET, pb.NetParameter()))
    solver = create_solver(sp, dtype=np.float64)
    assert isinstance(solver, AdamSolver) and solver.param.type == "Adam"
    assert len(solver.history) == 4


def test_legacy_solver_type_conflict():
    sp = pb.SolverParameter(solver_type=pb.SolverParameter.ADAM, type="SGD", base_lr=0.1, lr_policy="fixed")
    with pytest.raises(ConfigError, match="disagree"):
        create_solver(sp)


@pytest.mark.parametrize("type_, fields, match", [
    ("AdaGrad", dict(momentum=0.9), "AdaGrad cannot use momentum"),
    ("RMSProp", dict(momentum=0.9), "RMSProp cannot use momentum"),
    ("RMSProp", dict(rms_decay=1.5), "rms_decay"),
    ("SGD", dict(weight_decay=0.1, regularization_type="L3"), "regularization_type 'L3'"),
    ("adam", {}, "did you mean 'Adam'"),
    ("Adamm", {}, "did you mean 'Adam'"),
])
def test_bad_settings(type_, fields, match):
    with pytest.raises(ConfigError, match=match):
        make_solver(type_, **fields)
