"""Where a caffelite training step spends its time on the GPU: per layer type (forward and
backward, each layer synchronized alone), the solver update, and the host's own cost.

    python benchmarks/gpu_profile.py [--nets lenet,alexnet,resnet50] [--precisions fp32,mixed]
                                     [--iters 10] [--gpu 0]

Same nets, batches and step as gpu_run.py. Three figures per net:

    step      a whole training step, synchronized (what gpu_run.py measures)
    host      the time Python takes to queue one step while the GPU is held busy by a spin kernel
              (launch and bookkeeping cost; when it is near 'step', the step is host-bound);
              a call that waited for the GPU anyway (a hidden synchronisation) is named
    layers    per layer type, forward and backward, each layer synchronized on its own
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import numpy as np

import gpu_run

SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


def held_gpu(cp, seconds: float):
    """Keep the current stream busy for about ``seconds`` (one thread spinning on the clock)."""
    kernel = cp.RawKernel(SPIN, "spin")
    rate = cp.cuda.Device().attributes["ClockRate"] * 1e3  # kHz -> Hz
    kernel((1,), (1,), (np.int64(seconds * rate),))


def one_step(solver):
    solver.net.clear_param_diffs()
    if solver.mixed is not None:
        solver.mixed.before_forward()
    solver._forward_backward_on_device()
    if solver.mixed is None or solver.mixed.after_backward(solver.iter):
        solver.apply_update()
    solver.iter += 1


def host_costs(cp, solver, hold: float = 3.0):
    """Host milliseconds of one step with the GPU held busy (so nothing waits for it), and the
    calls that waited anyway: a host synchronisation (or a full launch queue) inside them."""
    net = solver.net
    syncs = []

    def timed(label, fn, *args):
        t0 = time.perf_counter()
        fn(*args)
        spent = time.perf_counter() - t0
        if spent > hold / 3:
            syncs.append(label)
            held_gpu(cp, hold)
            return 0.0
        return spent

    held_gpu(cp, hold)
    total = timed("clear_param_diffs", net.clear_param_diffs)
    for i, layer in enumerate(net.layers):
        total += timed(f"{net.layer_names[i]} ({layer.type}) forward", _forward, layer,
                       net.bottom_vecs[i], net.top_vecs[i])
    for entry in net._loss_tops:
        entry[-2].diff[...] = entry[-1]
    for i in reversed(range(len(net.layers))):
        if net.layer_need_backward[i]:
            total += timed(f"{net.layer_names[i]} ({net.layers[i].type}) backward", net.layers[i].backward,
                           net.top_vecs[i], net.bottom_need_backward[i], net.bottom_vecs[i])
    total += timed("apply_update", solver.apply_update)
    cp.cuda.get_current_stream().synchronize()
    return total * 1e3, syncs


def _forward(layer, bottom, top):
    layer.reshape(bottom, top)
    layer.forward(bottom, top)


def profile(param, precision, data, labels, gpu, iters):
    from caffelite.backend import cupy_module

    cp = cupy_module()
    solver = gpu_run.caffelite_solver(param, precision, gpu)
    stream = cp.cuda.get_current_stream()
    net = solver.net
    try:
        net.blobs["data"].set_data(data)
        net.blobs["label"].set_data(labels.astype(np.float32))
        solver.step(3)
        stream.synchronize()
        steps = []
        for _ in range(iters):
            t0 = time.perf_counter()
            one_step(solver)
            stream.synchronize()
            steps.append(time.perf_counter() - t0)
        solver._drain_losses()
        host, syncs = host_costs(cp, solver)
        fwd, bwd = defaultdict(list), defaultdict(list)
        update = []
        for _ in range(iters):
            net.clear_param_diffs()
            f, b = defaultdict(float), defaultdict(float)
            for i, layer in enumerate(net.layers):
                t0 = time.perf_counter()
                layer.reshape(net.bottom_vecs[i], net.top_vecs[i])
                layer.forward(net.bottom_vecs[i], net.top_vecs[i])
                stream.synchronize()
                f[layer.type] += time.perf_counter() - t0
            for entry in net._loss_tops:
                entry[-2].diff[...] = entry[-1]
            for i in reversed(range(len(net.layers))):
                if net.layer_need_backward[i]:
                    t0 = time.perf_counter()
                    net.layers[i].backward(net.top_vecs[i], net.bottom_need_backward[i], net.bottom_vecs[i])
                    stream.synchronize()
                    b[net.layers[i].type] += time.perf_counter() - t0
            for k in f:
                fwd[k].append(f[k])
            for k in b:
                bwd[k].append(b[k])
            t0 = time.perf_counter()
            if solver.mixed is None or solver.mixed.after_backward(solver.iter):
                solver.apply_update()
            stream.synchronize()
            update.append(time.perf_counter() - t0)
        med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
        types = sorted(set(fwd) | set(bwd), key=lambda k: -(med(fwd.get(k, [0])) + med(bwd.get(k, [0]))))
        rows = [(k, med(fwd.get(k, [0])), med(bwd.get(k, [0]))) for k in types]
        return med(steps), host, syncs, med(update), rows
    finally:
        solver.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", default=",".join(gpu_run.NETS))
    parser.add_argument("--precisions", default="fp32")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--gpu", type=int, default=0)
    args = parser.parse_args()
    gpu_run.check_environment(args.gpu)
    for name in args.nets.split(","):
        deploy, batch, _ = gpu_run.NETS[name]
        param = gpu_run.training_net(deploy, batch)
        data, labels = gpu_run.inputs(param)
        for precision in args.precisions.split(","):
            step, host, syncs, update, rows = profile(param, precision, data, labels, args.gpu, args.iters)
            print(f"\n{name} batch {batch} {precision}: step {step:.2f} ms, host-only {host:.2f} ms, "
                  f"update {update:.2f} ms, {batch / step * 1e3:.0f} img/s")
            for label in syncs:
                print(f"  waited for the GPU in: {label}")
            print(f"  {'type':<20}{'forward ms':>11}{'backward ms':>12}")
            for kind, f, b in rows:
                print(f"  {kind:<20}{f:11.3f}{b:12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
