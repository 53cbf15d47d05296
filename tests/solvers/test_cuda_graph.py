"""Training iterations replayed as a CUDA graph (cuda_graph.py) give the weights that step-by-step
iterations give: dropout masks, learning-rate changes, BatchNorm statistics and the losses all
follow the replays. GPU only (skipped cleanly without CuPy and a GPU)."""
import numpy as np
import pytest
from google.protobuf import text_format

from caffelite.backend import Device
from caffelite.proto import pb
from caffelite.solvers.base import create_solver
from conftest import gpu_ready

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu_ready(), reason="no GPU: CuPy is not installed or no CUDA device is visible")]

NET = """
name: "graph"
layer { name: "data" type: "DummyData" top: "x" top: "label"
        dummy_data_param { shape { dim: 16 dim: 3 dim: 6 dim: 6 } shape { dim: 16 }
                           data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 3.99 } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" }
layer { name: "scale" type: "Scale" bottom: "c" top: "c" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "c" top: "c" }
layer { name: "pool" type: "Pooling" bottom: "c" top: "p" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "p" top: "h"
        inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "drop" type: "Dropout" bottom: "h" top: "h" dropout_param { dropout_ratio: 0.3 } }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "y"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "y" bottom: "label" top: "loss" }
"""


def train(monkeypatch, graphs: bool):
    monkeypatch.setenv("CAFFELITE_CUDA_GRAPH", "1" if graphs else "0")
    sp = pb.SolverParameter(type="SGD", base_lr=0.05, momentum=0.9, lr_policy="step", gamma=0.5,
                            stepsize=4, weight_decay=0.001, max_iter=12, random_seed=11, display=5,
                            snapshot_after_train=False)
    sp.net_param.CopyFrom(text_format.Parse(NET, pb.NetParameter()))
    solver = create_solver(sp, device=Device.gpu(0))
    losses, tops = [], []
    for _ in range(12):
        losses.append(float(solver.step(1)))
        tops.append(solver.net.blobs["loss"].cpu_data().item())  # the host copy follows the replays
    recorded = solver._graph is not None and solver._graph.graph is not None
    weights = [p.cpu_data().copy() for p in solver.net.learnable_params]
    stats = [b.cpu_data().copy() for b in solver.net.layer_by_name["bn"].blobs]
    solver.close()
    return recorded, losses + tops, weights, stats


def test_graph_replays_train_like_step_by_step(monkeypatch):
    recorded, losses, weights, stats = train(monkeypatch, graphs=True)
    plain, plain_losses, plain_weights, plain_stats = train(monkeypatch, graphs=False)
    assert recorded and not plain
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
    for got, expected in zip(weights + stats, plain_weights + plain_stats):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
