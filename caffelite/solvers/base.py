"""Solver: Caffe's training loop, testing, snapshots and resume.

One iteration (``step``), exactly in Caffe's order::

    zero param diffs
    test all test nets      if iter % test_interval == 0 and (iter > 0 or test_initialization)
    loss = mean over iter_size of net.forward_backward()
    smoothed loss over average_loss iterations; log on display
    apply_update():  rate = lr_policy(iter)
                     clip_gradients (global L2 norm of all diffs)
                     per param: normalize (1 / iter_size), regularize (L2 / L1 weight decay),
                                compute_update (the only per-type method: writes the step into diff)
                     net.update()  (W -= diff)
    iter += 1
    snapshot                if iter % snapshot == 0, or when asked (request_snapshot)

A solver type subclasses ``Solver``, sets ``history_sets`` (history blobs per
parameter) and implements ``compute_update(param_id, rate)``; it registers
with ``@register_solver("Name")``.

Hooks: objects in ``solver.callbacks`` may define any of ``on_start(solver)``
(before forward/backward), ``on_gradients_ready(solver)`` (before the update;
multi-device reduction goes here), ``on_iteration_end(solver)``,
``on_display(solver, outputs)``, ``on_test(solver, test_net_id, results)``,
``on_snapshot(solver, model_path, state_path)``, and ``on_solve_start(solver)`` /
``on_solve_end(solver)`` around ``solve`` (after a restore; the end hook also
runs when training fails). ``request_stop()`` and ``request_snapshot()`` are
safe to call from a signal handler; they are acted on once per iteration (and
between test batches), as in Caffe.

Divergence: the loss of every forward/backward pass is checked (one scalar;
with ``clip_gradients`` the global gradient norm too, which is computed anyway)
and the weights are checked before each snapshot. A NaN or Inf stops training
with a TrainingError naming the iteration and the layer found by
``caffelite.diagnose``; no snapshot of the diverged weights is written. On a
GPU the losses (and layers' checks such as labels in range, see
``backend.DEFERRED``) stay on the device and are read in one copy at display
time, before a test or a snapshot, every ``LOSS_DRAIN`` iterations and when
``step`` returns, so the host never waits for the GPU inside an iteration.

Mixed precision (``compute_dtype: float16``, or bfloat16 on a GPU): the nets
compute in that dtype and the update works on float32 master copies of the
parameters, with loss scaling and overflow skips (see mixed_precision.py);
``learnable_params`` are the parameters the update sees. Running out of GPU
memory, while building the nets or training, is a TrainingError naming the
net, its batch size and the allocation that failed (caffelite/oom.py).

Snapshots: each set is written inside ``io.atomic.critical()`` (a second Ctrl-C
waits for it); ``snapshot_keep`` (a caffelite field) then deletes the sets
older than the newest K.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from .. import backend
from ..backend import CPU, DEFERRED, Device, compute_dtype, gpu_available, seed_from_clock, set_tf32, to_numpy
from ..blob import Blob
from ..errors import CaffeliteError, ConfigError, DataError, TrainingError
from ..io.atomic import critical
from ..io.solverstate import SolverStateData, read_extra, read_solverstate, write_extra, write_solverstate
from ..io.weights import copy_weights, save_weights
from ..layers.base import TEST, TRAIN
from ..log import g
from ..net import Net, make_state
from ..proto import pb
from ..registry import SOLVERS
from ..upgrade import upgrade_solver
from .lr_policy import get_lr_policy

log = logging.getLogger(__name__)

# SolverParameter.SolverType (legacy ``solver_type``) -> ``type``.
HDF5 = 0  # SolverParameter.SnapshotFormat
#: On a GPU, the device losses are read at least every this many iterations (see step).
LOSS_DRAIN = 100


# ---- building ---------------------------------------------------------------------------
def create_solver(param, *, source: str | None = None, device: Device | None = None,
                  dtype=np.float32, **kwargs) -> "Solver":
    """The solver of the type ``param.type`` names (``solver_type`` accepted), built from ``param``."""
    param = upgrade_solver(param, source)
    if param.type not in SOLVERS:
        matches = [n for n in SOLVERS.names() if n.lower() == param.type.lower()]
        if matches:
            raise ConfigError(f"unknown solver type '{param.type}'", file=source,
                              hint=f"did you mean '{matches[0]}'? (type names are case-sensitive)")
    return SOLVERS.get(param.type)(param, source=source, device=device, dtype=dtype, **kwargs)


def default_device(param) -> Device:
    """Caffe's rule: the GPU only when the solver file says ``solver_mode: GPU``; the CPU (with a
    warning) when it says so but no GPU can be used. The command line passes its own device."""
    if param.HasField("solver_mode") and param.solver_mode == pb.SolverParameter.GPU:
        if gpu_available():
            return Device.gpu(param.device_id)
        log.warning("the solver asks for solver_mode: GPU but no GPU is available (CuPy missing or "
                    "no CUDA device); training on the CPU")
    return CPU


def resolve_snapshot_prefix(param, source: str | None, fallback_name: str = "") -> str | None:
    """Caffe's prefix rule: unset = the solver file path without its extension;
    a folder (an existing one, or a name ending in '/') = ``folder/<solver file stem>``."""
    prefix = param.snapshot_prefix if param.HasField("snapshot_prefix") else ""
    if not prefix:
        return os.path.splitext(source)[0] if source else None
    if prefix.endswith(("/", os.sep)) or os.path.isdir(prefix):
        stem = Path(source).stem if source else (fallback_name or "snapshot")
        return os.path.join(prefix, stem)
    return prefix


class Solver:
    """Trains ``self.net`` and tests ``self.test_nets`` as a SolverParameter says."""

    #: History blobs per learnable parameter (AdaDelta and Adam keep two).
    history_sets = 1

    def __init__(self, param, *, source: str | None = None, device: Device | None = None,
                 dtype=np.float32, rank: int = 0, world_size: int = 1, display_speed: bool = True):
        # A copy: the solver fills in fields (prefix, seed) without touching the caller's message.
        self.param = pb.SolverParameter()
        self.param.CopyFrom(upgrade_solver(param, source))
        param = self.param
        self.source = os.fspath(source) if source is not None else None
        self.type = param.type
        self.device = device if device is not None else default_device(param)
        self.dtype = np.dtype(dtype)
        self._dt = self.dtype.type
        # Mixed precision (caffelite fields): the nets compute in compute_dtype, the solver keeps
        # master weights and history in self.dtype (see mixed_precision.py).
        self.compute_dtype = (self.dtype if param.compute_dtype == "float32"
                              else compute_dtype(param.compute_dtype, self.device))
        self.mixed = None
        if self.device.is_gpu:
            set_tf32(param.allow_tf32)
        # On a GPU the losses stay on the device and are read in one copy at display time.
        self.defer_loss = self.device.is_gpu
        self._pending_losses: list = []
        self.rank, self.world_size = rank, world_size
        #: Show "(x iter/s, ys/N iters)" in the display line, as later Caffe versions do.
        self.display_speed = display_speed
        self.iter = 0
        self.current_step = 0
        self.callbacks: list = []
        self.requested_early_exit = False
        self._stop_requested = self._snapshot_requested = False
        self.loss = None
        self.smoothed_loss = self._dt(0)
        self._losses: list = []
        self._loss_start = 0
        self._keep_loss_window = False
        self.test_results: list[list[tuple[str, float, float]]] = []
        self.last_snapshot: tuple[str, str] | None = None
        self._last_snapshot_iter: int | None = None
        self._scratch: dict = {}

        self._check_param()
        self.check_param(param)
        try:
            self._lr_policy = get_lr_policy(param)
            self._lr_policy(param, 0, 0, self._dt)  # settings the policy needs are checked now
        except CaffeliteError as exc:
            raise locate_error(exc, self.source) from None
        seed = param.random_seed if param.random_seed >= 0 else seed_from_clock()
        self.seed = int(seed) + rank
        log.info("Initializing solver from parameters: \n%s", text_format.MessageToString(param))
        try:
            self.net = self._init_train_net()
            self.test_nets = self._init_test_nets()
            if self.compute_dtype != self.dtype:
                from .mixed_precision import MasterWeights  # noqa: PLC0415

                self.mixed = MasterWeights(self.net, param, self.dtype)
            for net in self.test_nets:
                net.share_trained_layers_with(self.net)
            for weights in param.weights:
                for net in [self.net, *self.test_nets]:
                    try:
                        self._copy_weights(net, weights)
                    except CaffeliteError as exc:
                        raise locate_error(exc, net.source or self.source, weights) from None
        except backend.out_of_memory_types() as exc:
            raise self.out_of_memory(exc, "building the nets") from None
        self.prefix = resolve_snapshot_prefix(param, self.source, self.net.name)
        self._check_prefix()
        self.history = [Blob(p.shape, p.dtype, p.device, name=f"history{k}_{i}")
                        for k in range(self.history_sets)
                        for i, p in enumerate(self.learnable_params)]
        log.info("Solver scaffolding done.")

    # ---- checks -------------------------------------------------------------------------
    def _error(self, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(message, file=self.source, hint=hint)

    def _check_param(self) -> None:
        p = self.param
        train = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if len(train) != 1:
            raise self._error(
                "the solver names no train net" if not train else
                f"the solver names more than one train net ({', '.join(train)})",
                hint="give exactly one of net, net_param, train_net, train_net_param")
        generic = p.HasField("net") or p.HasField("net_param")
        n_specific = len(p.test_net) + len(p.test_net_param)
        if (generic and len(p.test_iter) < n_specific) or (not generic and len(p.test_iter) != n_specific):
            raise self._error(f"{len(p.test_iter)} test_iter value(s) for {n_specific} test net(s)",
                              hint="give one test_iter per test net")
        n_test = max(len(p.test_iter), n_specific) if generic else n_specific
        if len(p.test_state) and len(p.test_state) != n_test:
            raise self._error(f"{len(p.test_state)} test_state value(s) for {n_test} test net(s)",
                              hint="give test_state once per test net, or not at all")
        for name, low in (("average_loss", 1), ("iter_size", 1), ("display", 0), ("snapshot", 0),
                          ("max_iter", 0)):
            if getattr(p, name) < low:
                raise self._error(f"{name} must be at least {low}, got {getattr(p, name)}")
        if p.weight_decay and p.regularization_type not in ("L1", "L2"):
            raise self._error(f"unknown regularization_type '{p.regularization_type}'",
                              hint="use L2 (the default) or L1")

    @classmethod
    def check_param(cls, param) -> None:
        """Per-type checks of the SolverParameter (raise ConfigError)."""

    def _check_prefix(self) -> None:
        needs = self.param.snapshot > 0 or self.param.snapshot_after_train
        if self.prefix is None:
            if needs:
                raise self._error("snapshot_prefix is not set and there is no solver file to name "
                                  "the snapshots after",
                                  hint="set snapshot_prefix, or snapshot_after_train: false")
            return
        folder = os.path.dirname(self.prefix) or "."
        if needs and os.path.isdir(folder) and not os.access(folder, os.W_OK):
            raise self._error(f"cannot write snapshots to '{folder}'",
                              hint="choose a writable snapshot_prefix")

    # ---- nets ----------------------------------------------------------------------------
    def _read_net(self, path: str) -> "pb.NetParameter":
        from ..config import load_net  # noqa: PLC0415 - config is only needed for net files

        return load_net(path)

    def _make_net(self, net_param, state, net_key: int, source: str | None) -> Net:
        return Net(net_param, state, device=self.device, dtype=self.compute_dtype, seed=self.seed,
                   net_key=net_key, rank=self.rank, world_size=self.world_size, source=source)

    def _init_train_net(self) -> Net:
        p = self.param
        source = None
        if p.HasField("train_net_param"):
            log.info("Creating training net specified in train_net_param.")
            net_param = p.train_net_param
        elif p.HasField("train_net"):
            log.info("Creating training net from train_net file: %s", p.train_net)
            net_param, source = self._read_net(p.train_net), p.train_net
        elif p.HasField("net_param"):
            log.info("Creating training net specified in net_param.")
            net_param = p.net_param
        else:
            log.info("Creating training net from net file: %s", p.net)
            net_param, source = self._read_net(p.net), p.net
            self._generic_net = net_param
        state = make_state(TRAIN, 0, (), net_param.state, p.train_state)
        return self._make_net(net_param, state, 0, source)

    def _init_test_nets(self) -> list[Net]:
        p = self.param
        specs: list[tuple[str, object, str | None]] = []
        for net_param in p.test_net_param:
            specs.append(("test_net_param", net_param, None))
        for path in p.test_net:
            specs.append((f"test_net file: {path}", self._read_net(path), path))
        remaining = len(p.test_iter) - len(specs)
        if p.HasField("net_param"):
            specs += [("net_param", p.net_param, None)] * remaining
        elif p.HasField("net"):
            generic = getattr(self, "_generic_net", None) or self._read_net(p.net)
            specs += [(f"net file: {p.net}", generic, p.net)] * remaining
        nets = []
        for i, (what, net_param, source) in enumerate(specs):
            state = make_state(TEST, 0, (), net_param.state,
                               p.test_state[i] if len(p.test_state) else None)
            log.info("Creating test net (#%d) specified by %s", i, what)
            nets.append(self._make_net(net_param, state, i + 1, source))
        return nets

    # ---- the loop ---------------------------------------------------------------------------
    def solve(self, resume_file: str | None = None) -> None:
        """Caffe's Solve: optionally restore, train to max_iter, snapshot, final display and test."""
        p = self.param
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", p.lr_policy)
        self.requested_early_exit = False
        if resume_file:
            log.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        self._call("on_solve_start")
        try:
            self._solve()
        except backend.out_of_memory_types() as exc:  # the final display or test ran out
            raise self.out_of_memory(exc, f"iteration {self.iter}") from None
        finally:
            self._call("on_solve_end")

    def _solve(self) -> None:
        p = self.param
        self.step(p.max_iter - self.iter)
        if (p.snapshot_after_train and self.rank == 0 and self._last_snapshot_iter != self.iter
                and (not p.snapshot or self.iter % p.snapshot != 0)):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            # Forward only: the weights have had their max_iter updates; this shows the final loss.
            self._update_smoothed_loss(self._dt(self.net.forward()))
            log.info("Iteration %d, loss = %s", self.iter, g(self.smoothed_loss))
        if p.test_interval and self.iter % p.test_interval == 0 and self.rank == 0:
            self.test_all()
        log.info("Optimization Done.")

    def step(self, iters: int):
        """Run ``iters`` iterations; returns the smoothed loss."""
        stop_iter = self.iter + iters
        if self._keep_loss_window:  # resumed: continue the window of the interrupted run
            self._keep_loss_window = False
        else:
            self._losses, self.smoothed_loss, self._loss_start = [], self._dt(0), self.iter
        self._timer_start, self._iterations_last = time.perf_counter(), self.iter
        was_deferring = DEFERRED.active
        DEFERRED.active = was_deferring or self.defer_loss
        try:
            self._steps(stop_iter)
            self._drain_losses()
        except backend.out_of_memory_types() as exc:
            self._pending_losses = []
            DEFERRED.clear()
            raise self.out_of_memory(exc, f"training (iteration {self.iter})") from None
        except BaseException:
            self._pending_losses = []
            DEFERRED.clear()
            raise
        finally:
            DEFERRED.active = was_deferring
        return self.smoothed_loss

    def _steps(self, stop_iter: int) -> None:
        p = self.param
        while self.iter < stop_iter:
            self.net.clear_param_diffs()
            if (p.test_interval and self.iter % p.test_interval == 0
                    and (self.iter > 0 or p.test_initialization) and self.rank == 0):
                self.test_all()
                if self.requested_early_exit:
                    break
            self._call("on_start")
            display = p.display and self.iter % p.display == 0
            if self.mixed is not None:
                self.mixed.before_forward()
            if self.defer_loss:
                self._forward_backward_on_device()
                if display:
                    self._drain_losses()
            else:
                loss = self._dt(0)
                for _ in range(p.iter_size):
                    loss += self._dt(self.net.forward_backward())
                    if not math.isfinite(loss):  # one scalar per pass: the only per-iteration cost
                        raise self.diverged(f"the loss is {loss}")
                loss /= self._dt(p.iter_size)
                self.loss = loss
                self._update_smoothed_loss(loss)
            if display:
                self._display()
            self._call("on_gradients_ready")
            if self.mixed is None or self.mixed.after_backward(self.iter):
                self.apply_update()
            self.iter += 1
            self._call("on_iteration_end")
            snapshot_asked, stop_asked = self.take_requests()
            if ((p.snapshot and self.iter % p.snapshot == 0) or snapshot_asked) and self.rank == 0:
                self.snapshot()
            if stop_asked:
                self.requested_early_exit = True
                break

    # ---- losses kept on the device (GPU) ------------------------------------------------------
    def _forward_backward_on_device(self) -> None:
        """forward/backward x iter_size with the loss left on the device (no host round trip).

        The losses are read in one copy at display time, before a test or a snapshot, every
        ``LOSS_DRAIN`` iterations and when ``step`` returns; a NaN/Inf loss is reported then.
        """
        p = self.param
        loss = self.net.forward_backward(host_loss=False)
        for _ in range(p.iter_size - 1):
            loss = loss + self.net.forward_backward(host_loss=False)
        if p.iter_size != 1:
            loss = loss / self._xp.float32(p.iter_size)
        self._pending_losses.append((self.iter, loss))
        if len(self._pending_losses) >= LOSS_DRAIN:
            self._drain_losses()

    def _drain_losses(self) -> None:
        """Move the pending device losses to the host (one copy), check them, smooth them; raise
        what a layer's deferred check (labels out of range, ...) found meanwhile."""
        DEFERRED.raise_first()
        pending, self._pending_losses = self._pending_losses, []
        if not pending:
            return
        values = to_numpy(self._xp.stack([loss for _, loss in pending]))
        for (iteration, _), value in zip(pending, values):
            loss = self._dt(value)
            if not math.isfinite(loss):
                raise self.diverged(f"the loss is {loss}" + (
                    f" (first seen at iteration {iteration})" if iteration != self.iter else ""))
            self.loss = loss
            self._update_smoothed_loss(loss, iteration)

    def _update_smoothed_loss(self, loss, iteration: int | None = None) -> None:
        average = self.param.average_loss
        if len(self._losses) < average:
            self._losses.append(loss)
            n = len(self._losses)
            self.smoothed_loss = self._dt((self.smoothed_loss * (n - 1) + loss) / n)
        else:
            idx = ((self.iter if iteration is None else iteration) - self._loss_start) % average
            self.smoothed_loss += self._dt((loss - self._losses[idx]) / average)
            self._losses[idx] = loss

    def _display(self) -> None:
        if self.display_speed:
            lapse = time.perf_counter() - self._timer_start
            per_s = (self.iter - self._iterations_last) / (lapse or 1)
            log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", self.iter, g(per_s), g(lapse),
                     self.param.display, g(self.smoothed_loss))
        else:
            log.info("Iteration %d, loss = %s", self.iter, g(self.smoothed_loss))
        self._timer_start, self._iterations_last = time.perf_counter(), self.iter
        outputs = self._log_outputs(self.net, [b.cpu_data().ravel() for b in self.net.output_blobs],
                                    "Train", 1)
        self._call("on_display", outputs)

    def _log_outputs(self, net: Net, values: list, kind: str, divisor: int) -> list:
        out, index = [], 0
        for name, array in zip(net.output_blob_names, values):
            weight = self._dt(net.blob_loss_weights.get(name, 0.0))
            for value in array:
                value = self._dt(value) / self._dt(divisor) if divisor != 1 else self._dt(value)
                suffix = f" (* {g(weight)} = {g(weight * value)} loss)" if weight else ""
                log.info("    %s net output #%d: %s = %s%s", kind, index, name, g(value), suffix)
                out.append((name, float(value), float(weight)))
                index += 1
        return out

    # ---- the update ----------------------------------------------------------------------------
    def current_lr(self) -> float:
        """The learning rate of the current iteration, without side effects (for metrics)."""
        return float(self._lr_policy(self.param, self.iter, self.current_step, self._dt)[0])

    def get_learning_rate(self) -> float:
        rate, step = self._lr_policy(self.param, self.iter, self.current_step, self._dt)
        if self.param.lr_policy == "multistep" and step != self.current_step:
            log.info("MultiStep Status: Iteration %d, step = %d", self.iter, step)
        self.current_step = step
        return rate

    def apply_update(self) -> None:
        rate = self.get_learning_rate()
        if self.param.display and self.iter % self.param.display == 0:
            log.info("Iteration %d, lr = %s", self.iter, g(self._dt(rate)))
        self.clip_gradients()
        for param_id in range(len(self.learnable_params)):
            self.normalize(param_id)
            self.regularize(param_id)
            self.compute_update(param_id, rate)
        if self.mixed is None:
            self.net.update()
        else:
            self.mixed.update()

    def clip_gradients(self) -> None:
        clip = self.param.clip_gradients
        if clip < 0:
            return
        params = self.learnable_params
        xp = self._xp
        if xp is np:
            sumsq = self._dt(0)
            for blob in params:
                d = blob.diff.ravel()
                sumsq += self._dt(float(xp.dot(d, d)))
        else:  # summed on the device: one host read per iteration, not one per parameter
            total = xp.zeros((), self.dtype)
            for blob in params:
                d = blob.diff.ravel()
                total += xp.dot(d, d)
            sumsq = self._dt(float(total))
        l2norm = np.sqrt(sumsq)
        if not math.isfinite(l2norm):
            raise self.diverged(f"the gradient's L2 norm is {l2norm}")
        if l2norm > clip:
            scale = self._dt(clip) / l2norm
            log.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale factor %s",
                     g(l2norm), g(clip), g(scale))
            for blob in params:
                diff = blob.diff
                diff *= scale

    def normalize(self, param_id: int) -> None:
        """Average the gradient accumulated over iter_size forward/backward passes."""
        if self.param.iter_size != 1:
            diff = self.learnable_params[param_id].diff
            diff *= self._dt(1) / self._dt(self.param.iter_size)

    #: The solver type's GPU kernel adds the L2 decay itself (``fused_l2_decay``).
    fuses_l2_decay = False

    def local_decay(self, param_id: int):
        """weight_decay * decay_mult, in the parameters' precision."""
        return self._dt(self.param.weight_decay) * self._dt(self.net.params_weight_decay[param_id])

    def fused_l2_decay(self, param_id: int):
        """The L2 decay a fused GPU update kernel adds (g + decay * W) for this parameter: 0 when
        ``regularize`` did it (CPU, L1, a type without such a kernel)."""
        if self.fuses_l2_decay and self._xp is not np and self.param.regularization_type == "L2":
            return self.local_decay(param_id)
        return self._dt(0)

    def regularize(self, param_id: int) -> None:
        """diff += decay * W (L2) or decay * sign(W) (L1), decay = weight_decay * decay_mult."""
        decay = self.local_decay(param_id)
        if not decay or self.fused_l2_decay(param_id):
            return
        blob = self.learnable_params[param_id]
        tmp = self.scratch(param_id)
        if self.param.regularization_type == "L2":
            self._xp.multiply(blob.data, decay, out=tmp)
        else:
            self._xp.sign(blob.data, out=tmp)
            tmp *= decay
        diff = blob.diff
        diff += tmp

    def compute_update(self, param_id: int, rate: float) -> None:
        """Turn the regularized gradient in ``diff`` into the step W -= diff (per solver type)."""
        raise NotImplementedError

    # ---- helpers for compute_update ---------------------------------------------------------------
    @property
    def _xp(self):
        return self.device.xp

    @property
    def learnable_params(self) -> list[Blob]:
        """The parameters the update works on: the train net's, or with mixed precision their
        float32 master copies (``compute_update`` reads and writes these, never the net's)."""
        return self.net.learnable_params if self.mixed is None else self.mixed.params

    def sync_net_params(self) -> None:
        """After the update parameters were written from outside (a broadcast from rank 0):
        give the compute-dtype net the master weights. Nothing to do without mixed precision."""
        if self.mixed is not None:
            self.mixed.push(everything=True)

    def _copy_weights(self, net: Net, path: str) -> None:
        """copy_weights, into the float32 master copies when ``net`` is the mixed-precision train net."""
        if self.mixed is not None and net is self.net:
            with self.mixed.in_net():
                copy_weights(net, path)
            self.mixed.push(everything=True)
        else:
            copy_weights(net, path)

    def local_rate(self, param_id: int, rate: float):
        """rate * lr_mult, in the parameters' precision (as Caffe computes it in Dtype)."""
        return self._dt(rate) * self._dt(self.net.params_lr[param_id])

    def history_data(self, param_id: int, which: int = 0):
        """History set ``which`` of a parameter; Caffe's order: all of set 0, then all of set 1."""
        return self.history[which * len(self.learnable_params) + param_id].data

    def scratch(self, param_id: int, k: int = 0):
        """A reusable work array shaped like the parameter (Caffe's update_ / temp_ blobs)."""
        key = (param_id, k)
        array = self._scratch.get(key)
        data = self.learnable_params[param_id].data
        if array is None or array.shape != data.shape:
            array = self._scratch[key] = self._xp.empty_like(data)
        return array

    # ---- testing ------------------------------------------------------------------------------------
    def test_all(self) -> None:
        self._drain_losses()
        self.test_results = []
        for test_net_id in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            self.test(test_net_id)

    def test(self, test_net_id: int = 0) -> list[tuple[str, float, float]] | None:
        """Average every output of a test net over test_iter batches and log them."""
        log.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        net = self.test_nets[test_net_id]
        net.share_trained_layers_with(self.net)
        n_iter = self.param.test_iter[test_net_id]
        # On a GPU (defer_loss) the loss sum is a device array, made by the first batch.
        scores, loss = None, (None if self.defer_loss else self._dt(0))
        for _ in range(n_iter):
            snapshot_asked, stop_asked = self.take_requests()
            while snapshot_asked or stop_asked:
                if snapshot_asked:
                    self.snapshot()
                if stop_asked:
                    self.requested_early_exit = True
                snapshot_asked, stop_asked = self.take_requests()
            if self.requested_early_exit:
                break
            if self.defer_loss:  # GPU: sums stay on the device, read once after the last batch
                iter_loss = net.forward(host_loss=False)
                values = [b.data.ravel() for b in net.output_blobs]
            else:
                iter_loss = net.forward()
                values = [b.cpu_data().ravel() for b in net.output_blobs]
            if self.param.test_compute_loss:
                if self.defer_loss:
                    loss = iter_loss.astype(self.dtype) if loss is None else loss + iter_loss
                else:
                    loss += self._dt(iter_loss)
            if scores is None:
                scores = [v.astype(self.dtype, copy=True) for v in values]
            else:
                for s, v in zip(scores, values):
                    s += v
        if self.requested_early_exit:
            log.info("Test interrupted.")
            return None
        if self.defer_loss:
            scores = [to_numpy(s) for s in scores] if scores is not None else None
            loss = self._dt(0) if loss is None else self._dt(to_numpy(loss))
        if self.param.test_compute_loss:
            loss /= self._dt(n_iter)
            log.info("Test loss: %s", g(loss))
        results = self._log_outputs(net, scores or [], "Test", n_iter)
        self.test_results.append(results)
        self._call("on_test", test_net_id, results)
        return results

    # ---- requests and hooks -------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Stop after the current iteration (or test batch); snapshot_after_train still applies."""
        self._stop_requested = True

    def request_snapshot(self) -> None:
        """Snapshot after the current iteration (or test batch) and go on."""
        self._snapshot_requested = True

    def take_requests(self) -> tuple[bool, bool]:
        """(snapshot asked, stop asked) since the last call; a multi-process solver agrees on them."""
        snapshot_asked, stop_asked = self._snapshot_requested, self._stop_requested
        self._snapshot_requested = self._stop_requested = False
        return snapshot_asked, stop_asked

    def _call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, *args)

    # ---- snapshots ---------------------------------------------------------------------------------
    def snapshot_filename(self, extension: str) -> str:
        if self.prefix is None:
            raise self._error("cannot snapshot: snapshot_prefix is not set", hint="set snapshot_prefix")
        return f"{self.prefix}_iter_{self.iter}{extension}"

    def snapshot(self) -> tuple[str, str]:
        """Write ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate`` (or their .h5 forms).

        Refuses (TrainingError) when the weights are not finite, so the last snapshot on
        disk is always a good one; a second Ctrl-C waits until the whole set is written."""
        from ..diagnose import nonfinite_params  # noqa: PLC0415

        self._drain_losses()  # a NaN loss not yet read stops here, before anything is written
        if nonfinite_params(self.net) is not None:
            raise self.diverged("the weights are not finite", when="before the snapshot of")
        with critical():
            paths = self._write_snapshot()
        if self.param.snapshot_keep > 0 and self.prefix:
            from .snapshots import prune_snapshots  # noqa: PLC0415

            prune_snapshots(self.prefix, self.param.snapshot_keep, self.iter)
        self._call("on_snapshot", *paths)
        return paths

    def _write_snapshot(self) -> tuple[str, str]:
        h5 = self.param.snapshot_format == HDF5
        kind = "HDF5 file" if h5 else "binary proto file"
        model_path = self.snapshot_filename(".caffemodel.h5" if h5 else ".caffemodel")
        log.info("Snapshotting to %s %s", kind, model_path)
        if self.mixed is None:
            save_weights(self.net, model_path, write_diff=self.param.snapshot_diff)
        else:  # the float32 master weights: full precision, a Caffe-compatible caffemodel
            self.mixed.pull(only_frozen=True)
            with self.mixed.in_net():
                save_weights(self.net, model_path, write_diff=self.param.snapshot_diff)
        state_path = self.snapshot_filename(".solverstate.h5" if h5 else ".solverstate")
        log.info("Snapshotting solver state to %s %s", kind, state_path)
        write_extra(state_path, self.extra_state())  # first: a state file never lacks its sidecar
        write_solverstate(state_path, SolverStateData(
            iter=self.iter, learned_net=model_path, current_step=self.current_step,
            history=[h.cpu_data() for h in self.history]))
        self._last_snapshot_iter = self.iter
        self.last_snapshot = (model_path, state_path)
        return model_path, state_path

    def out_of_memory(self, exc: BaseException, when: str) -> TrainingError:
        """The TrainingError for an out-of-GPU-memory exception (see caffelite/oom.py)."""
        from ..oom import batch_size_of, out_of_memory_error  # noqa: PLC0415

        net = getattr(self, "net", None)
        if net is not None:
            name, source, batch = net.name, net.source or self.source, batch_size_of(net)
        else:  # the train net itself did not fit: read what it would have been from its file
            name, source, batch = "?", self.source, None
            try:
                p = self.param
                param = (p.train_net_param if p.HasField("train_net_param") else
                         p.net_param if p.HasField("net_param") else
                         self._read_net(p.train_net or p.net))
                name, batch = param.name, batch_size_of(param)
                source = p.train_net or p.net or self.source
            except Exception:  # the message must not fail
                pass
        return out_of_memory_error(exc, net_name=name, source=source, batch_size=batch,
                                   iter_size=self.param.iter_size, when=when, device=self.device)

    def diverged(self, what: str, when: str = "at") -> TrainingError:
        """The TrainingError for a NaN/Inf, after a diagnostic pass over the current batch."""
        from ..diagnose import diagnose  # noqa: PLC0415

        try:
            found = diagnose(self.net)
            detail = found.detail
        except Exception as exc:  # the diagnosis must not hide the divergence itself
            found, detail = None, f"the diagnostic pass failed ({type(exc).__name__}: {exc})"
        if self.last_snapshot is not None:
            resume = (f"the last good snapshot is {self.last_snapshot[1]}: resume with --snapshot "
                      f"{self.last_snapshot[1]} (or --snapshot auto)")
        else:
            resume = "no snapshot was written yet"
        hint = (f"training stopped and the diverged weights were not saved; {resume}; lower base_lr "
                f"(now {g(self.param.base_lr)}) or set clip_gradients (e.g. 10)")
        file, line = self.source, None
        layer = found.layer if found is not None else None
        if layer and self.net.source:
            from ..config import layer_line  # noqa: PLC0415

            file, line = self.net.source, layer_line(self.net.source, layer)
        error = TrainingError(f"iteration {self.iter}: {what}; {detail}" if when == "at" else
                              f"{when} iteration {self.iter}: {what}; {detail}",
                              file=file, line=line, hint=hint)
        error.layer = layer  # named in the message already; kept for callers
        error.diagnosis = found
        return error

    def extra_state(self) -> dict:
        """What an exact resume needs beyond Caffe's SolverState (JSON-safe)."""
        extra = {
            "iter": self.iter,
            "type": self.type,
            "seed": self.seed,
            "train_net": self.net.state_dict(),
            "test_nets": [net.state_dict() for net in self.test_nets],
            "loss_window": {"losses": [float(x) for x in self._losses],
                            "smoothed": float(self.smoothed_loss), "start_iter": self._loss_start},
        }
        if self.mixed is not None:
            extra["mixed_precision"] = self.mixed.state_dict()
        return extra

    def restore(self, state_file: str) -> None:
        """Resume from a .solverstate / .solverstate.h5: weights, history, iter, current_step
        (and caffelite's sidecar state when present)."""
        state_file = os.fspath(state_file)
        state = read_solverstate(state_file)
        weights = None
        if state.learned_net:
            weights = _find_learned_net(state.learned_net, state_file)
            try:
                self._copy_weights(self.net, weights)
            except CaffeliteError as exc:
                raise locate_error(exc, self.net.source or self.source, weights) from None
        if len(state.history) != len(self.history):
            raise ConfigError(f"the solver state holds {len(state.history)} history blobs; this "
                              f"{self.type} solver needs {len(self.history)} for this net",
                              file=state_file,
                              hint="resume with the solver type and net that wrote the snapshot")
        log.info("SGDSolver: restoring history")  # Caffe's wording for every type
        for i, (blob, array) in enumerate(zip(self.history, state.history)):
            if array.size != blob.count:
                raise ConfigError(f"history blob {i} has shape {tuple(array.shape)}, the net's "
                                  f"parameter has {blob.shape}", file=state_file,
                                  hint="resume with the net that wrote the snapshot")
            blob.set_data(array.reshape(blob.shape))
        self.iter = state.iter
        self.current_step = state.current_step
        self.last_snapshot = (weights, state_file)
        extra = read_extra(state_file)
        if extra is None:
            return
        if extra.get("iter") != state.iter:
            log.warning("ignoring %s: it belongs to iteration %s, the solver state to %d",
                        state_file + ".json", extra.get("iter"), state.iter)
            return
        self.net.load_state_dict(extra.get("train_net", {}))
        for net, net_state in zip(self.test_nets, extra.get("test_nets", [])):
            net.load_state_dict(net_state)
        if self.mixed is not None and "mixed_precision" in extra:
            self.mixed.load_state_dict(extra["mixed_precision"])
        window = extra.get("loss_window")
        if window:
            self._losses = [self._dt(x) for x in window["losses"]]
            self.smoothed_loss = self._dt(window["smoothed"])
            self._loss_start = int(window["start_iter"])
            self._keep_loss_window = True

    def close(self) -> None:
        for net in [self.net, *self.test_nets]:
            net.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(net='{self.net.name}', iter={self.iter})"


def locate_error(exc: CaffeliteError, source: str | None, weights: str | None = None) -> CaffeliteError:
    """Give an error without a file the file it belongs to: the net file and the line of the
    layer it names (errors raised while running or copying weights), else ``source``; name
    the weights file it came from."""
    if exc.file:
        return exc
    if weights:
        exc.message = f"{exc.message} (weights file '{weights}')"
    if exc.layer and source:
        from ..config import layer_line  # noqa: PLC0415

        exc.file, exc.line = source, exc.line or layer_line(source, exc.layer)
    else:
        exc.file = weights or source
    exc.args = (exc.format(),)
    return exc


def _find_learned_net(learned: str, state_file: str) -> str:
    """The weights a solver state names: as written, else beside the solver state."""
    folder = os.path.dirname(state_file)
    candidates = [learned]
    if not os.path.isabs(learned):
        candidates.append(os.path.join(folder, learned))
    candidates.append(os.path.join(folder, os.path.basename(learned)))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise DataError(f"the weights snapshot '{learned}' named by the solver state was not found",
                    file=state_file, hint="keep the .caffemodel next to its .solverstate")


__all__ = ["Solver", "create_solver", "locate_error", "resolve_snapshot_prefix", "default_device"]
