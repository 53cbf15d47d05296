"""The ``caffelite`` command: train, test, time and device_query, as Caffe's ``caffe`` tool.

Every flag is accepted as ``--flag`` and as Caffe's ``-flag``. A user mistake
prints one line (file, line, layer, what to do) and exits with the error's code;
``--debug`` shows the traceback instead. Exit codes: 0 done, 1 internal error
(a bug: please report it), 2 configuration or command-line error, 3 data error
(missing or malformed data, weights or snapshot files), 4 training error
(divergence, out of memory), 130 interrupted (a second Ctrl-C).

Signals while training (Caffe's ``-sigint_effect`` / ``-sighup_effect``, each
``stop``, ``snapshot`` or ``none``): they are acted on after the current
iteration. ``stop`` ends training as Caffe does, which still writes the final
snapshot when ``snapshot_after_train`` is true (the default). SIGTERM
snapshots, then stops, and the command exits with 143 (128 + SIGTERM) so a
job scheduler sees the run as terminated, not done. A second Ctrl-C (or SIGTERM) while the first one's
request is still pending stops at once (exit 130), but only after a snapshot
being written is complete.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import time
from typing import Sequence

from .errors import CaffeliteError, ConfigError
from .log import ProgressBar, g, is_terminal, setup_logging

log = logging.getLogger("caffelite")

EFFECTS = ("stop", "snapshot", "none")


# ---- argument parsing ---------------------------------------------------------------
def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add ``--name`` and Caffe's single-dash ``-name`` for the same option."""
    parser.add_argument(f"--{name}", f"-{name}", dest=name, **kwargs)


def _common(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "gpu", default=None, help="comma-separated device ids, or 'all'")
    _flag(parser, "level", type=int, default=0, help="net state level")
    _flag(parser, "stage", default="", help="comma-separated net state stages")
    _flag(parser, "plugin", action="append", default=[], help="import MODULE to register its layers")
    _flag(parser, "debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caffelite",
                                     description="Caffe-style training from YAML or prototxt files.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train or fine-tune a model")
    _flag(train, "solver", required=True, help="solver file (.yaml or .prototxt)")
    _flag(train, "weights", default=None, help="comma-separated weight files to start from")
    _flag(train, "snapshot", default=None,
          help="a .solverstate to resume from, or 'auto': the newest complete snapshot of the "
               "solver's snapshot_prefix (a fresh start when there is none)")
    _flag(train, "sigint_effect", choices=EFFECTS, default="stop", help="what Ctrl-C does")
    _flag(train, "sighup_effect", choices=EFFECTS, default="snapshot", help="what SIGHUP does")
    _flag(train, "set", action="append", default=[], metavar="KEY=VALUE", help="override a solver field")
    _flag(train, "run_dir", default=None,
          help="folder for metrics.csv/.jsonl, TensorBoard events and the resolved solver "
               "(default: the snapshot prefix's folder; 'none' writes none)")
    _flag(train, "progress", choices=("auto", "on", "off"), default="auto",
          help="progress bar on stderr (auto: only on a terminal)")
    _common(train)

    test = sub.add_parser("test", help="score a model")
    _flag(test, "model", required=True, help="net file")
    _flag(test, "weights", required=True, help="comma-separated weight files")
    _flag(test, "iterations", type=int, default=50, help="batches to score")
    _common(test)

    timing = sub.add_parser("time", help="benchmark a model's execution time, layer by layer")
    _flag(timing, "model", required=True, help="net file")
    _flag(timing, "weights", default=None, help="optional weight files")
    _flag(timing, "iterations", type=int, default=50, help="timed iterations")
    _flag(timing, "phase", choices=("TRAIN", "TEST"), default="TRAIN", help="net phase")
    _common(timing)

    query = sub.add_parser("device_query", help="show GPU diagnostics")
    _common(query)

    from .tools import tool_modules  # noqa: PLC0415

    for tool in tool_modules():
        tool_parser = sub.add_parser(tool.COMMAND, help=tool.HELP, description=tool.HELP)
        tool.add_arguments(tool_parser)
        _flag(tool_parser, "debug", action="store_true", help="show tracebacks")
        tool_parser.set_defaults(handler=tool.run)
    return parser


# ---- commands ------------------------------------------------------------------------
def _device(args, solver_param=None):
    from .backend import CPU, Device, gpu_available  # noqa: PLC0415

    spec = args.gpu
    if spec is None and solver_param is not None and solver_param.HasField("solver_mode") \
            and solver_param.solver_mode == solver_param.GPU:
        spec = str(solver_param.device_id)
    if spec is None:
        return CPU
    if spec == "all":
        if not gpu_available():
            raise ConfigError("--gpu all: no GPU found", hint="run without --gpu to use the CPU")
        spec = "0"
    # test and time run on one device: the first listed, as Caffe (train spreads over all).
    ids = [s for s in spec.split(",") if s.strip()] or ["0"]
    try:
        return Device.gpu(int(ids[0]))
    except ValueError:
        raise ConfigError(f"--gpu '{spec}' is not a device id", hint="for example --gpu 0") from None


def _stages(args) -> list[str]:
    return [s for s in args.stage.split(",") if s]


def cmd_train(args) -> int:
    from . import config  # noqa: PLC0415
    from .parallel import env_rank, parallel_requested, quiet_other_ranks, train_parallel  # noqa: PLC0415
    from .solvers.base import create_solver, resolve_snapshot_prefix  # noqa: PLC0415
    from .solvers.snapshots import latest_snapshot  # noqa: PLC0415

    quiet_other_ranks(env_rank())

    auto = args.snapshot == "auto"
    if args.weights and args.snapshot and not auto:
        raise ConfigError("give either --weights or --snapshot, not both",
                          hint="--snapshot resumes a run; --weights starts a new one from trained weights "
                               "(--snapshot auto may be combined with --weights)")
    param = config.load_solver(args.solver, args.set)
    param.train_state.level = args.level
    param.train_state.stage.extend(_stages(args))
    resume = args.snapshot
    if auto:
        prefix = resolve_snapshot_prefix(param, args.solver)
        resume = latest_snapshot(prefix) if prefix else None
        if resume:
            log.info("--snapshot auto: resuming from %s, the newest complete snapshot of %s%s", resume, prefix,
                     f" (--weights {args.weights} is not used)" if args.weights else "")
        else:
            log.info("--snapshot auto: no complete snapshot %s_iter_* found; starting %s", prefix,
                     "from --weights" if args.weights else "from scratch")
    if args.weights or resume:
        # --weights replaces the solver's own; a resumed run takes its weights from the snapshot.
        del param.weights[:]
        if not resume:
            param.weights.extend(w for w in (args.weights or "").split(",") if w)
    if parallel_requested(args.gpu):
        if args.gpu is None and param.HasField("solver_mode") and param.solver_mode == param.GPU:
            args.gpu = "all"  # mpirun with a GPU solver: each rank takes its node-local GPU
        return train_parallel(param, source=args.solver, gpu=args.gpu, resume_file=resume,
                              body=functools.partial(train_body, args=args, param=param), debug=args.debug)
    solver = create_solver(param, source=args.solver, device=_device(args, param))
    try:
        return train_body(solver, resume, args=args, param=param)
    finally:
        solver.close()


def train_body(solver, resume: str | None, *, args, param) -> int:
    """Train one (rank's) solver with the command line's comforts; module level so that
    spawned GPU ranks can receive it."""
    try:
        _log_summaries(solver.net, solver.test_nets)
        if solver.rank == 0:  # one run folder and one progress bar
            _attach_run_folder(solver, param, args)
            if args.progress == "on" or (args.progress == "auto" and is_terminal()):
                solver.callbacks.append(ProgressBar())
        with SignalHandlers(solver, args.sigint_effect, args.sighup_effect) as handlers:
            solver.solve(resume_file=resume)
    except CaffeliteError as exc:
        raise locate(exc, solver.net.source or args.solver) from None
    # Stopped by SIGTERM: the snapshot is written; say "terminated" (128 + 15) to the scheduler.
    return 128 + signal.SIGTERM if handlers.terminated else 0


def _log_summaries(net, test_nets=()) -> None:
    from .summary import log_summary  # noqa: PLC0415

    log_summary(net, logger=log)
    for test_net in test_nets:
        log_summary(test_net, table=False, logger=log)


def _attach_run_folder(solver, param, args) -> None:
    """Metrics files and the resolved solver go to --run_dir, else the snapshot prefix's folder."""
    import os  # noqa: PLC0415

    from .metrics import RunRecorder, write_resolved_config  # noqa: PLC0415

    folder = args.run_dir
    if folder is None:
        folder = (os.path.dirname(solver.prefix) or ".") if solver.prefix else None
    if not folder or folder.lower() == "none" or solver.rank != 0:
        return
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"'{folder}' is not writable")
        for path in write_resolved_config(folder, param, protect=[args.solver]):
            log.info("Wrote the resolved configuration to %s", path)
    except OSError as exc:  # metrics are a comfort: never a reason not to train
        log.warning("not writing metrics to %s (%s); pass --run_dir DIR to choose another folder",
                    folder, exc)
        return
    solver.callbacks.append(RunRecorder(folder))


class SignalHandlers:
    """Install the training signal handlers (see the module doc) for a ``with`` block."""

    def __init__(self, solver, sigint_effect: str, sighup_effect: str):
        self.solver = solver
        self.effects = {signal.SIGINT: sigint_effect}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = sighup_effect
        if hasattr(signal, "SIGTERM"):
            self.effects[signal.SIGTERM] = "snapshot+stop"
        self.pending = False   # a Ctrl-C/SIGTERM request not yet carried out
        self.stopping = False  # a stop was asked: the run is ending
        self.terminated = False  # SIGTERM was received
        self._notes: list[str] = []
        self._previous: dict = {}

    def __enter__(self) -> "SignalHandlers":
        import threading  # noqa: PLC0415

        if threading.current_thread() is not threading.main_thread():
            return self  # signals can only be handled in the main thread
        for signum in self.effects:
            self._previous[signum] = signal.signal(signum, self.handle)
        self.solver.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if self in self.solver.callbacks:
            self.solver.callbacks.remove(self)

    def handle(self, signum, frame) -> None:
        """Only sets flags (printing from a handler can break a write in progress)."""
        from .io.atomic import interrupt  # noqa: PLC0415

        effect = self.effects.get(signum, "none")
        escalates = signum != getattr(signal, "SIGHUP", None)
        if escalates and (self.pending or self.stopping) and effect != "none":
            interrupt()  # KeyboardInterrupt now, or when the snapshot being written is complete
            return
        name = signal.Signals(signum).name
        self.terminated |= signum == getattr(signal, "SIGTERM", None)
        if effect == "none":
            self._notes.append(f"{name} ignored ({name.lower()[3:]}_effect none)")
            return
        if "snapshot" in effect:
            self.solver.request_snapshot()
        if "stop" in effect:
            self.solver.request_stop()
            self.stopping = True
        if escalates:
            self.pending = True
        again = "; send it again to stop at once" if escalates else ""
        self._notes.append(f"{name}: {effect.replace('+', ' then ')} requested{again}")

    # solver callbacks: report from the training thread, not from the handler
    def on_iteration_end(self, solver) -> None:
        while self._notes:
            log.info("%s", self._notes.pop(0))

    def on_snapshot(self, solver, model_path, state_path) -> None:
        if not self.stopping:
            self.pending = False


def locate(exc: CaffeliteError, net_source: str | None, weights: str | None = None) -> CaffeliteError:
    from .solvers.base import locate_error  # noqa: PLC0415

    return locate_error(exc, net_source, weights)


def _load_net(args, phase: int):
    from . import config  # noqa: PLC0415
    from .io.weights import copy_weights  # noqa: PLC0415
    from .net import Net  # noqa: PLC0415

    param = config.load_net(args.model)
    net = Net(param, phase=phase, level=args.level, stages=_stages(args),
              device=_device(args), source=args.model)
    try:
        if args.weights:
            for weights in (w.strip() for w in args.weights.split(",") if w.strip()):
                try:
                    copy_weights(net, weights)
                except CaffeliteError as exc:
                    raise locate(exc, args.model, weights) from None
        _log_summaries(net)
    except BaseException:
        net.close()
        raise
    return net


def _out_of_memory(exc, args, net=None, when: str = "") -> CaffeliteError:
    """The TrainingError for a GPU out-of-memory while ``test`` or ``time`` ran (see oom.py)."""
    from .oom import batch_size_of, out_of_memory_error  # noqa: PLC0415

    name, batch = "?", None
    try:
        if net is None:
            from . import config  # noqa: PLC0415

            net = config.load_net(args.model)
        name, batch = net.name, batch_size_of(net)
    except Exception:  # the message must not fail
        pass
    return out_of_memory_error(exc, net_name=name, source=args.model, batch_size=batch, when=when,
                               device=f"gpu:{args.gpu}" if args.gpu else None)


def _load_net_guarded(args, phase: int):
    from . import backend  # noqa: PLC0415

    try:
        return _load_net(args, phase)
    except backend.out_of_memory_types() as exc:
        raise _out_of_memory(exc, args, when="building the net") from None


def cmd_test(args) -> int:
    from . import backend  # noqa: PLC0415
    from .layers.base import TEST  # noqa: PLC0415

    if args.iterations < 1:
        raise ConfigError("--iterations must be at least 1")
    net = _load_net_guarded(args, TEST)
    try:
        return _run_test(args, net)
    except backend.out_of_memory_types() as exc:
        raise _out_of_memory(exc, args, net, "testing") from None
    except CaffeliteError as exc:
        raise locate(exc, args.model) from None
    finally:
        net.close()


def _run_test(args, net) -> int:
    log.info("Running for %d iterations.", args.iterations)
    scores: list[float] = []
    names: list[str] = []
    weights: list[float] = []
    total_loss = 0.0
    for i in range(args.iterations):
        loss = net.forward()
        total_loss += loss
        k = 0
        for name, blob in zip(net.output_blob_names, net.output_blobs):
            for value in blob.cpu_data().ravel().tolist():
                if i == 0:
                    scores.append(value)
                    names.append(name)
                    weights.append(net.blob_loss_weights.get(name, 0.0))
                else:
                    scores[k] += value
                log.info("Batch %d, %s = %s", i, name, g(value))
                k += 1
    log.info("Loss: %s", g(total_loss / args.iterations))
    for name, score, weight in zip(names, scores, weights):
        mean = score / args.iterations
        suffix = f" (* {g(weight)} = {g(weight * mean)} loss)" if weight else ""
        log.info("%s = %s%s", name, g(mean), suffix)
    return 0


def cmd_time(args) -> int:
    from . import backend  # noqa: PLC0415
    from .layers.base import TEST, TRAIN  # noqa: PLC0415

    if args.iterations < 1:
        raise ConfigError("--iterations must be at least 1")
    net = _load_net_guarded(args, TRAIN if args.phase == "TRAIN" else TEST)
    try:
        return _run_time(args, net)
    except backend.out_of_memory_types() as exc:
        raise _out_of_memory(exc, args, net, "timing forward/backward") from None
    except CaffeliteError as exc:
        raise locate(exc, args.model) from None
    finally:
        net.close()


def _run_time(args, net) -> int:
    log.info("Performing Forward")
    log.info("Initial loss: %s", g(net.forward()))
    log.info("Performing Backward")
    net.backward()
    n = len(net.layers)
    fwd, bwd = [0.0] * n, [0.0] * n
    sync = _synchronizer(net)
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations.", args.iterations)
    total_start = time.perf_counter()
    fwd_total = bwd_total = 0.0
    for it in range(args.iterations):
        net.clear_param_diffs()  # as in training, so backward times match a solver step
        start = time.perf_counter()
        for i, layer in enumerate(net.layers):
            t0 = time.perf_counter()
            try:
                layer.reshape(net.bottom_vecs[i], net.top_vecs[i])
                layer.forward(net.bottom_vecs[i], net.top_vecs[i])
            except CaffeliteError as exc:
                exc.layer = exc.layer or net.layer_names[i]
                raise
            sync()
            fwd[i] += time.perf_counter() - t0
        mid = time.perf_counter()
        for i in reversed(range(n)):
            if not net.layer_need_backward[i]:
                continue
            t0 = time.perf_counter()
            net.layers[i].backward(net.top_vecs[i], net.bottom_need_backward[i], net.bottom_vecs[i])
            sync()
            bwd[i] += time.perf_counter() - t0
        end = time.perf_counter()
        fwd_total += mid - start
        bwd_total += end - mid
        log.info("Iteration: %d forward-backward time: %.3f ms.", it + 1, (end - start) * 1e3)
    total = time.perf_counter() - total_start
    log.info("Average time per layer: ")
    width = max(len(name) for name in net.layer_names)
    for i, name in enumerate(net.layer_names):
        log.info("%*s\tforward: %.4f ms.", width, name, fwd[i] / args.iterations * 1e3)
        log.info("%*s\tbackward: %.4f ms.", width, name, bwd[i] / args.iterations * 1e3)
    log.info("Average Forward pass: %.4f ms.", fwd_total / args.iterations * 1e3)
    log.info("Average Backward pass: %.4f ms.", bwd_total / args.iterations * 1e3)
    log.info("Average Forward-Backward: %.4f ms.", (fwd_total + bwd_total) / args.iterations * 1e3)
    log.info("Total Time: %.3f ms.", total * 1e3)
    log.info("*** Benchmark ends ***")
    return 0


def _synchronizer(net):
    """A function that waits for the device, so per-layer GPU timings are real."""
    if not net.ctx.device.is_gpu:
        return lambda: None
    cp = net.ctx.xp
    return cp.cuda.get_current_stream().synchronize


def cmd_device_query(args) -> int:
    """Caffe's device_query, plus the library versions a GPU run depends on."""
    from .backend import cupy_module, gpu_available, tf32_enabled  # noqa: PLC0415
    from .layers import cpu_kernels  # noqa: PLC0415

    print(cpu_kernels.describe())
    if not gpu_available():
        print("No GPU available: CuPy is not installed or no CUDA device is visible. "
              "caffelite runs on the CPU; install 'caffelite[gpu]' on a machine with an NVIDIA GPU.")
        return 0
    cp = cupy_module()
    count = cp.cuda.runtime.getDeviceCount()
    try:
        ids = range(count) if args.gpu in (None, "all") else [int(s) for s in args.gpu.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--gpu '{args.gpu}' is not a list of device ids", hint="for example --gpu 0") from None
    for i in ids:
        if not 0 <= i < count:
            raise ConfigError(f"there is no GPU {i}: {count} device(s) visible", hint=f"use --gpu 0..{count - 1}")
        props = cp.cuda.runtime.getDeviceProperties(i)
        with cp.cuda.Device(i):
            free, total = cp.cuda.Device(i).mem_info
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        log.info("Device id:                     %d", i)
        log.info("Name:                          %s", name)
        log.info("Compute capability:            %d.%d", props["major"], props["minor"])
        log.info("Total global memory:           %d (%.1f GiB, %.1f GiB free)", total, total / 2**30,
                 free / 2**30)
        log.info("Multiprocessors:               %d", props["multiProcessorCount"])
        if "clockRate" in props:
            log.info("Clock rate:                    %.0f MHz", props["clockRate"] / 1000)
        if "l2CacheSize" in props:
            log.info("L2 cache:                      %.1f MiB", props["l2CacheSize"] / 2**20)
    for line in _library_versions(cp):
        log.info("%s", line)
    log.info("TF32 for float32 GEMMs:        %s", "on" if tf32_enabled() else "off (CUPY_TF32=0)")
    return 0


def _nccl_version(v: int) -> str:
    """NCCL's encoding: 21805 -> '2.18.5' (before 2.9: 1000 * major + 100 * minor + patch)."""
    if v >= 10000:
        return f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    return f"{v // 1000}.{v // 100 % 10}.{v % 100}"


def _library_versions(cp) -> list[str]:
    lines = [f"CuPy version:                  {cp.__version__}"]
    for label, get in (("CUDA runtime version:", cp.cuda.runtime.runtimeGetVersion),
                       ("CUDA driver version:", cp.cuda.runtime.driverGetVersion)):
        try:
            lines.append(f"{label:<31}{_cuda_version(get())}")
        except Exception as exc:
            lines.append(f"{label:<31}unknown ({exc})")
    from .layers.cudnn_conv import cudnn_module, cudnn_version  # noqa: PLC0415

    cudnn = cudnn_module()
    if cudnn is None:
        lines.append("cuDNN version:                 not available (pip install 'caffelite[cudnn]'); "
                     "convolutions use the im2col engine")
    else:
        frontend = getattr(cudnn, "__version__", "unknown")
        lines.append(f"cuDNN version:                 {cudnn_version()} (frontend {frontend})")
    try:
        from cupy.cuda import nccl  # noqa: PLC0415 - optional part of CuPy

        lines.append(f"NCCL version:                  {_nccl_version(int(nccl.get_version()))}")
    except Exception:
        lines.append("NCCL version:                  not available (multi-GPU training needs it)")
    return lines


def _cuda_version(v: int) -> str:
    """CUDA's encoding: 1000 * major + 10 * minor (12040 -> '12.4')."""
    return f"{v // 1000}.{v % 1000 // 10}"


HANDLERS = {"train": cmd_train, "test": cmd_test, "time": cmd_time, "device_query": cmd_device_query}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging()
    try:
        from .registry import load_plugin  # noqa: PLC0415

        for module in getattr(args, "plugin", []):
            load_plugin(module)
        handler = getattr(args, "handler", None) or HANDLERS[args.command]
        return handler(args)
    except CaffeliteError as exc:
        if args.debug:
            raise
        print(f"caffelite {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"caffelite {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # the output's reader is gone (`| head`): quiet, as Unix tools
        _drop_stdout()
        return 141
    except MemoryError as exc:
        if args.debug:
            raise
        print(f"caffelite {args.command}: error: out of memory ({type(exc).__name__}: {exc}) "
              f"(lower batch_size and raise iter_size by the same factor to keep the effective batch)",
              file=sys.stderr)
        return 4
    except Exception as exc:  # an internal error: one line unless --debug
        if args.debug:
            raise
        print(f"caffelite {args.command}: internal error: {type(exc).__name__}: {exc} "
              f"(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush finds no broken pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):   # (a stdout without a file descriptor)
        pass


if __name__ == "__main__":
    sys.exit(main())
