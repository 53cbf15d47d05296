"""caffelite against PyTorch on the CPU, side by side in one run.

    python benchmarks/run.py [--quick] [--reps N] [--threads T]

1. NumPy float32 sgemm rate (GFLOP/s): the machine's ceiling for both.
2. Speed, caffelite and PyTorch alternating (one worker process each, one runs
   while the other waits; each run after a short pause and one untimed step;
   medians of the repetitions):
   - LeNet training, batch 64, SGD momentum (benchmarks/lenet_cpu.py: caffelite
     reads the MNIST LMDB through its Data layer, PyTorch gets it preloaded);
   - CIFAR-10 "quick" forward + backward, batch 100;
   - AlexNet (LRN, group 2, dropout) forward + backward, batch 10, 227 x 227.
   The CIFAR-10 and AlexNet nets are defined once in benchmarks/nets.py with
   an Input layer; both frameworks start from the same weights and inputs, and
   the runner checks their first losses agree. A forward + backward step
   includes clearing the parameter gradients on both sides.
3. Peak memory: each framework and net in a fresh process (see the printed
   method).
The speed ratio is caffelite's speed over PyTorch's (> 1: caffelite is
faster), of the medians (what the goals are judged on) and, as "paired", the
median of each repetition's own ratio (its two runs are seconds apart, so a
drift in the machine's speed between repetitions cancels); goals: LeNet and
CIFAR-10 >= 1.2, AlexNet >= 1.0, memory <= PyTorch's.
Where a speed goal is missed, caffelite's per-layer times follow.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

BENCHES = ("lenet", "cifar10_quick", "alexnet")
TITLES = {"lenet": "LeNet training, batch 64 (iter/s)",
          "cifar10_quick": "CIFAR-10 quick fwd+bwd, batch 100 (ms)",
          "alexnet": "AlexNet fwd+bwd, batch 10 (ms)"}
GOALS = {"lenet": 1.2, "cifar10_quick": 1.2, "alexnet": 1.0}
# Iterations per timed run (full, --quick): each run lasts about a second or two.
ITERS = {"lenet": (100, 50), "cifar10_quick": (20, 10), "alexnet": (4, 2)}
# Variables some machines set for old OpenBLAS builds; they slow a current NumPy.
OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


# ---- the benchmarks, as seen from inside a worker ---------------------------------------------
def _lenet_flops_per_iter() -> float:
    from nets import Conv, IP, Pool, Spec, train_flops

    spec = Spec("LeNet", 64, (1, 28, 28), [Conv("conv1", 20, 5), Pool("pool1", "MAX", 2, 2),
                                            Conv("conv2", 50, 5), Pool("pool2", "MAX", 2, 2),
                                            IP("ip1", 500), IP("ip2", 10)])
    return train_flops(spec)


def flops(bench: str) -> float:
    """FLOPs of one timed unit (a training iteration, a forward + backward)."""
    if bench == "lenet":
        return _lenet_flops_per_iter()
    import nets

    return nets.train_flops(nets.SPECS[bench])


class CaffeliteBench:
    def __init__(self, bench: str):
        self.bench = bench
        if bench == "lenet":
            import lenet_cpu

            self.rate, self._close = lenet_cpu.caffelite_trainer()
            self.net = None
        else:
            import nets

            self.net = nets.caffelite_net(nets.SPECS[bench])
            self.first_loss = self.step()

    def step(self) -> float:
        self.net.clear_param_diffs()
        return self.net.forward_backward()

    def run(self, iters: int) -> float:
        """iter/s for LeNet, ms per forward+backward otherwise."""
        if self.bench == "lenet":
            return self.rate(iters)
        start = time.perf_counter()
        for _ in range(iters):
            self.step()
        return (time.perf_counter() - start) / iters * 1e3

    def layers(self, iters: int):
        from layer_times import layer_times

        net = self.net
        if net is None:
            import lenet_cpu  # noqa: F401 - the solver's net

            net = self._solver_net()
        return layer_times(net, iters)

    def _solver_net(self):
        # lenet_cpu keeps the solver in its closure; its close() is solver.close.
        return self._close.__self__.net


class TorchBench:
    def __init__(self, bench: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.bench = bench
        if bench == "lenet":
            import lenet_cpu

            self.rate, _ = lenet_cpu.torch_trainer()
            return
        import nets

        self.model, self.x, self.y = nets.torch_model(nets.SPECS[bench])
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.first_loss = self.step()

    def step(self) -> float:
        self.model.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        return float(loss.detach())

    def run(self, iters: int) -> float:
        if self.bench == "lenet":
            return self.rate(iters)
        start = time.perf_counter()
        for _ in range(iters):
            self.step()
        return (time.perf_counter() - start) / iters * 1e3


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed (pip install threadpoolctl to see the BLAS kernel)"
    parts = []
    for pool in threadpool_info():
        parts.append(f"{pool.get('internal_api')} {pool.get('version')} kernel "
                     f"{pool.get('architecture')} x{pool.get('num_threads')} "
                     f"({Path(pool.get('filepath', '')).name})")
    return "; ".join(parts) or "none found"


def worker(framework: str, threads: int) -> None:
    """Answer one JSON command per line on stdin with one JSON line on stdout."""
    if framework == "caffelite":
        import caffelite  # noqa: F401 - before NumPy, as the command line (its BLAS settings)
    benches: dict = {}
    out = sys.stdout
    sys.stdout = sys.stderr  # logging and prints of the frameworks stay off the channel
    for line in sys.stdin:
        cmd = json.loads(line)
        op, bench = cmd["op"], cmd.get("bench")
        if op == "info":
            import numpy as np

            info = {"numpy": np.__version__, "blas": blas_info()}
            if framework == "torch":
                import torch

                info["torch"] = torch.__version__
                info["threads"] = torch.get_num_threads()
            reply = info
        elif op == "setup":
            benches[bench] = (TorchBench(bench, threads) if framework == "torch"
                              else CaffeliteBench(bench))
            reply = {"first_loss": getattr(benches[bench], "first_loss", None)}
        elif op == "run":
            benches[bench].run(1)  # untimed: the first step after the pause wakes threads and caches
            reply = {"value": benches[bench].run(cmd["iters"])}
        elif op == "layers":
            reply = {"rows": benches[bench].layers(cmd["iters"])}
        elif op == "sgemm":
            reply = {"gflops": sgemm_gflops(cmd["size"], cmd["reps"])}
        else:
            reply = {"error": f"unknown op {op}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class Worker:
    def __init__(self, framework: str, threads: int, env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", framework, "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO))

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"a benchmark worker died (exit {self.proc.wait()}); see its messages above")
        reply = json.loads(line)
        if "error" in reply:
            raise SystemExit(reply["error"])
        return reply

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


# ---- sgemm ---------------------------------------------------------------------------------------
def sgemm_gflops(size: int, reps: int) -> float:
    import numpy as np

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = a.copy()
    c = np.empty_like(a)
    np.matmul(a, b, out=c)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        np.matmul(a, b, out=c)
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times) / 1e9


# ---- memory ----------------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_probe(framework: str, bench: str, threads: int) -> None:
    """In a fresh process: RSS after imports and inputs, then peak RSS (ru_maxrss) after training."""
    import numpy as np  # noqa: F401

    if framework == "torch":
        import torch  # noqa: F401

        torch.set_num_threads(threads)
    else:
        import caffelite.net  # noqa: F401
        from caffelite import config  # noqa: F401
    import nets  # noqa: F401

    if bench != "lenet":
        nets.inputs(nets.SPECS[bench])  # the inputs exist before the net in both
    base = _rss_mb()
    runner = TorchBench(bench, threads) if framework == "torch" else CaffeliteBench(bench)
    runner.run(ITERS[bench][1] if bench != "lenet" else 30)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"base": base, "peak": peak}))


def measure_memory(framework: str, bench: str, threads: int, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--memory", framework, bench,
                           "--threads", str(threads)], capture_output=True, text=True, env=env,
                          cwd=str(REPO))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"memory probe {framework} {bench} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


# ---- the run ------------------------------------------------------------------------------------------
def worker_env(threads: int, keep_openblas_env: bool) -> tuple[dict, list[str]]:
    env = dict(os.environ)
    notes = []
    if not keep_openblas_env:
        present = [name for name in OPENBLAS_OVERRIDES if name in env]
        if present:
            for name in OPENBLAS_OVERRIDES:
                env.pop(name, None)
            notes.append(f"unset {' and '.join(OPENBLAS_OVERRIDES)} in the benchmark processes "
                         f"(were {', '.join(f'{n}={os.environ[n]}' for n in present)})")
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")])
    return env, notes


def median(values):
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and iterations")
    parser.add_argument("--reps", type=int, help="alternating repetitions (default 5, --quick 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for both frameworks (default: all cores)")
    parser.add_argument("--only", choices=BENCHES, action="append", help="run only these benchmarks")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--layers", action="store_true", help="per-layer table for every benchmark")
    parser.add_argument("--keep-openblas-env", action="store_true",
                        help=f"keep {' / '.join(OPENBLAS_OVERRIDES)} if the environment sets them")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.threads)
        return
    if args.memory:
        memory_probe(*args.memory, args.threads)
        return

    reps = args.reps or (3 if args.quick else 5)
    benches = args.only or list(BENCHES)
    which = 1 if args.quick else 0
    env, notes = worker_env(args.threads, args.keep_openblas_env)
    print("caffelite vs PyTorch on the CPU")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (at start)")
    for note in notes:
        print(f"note: {note}")
    ours = Worker("caffelite", args.threads, env)
    theirs = Worker("torch", args.threads, env)
    info_c, info_t = ours.ask(op="info"), theirs.ask(op="info")
    print(f"threads: {args.threads} for both (OPENBLAS/OMP/MKL_NUM_THREADS, torch.set_num_threads: "
          f"{info_t['threads']}); NumPy {info_c['numpy']}, PyTorch {info_t['torch']}")
    print(f"BLAS (caffelite's process): {info_c['blas']}")
    sgemm = [ours.ask(op="sgemm", size=2048, reps=5)["gflops"] for _ in range(3 if args.quick else 5)]
    peak = median(sgemm)
    print(f"NumPy float32 sgemm 2048^3: {peak:.1f} GFLOP/s (median of {len(sgemm)}: "
          f"{', '.join(f'{g:.0f}' for g in sgemm)})")
    print()

    results = {}
    for bench in benches:
        c_setup, t_setup = ours.ask(op="setup", bench=bench), theirs.ask(op="setup", bench=bench)
        if c_setup["first_loss"] is not None:
            a, b = c_setup["first_loss"], t_setup["first_loss"]
            same = abs(a - b) <= 1e-3 * max(1.0, abs(b))
            extra = "" if bench != "alexnet" else " (dropout masks differ)"
            print(f"{bench}: first loss caffelite {a:.6f}, PyTorch {b:.6f}: "
                  f"{'same net' if same else 'DIFFERENT'}{extra}")
        results[bench] = {"caffelite": [], "torch": []}
    print()

    for rep in range(reps):
        for bench in benches:
            iters = ITERS[bench][which]
            for name, w in (("caffelite", ours), ("torch", theirs)) if rep % 2 == 0 else \
                    (("torch", theirs), ("caffelite", ours)):
                time.sleep(0.2)  # let the other process's spinning BLAS / OpenMP threads sleep
                results[bench][name].append(w.ask(op="run", bench=bench, iters=iters)["value"])
        print(f"rep {rep + 1}/{reps}: " + "; ".join(
            f"{b} {results[b]['caffelite'][-1]:.1f} vs {results[b]['torch'][-1]:.1f}" for b in benches),
            flush=True)
    load = os.getloadavg()
    print()
    print(f"Medians of {reps} alternating repetitions; speed ratio = caffelite speed / PyTorch speed; "
          f"load average {' '.join(f'{x:.2f}' for x in load)} (at end)")
    print(f"  {'benchmark':<40} {'caffelite':>10} {'PyTorch':>10} {'ratio':>6} {'paired':>6} "
          f"{'goal':>5}  GFLOP/s caffelite / PyTorch (sgemm {peak:.0f})")
    missed = []
    for bench in benches:
        c, t = median(results[bench]["caffelite"]), median(results[bench]["torch"])
        f = flops(bench)
        pairs = zip(results[bench]["caffelite"], results[bench]["torch"])
        if bench == "lenet":
            ratio, gc, gt = c / t, f * c / 1e9, f * t / 1e9
            paired = median([a / b for a, b in pairs])
        else:
            ratio, gc, gt = t / c, f / c / 1e6, f / t / 1e6
            paired = median([b / a for a, b in pairs])
        ok = ratio >= GOALS[bench]
        if not ok:
            missed.append(bench)
        results[bench].update(ratio=ratio)
        print(f"  {TITLES[bench]:<40} {c:10.1f} {t:10.1f} {ratio:6.2f} {paired:6.2f} {GOALS[bench]:5.1f}  "
              f"{gc:6.1f} / {gt:6.1f}   {'ok' if ok else 'MISSED'}")
    print("  (ratio: of the medians; paired: the median of each repetition's ratio, steadier where the "
          "machine's speed drifts between repetitions)")
    print("  (FLOPs: convolutions and inner products only, 2 per multiply-add, backward = 2 x forward)")

    for bench in benches:
        if bench in missed or args.layers:
            rows = ours.ask(op="layers", bench=bench, iters=3 if bench == "alexnet" else 10)["rows"]
            from layer_times import format_table

            print()
            print(format_table(rows, f"caffelite per-layer times, {bench} (each layer timed alone, "
                                     f"medians; LeNet: the solver's train net):"))
    ours.close()
    theirs.close()

    if not args.no_memory:
        print()
        print("Peak memory: each framework and net in a fresh process; 'base' = RSS after importing the "
              "framework and creating the inputs, 'peak' = ru_maxrss after building the net and "
              "training it; 'net' = peak - base (what the net, its buffers and gradients add).")
        print(f"  {'benchmark':<16} {'caffelite base/peak/net MB':>28} {'PyTorch base/peak/net MB':>28} "
              f"{'peak ratio':>10} {'net ratio':>9}")
        for bench in benches:
            c = measure_memory("caffelite", bench, args.threads, env)
            t = measure_memory("torch", bench, args.threads, env)
            cn, tn = c["peak"] - c["base"], t["peak"] - t["base"]
            flag = "ok" if c["peak"] <= t["peak"] and cn <= tn else (
                "peak ok, net MISSED" if c["peak"] <= t["peak"] else "MISSED")
            print(f"  {bench:<16} {c['base']:8.0f} {c['peak']:8.0f} {cn:8.0f}   "
                  f"{t['base']:8.0f} {t['peak']:8.0f} {tn:8.0f}   {c['peak'] / t['peak']:9.2f} "
                  f"{cn / max(tn, 1):9.2f}  {flag}")


if __name__ == "__main__":
    main()
