"""LeNet trained on the GPU (from the LMDB, through the Data layer's page-locked feed) reaches the
accuracy it reaches on the CPU: float32 with TF32 and without, float16 and bfloat16 with float32
master weights, all replayed as a CUDA graph. Skipped without CuPy and a GPU."""
import numpy as np
import pytest

from caffelite import config
from caffelite.backend import CPU, Device
from caffelite.solvers.base import create_solver
from conftest import FIXTURES, gpu_ready

LENET = FIXTURES / "lenet"
ITERATIONS = 300

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu_ready(), reason="no GPU: CuPy is not installed or no CUDA device is visible")]


def train_lenet(device, monkeypatch, **overrides):
    monkeypatch.chdir(LENET)  # the net's LMDB paths are relative to the fixture folder
    sets = [f"max_iter={ITERATIONS}", f"test_interval={ITERATIONS}", "test_iter=20", "display=100",
            "snapshot=0", "snapshot_after_train=false", "test_initialization=false",
            *(f"{k}={v}" for k, v in overrides.items())]
    param = config.load_solver("lenet_solver.prototxt", sets)
    solver = create_solver(param, source="lenet_solver.prototxt", device=device)
    try:
        solver.solve()
        results = dict((name, value) for name, value, _ in solver.test_results[-1])
        weights = [p.cpu_data().copy() for p in solver.learnable_params]
        graph = getattr(solver, "_graph", None)
        recorded = graph is not None and graph.graph is not None
    finally:
        solver.close()
    return results["accuracy"], results["loss"], weights, recorded


@pytest.fixture(scope="module")
def cpu_run():
    mp = pytest.MonkeyPatch()
    try:
        return train_lenet(CPU, mp)
    finally:
        mp.undo()


@pytest.mark.parametrize("overrides", [{}, {"allow_tf32": "false"}, {"compute_dtype": "float16"},
                                       {"compute_dtype": "bfloat16"}],
                         ids=["float32-tf32", "float32", "float16", "bfloat16"])
def test_lenet_on_the_gpu_matches_the_cpu(cpu_run, monkeypatch, overrides):
    cpu_accuracy, cpu_loss, cpu_weights, _ = cpu_run
    accuracy, loss, weights, recorded = train_lenet(Device.gpu(0), monkeypatch, **overrides)
    assert recorded  # solvers/cuda_graph.py, with the loss scale on the device when mixed
    assert cpu_accuracy > 0.9
    assert abs(accuracy - cpu_accuracy) <= 0.015, (accuracy, cpu_accuracy)
    assert abs(loss - cpu_loss) <= 0.05 + 0.2 * cpu_loss, (loss, cpu_loss)
    assert all(w.dtype == np.float32 for w in weights)
    assert all(np.isfinite(w).all() for w in weights)
