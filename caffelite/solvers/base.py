"""Solver: Caffe's training loop; ``create_solver`` builds one by its type.

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

``Solver`` keeps the loop (``solve``, ``step``), the requests and the hooks;
its bases hold the rest, one module each: setup.py (checks, building the nets,
the snapshot prefix), losses.py (the smoothed loss, the display line, losses
kept on a GPU), update.py (``apply_update`` and the helpers of
``compute_update``), testing.py (the test nets), checkpoint.py (snapshots and
resume) and failures.py (out of memory, divergence).

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

import contextlib
import logging
import math
import os
import time

import numpy as np
from google.protobuf import text_format

from .. import backend
from ..backend import DEFERRED, Device, compute_dtype, seed_from_clock, set_tf32
from ..blob import Blob
from ..errors import CaffeliteError, ConfigError
from ..log import g
from ..proto import pb
from ..registry import SOLVERS
from ..upgrade import upgrade_solver
from .checkpoint import HDF5, Checkpointing
from .failures import FailureReports, locate_error
from .losses import LOSS_DRAIN, LossTracking
from .lr_policy import get_lr_policy
from .setup import SolverSetup, default_device, resolve_snapshot_prefix
from .testing import SolverTesting
from .update import ParameterUpdate

log = logging.getLogger(__name__)


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



class Solver(SolverSetup, LossTracking, ParameterUpdate, SolverTesting, Checkpointing, FailureReports):
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
        self._stream = None
        self._graph = None
        self._graph_checked = False
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
            with self._device_stream():
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
            graph = self._step_graph()
            if graph is None:
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
            replayed = False
            if graph is not None:
                replayed = graph.run()
                if not replayed:
                    self.net.clear_param_diffs()
            if self.defer_loss:
                if not replayed:
                    self._forward_backward_on_device(start=graph.prefix if graph is not None else 0)
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
            # With mixed precision the host checks for overflow, unless the device update does
            # (flat_update.py: then nothing here waits for the GPU).
            if not replayed and (self.mixed is None or self._flat_update()
                                 or self.mixed.after_backward(self.iter)):
                self.apply_update()
            self.iter += 1
            self._call("on_iteration_end")
            snapshot_asked, stop_asked = self.take_requests()
            if ((p.snapshot and self.iter % p.snapshot == 0) or snapshot_asked) and self.rank == 0:
                self.snapshot()
            if stop_asked:
                self.requested_early_exit = True
                break

    def _device_stream(self):
        """On a GPU the solver works on a blocking stream of its own (a CUDA graph is recorded
        on it; see cuda_graph.py); on the CPU, nothing."""
        if not self.device.is_gpu:
            return contextlib.nullcontext()
        if self._stream is None:
            with self._xp.cuda.Device(self.device.id):
                self._stream = self._xp.cuda.Stream(non_blocking=False)
        return self._stream

    def _step_graph(self):
        """The CUDA graph of a training iteration, once the first update has shown that it
        applies (cuda_graph.py); None otherwise."""
        if self._graph is None and self._flat_checked and not self._graph_checked:
            from .cuda_graph import StepGraph  # noqa: PLC0415

            self._graph_checked = True
            if StepGraph.applies(self):
                self._graph = StepGraph(self, self._device_stream())
        return self._graph if self._graph is not None and not self._graph.failed else None

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

    @property
    def _xp(self):
        """The array module of the device (NumPy or CuPy); ``compute_update`` computes with it."""
        return self.device.xp

    def close(self) -> None:
        for net in [self.net, *self.test_nets]:
            net.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(net='{self.net.name}', iter={self.iter})"


__all__ = ["Solver", "create_solver", "locate_error", "resolve_snapshot_prefix", "default_device",
           "HDF5", "LOSS_DRAIN"]
