"""LeNet training speed on the CPU: caffelite against PyTorch, in one run.

Both train the same LeNet (conv 20x5x5, max-pool 2, conv 50x5x5, max-pool 2,
ip 500, ReLU, ip 10, softmax loss) with batch 64 and SGD (momentum 0.9,
weight decay 5e-4, biases at twice the learning rate, "inv" policy) on the
MNIST LMDB of ../shared/fixtures/caffe/mnist. caffelite reads the LMDB through
its Data layer (decoding in a prefetch thread); PyTorch gets the whole set
preloaded as one tensor, which favours PyTorch. Runs alternate, and the
medians of several repetitions are compared.

    pip install torch==2.13.0
    python benchmarks/lenet_cpu.py [--iters 200] [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LMDB = REPO.parent / "shared" / "fixtures" / "caffe" / "mnist" / "mnist_train_lmdb"
BATCH = 64


def caffelite_trainer():
    from caffelite import config
    from caffelite.solvers.base import create_solver

    net = config.load_net(REPO / "configs" / "lenet" / "lenet_train_test.yaml")
    for layer in net.layer:
        if layer.type == "Data":
            layer.data_param.source = str(LMDB)
    param = config.load_solver(REPO / "configs" / "lenet" / "lenet_solver.yaml")
    param.ClearField("net")
    param.net_param.CopyFrom(net)
    for name in ("test_iter", "test_interval", "snapshot", "display"):
        param.ClearField(name)
    param.snapshot_after_train = False
    param.max_iter = 10 ** 9
    solver = create_solver(param)
    solver.step(10)  # warm-up: buffers, prefetch thread

    def run(iters: int) -> float:
        start = time.perf_counter()
        solver.step(iters)
        return iters / (time.perf_counter() - start)
    return run, solver.close


def torch_trainer():
    import torch
    from torch import nn

    from caffelite.data.lmdb_source import close_lmdb, open_lmdb
    from caffelite.proto import pb

    images, labels = [], []
    # LMDB allows one environment per database and process: share caffelite's.
    env = open_lmdb(str(LMDB))
    with env.begin() as txn:
        for _, value in txn.cursor():
            datum = pb.Datum()
            datum.ParseFromString(value)
            images.append(np.frombuffer(datum.data, np.uint8).reshape(1, 28, 28))
            labels.append(datum.label)
    close_lmdb(env)
    x_all = torch.from_numpy(np.stack(images).astype(np.float32) * 0.00390625)
    y_all = torch.tensor(labels, dtype=torch.long)

    torch.manual_seed(1701)
    model = nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2, 2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2, 2),
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(inplace=True), nn.Linear(500, 10))
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    optimizer = torch.optim.SGD([{"params": weights, "lr": 0.01}, {"params": biases, "lr": 0.02}],
                                lr=0.01, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 + 1e-4 * it) ** -0.75)
    loss_fn = nn.CrossEntropyLoss()
    cursor = [0]

    def step():
        start = cursor[0]
        if start + BATCH > len(x_all):
            start = 0
        cursor[0] = start + BATCH
        optimizer.zero_grad(set_to_none=False)
        loss = loss_fn(model(x_all[start:start + BATCH]), y_all[start:start + BATCH])
        loss.backward()
        optimizer.step()
        schedule.step()

    for _ in range(10):
        step()

    def run(iters: int) -> float:
        start = time.perf_counter()
        for _ in range(iters):
            step()
        return iters / (time.perf_counter() - start)
    return run, lambda: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200, help="iterations per timed run")
    parser.add_argument("--reps", type=int, default=5, help="alternating repetitions")
    args = parser.parse_args()
    if not LMDB.is_dir():
        raise SystemExit(f"missing {LMDB}: the shared fixtures must sit beside the repository")
    import torch

    ours, close = caffelite_trainer()
    theirs, _ = torch_trainer()
    ours_rates, theirs_rates = [], []
    for rep in range(args.reps):
        ours_rates.append(ours(args.iters))
        theirs_rates.append(theirs(args.iters))
        print(f"rep {rep + 1}: caffelite {ours_rates[-1]:.1f} iter/s, "
              f"PyTorch {torch.__version__} {theirs_rates[-1]:.1f} iter/s")
    close()
    a, b = statistics.median(ours_rates), statistics.median(theirs_rates)
    print(f"LeNet training, batch {BATCH}, CPU ({torch.get_num_threads()} threads): "
          f"caffelite {a:.1f} iter/s, PyTorch {b:.1f} iter/s, ratio caffelite/PyTorch = {a / b:.2f}")


if __name__ == "__main__":
    main()
