"""Mixed precision: the nets compute in float16 (or bfloat16 on a GPU), the solver keeps
float32 master weights and history, and a loss scale keeps small gradients representable.

SolverParameter (caffelite fields)::

    compute_dtype: float16        # float32 (default: no mixed precision) | float16 | bfloat16 (GPU)
    loss_scale: 65536             # initial scale S (clamped so weight * S fits the compute dtype)
    dynamic_loss_scale: true      # halve S on overflow, double it after loss_scale_window clean steps
    loss_scale_window: 2000

One iteration with mixed precision::

    net.loss_scale = S                       loss-layer top diffs start at loss_weight * S
    forward/backward x iter_size             compute dtype, scaled gradients
    master.diff = net.diff / S               float32, then one check: are all of them finite?
      not finite: skip the update, log "Iteration N: gradient overflow, skipping the update;
                  loss scale -> S/2", S = S/2 (dynamic) and start counting clean steps again
      finite:     the usual update (clip, normalize, regularize, compute_update) on the master
                  weights, master.data -= master.diff, then net params = master (cast)
                  after loss_scale_window clean iterations in a row, S = 2S (up to the cap)

Parameters with lr_mult 0 (BatchNorm statistics, frozen layers) are never moved by an update,
and BatchNorm changes its statistics itself in forward: their copy in the compute-dtype net is
the real one, and the master copy is refreshed from it before a snapshot.

On a GPU with SGD or Nesterov (solvers/flat_update.py) the same iteration runs on the device: S
and the scaler's counters live in a device array, the loss tops' diffs start from it, and the
check, the update and the scale's change are kernels (kernels/mixed.py), so nothing waits for
the GPU and a float16 or bfloat16 iteration is recorded as a CUDA graph like a float32 one.
Overflows are then logged when the solver reads the losses (at display time, before tests and
snapshots, and every LOSS_DRAIN iterations), with the iterations they happened at.

Snapshots write the float32 master weights (the caffemodel stays Caffe-compatible and keeps full
precision), the float32 history, and the scaler state in caffelite's sidecar, so a resumed run
continues exactly like an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np

from ..backend import to_numpy
from ..blob import Blob
from ..errors import TrainingError
from ..kernels import mixed as kernels
from ..log import g

log = logging.getLogger(__name__)


def overflow_at_scale_one(iteration: int, scale: float) -> TrainingError:
    """The gradients overflowed at loss scale ``scale`` (1), where halving cannot help."""
    return TrainingError(f"iteration {iteration}: the gradients overflow even with loss scale {g(scale)}",
                         hint="the training diverged: lower base_lr, set clip_gradients, "
                              "or train in float32 (compute_dtype: float32)")


class LossScaler:
    """The loss scale S and its dynamic rule (see the module doc)."""

    def __init__(self, scale: float, dynamic: bool = True, window: int = 2000, max_scale: float = 2.0 ** 24):
        self.max_scale = float(max_scale)
        self.scale = min(float(scale), self.max_scale)
        self.dynamic = dynamic
        self.window = max(int(window), 1)
        self.clean = 0  # finite iterations in a row since the last change

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        if overflow:
            self.scale /= 2
            self.clean = 0
            return
        self.clean += 1
        if self.clean >= self.window:
            self.clean = 0
            if self.scale * 2 <= self.max_scale:
                self.scale *= 2

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean": self.clean}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean = int(state["clean"])


class MasterWeights:
    """float32 copies of a compute-dtype net's learnable parameters, and the loss scaling."""

    def __init__(self, net, param, master_dtype=np.float32):
        self.net = net
        self.dtype = np.dtype(master_dtype)
        self.compute_dtype = net.ctx.dtype
        self.xp = net.ctx.xp
        params = net.learnable_params
        self.params = [Blob(p.shape, self.dtype, p.device, name=f"{p.name}_master") for p in params]
        self.frozen = [lr == 0 for lr in net.params_lr]
        self.pull()
        self.scaler = LossScaler(param.loss_scale, param.dynamic_loss_scale, param.loss_scale_window,
                                 max_scale=self._max_scale())
        if self.scaler.scale < param.loss_scale:
            log.info("loss_scale %s does not fit %s for the loss weights of net '%s': starting at %s",
                     g(param.loss_scale), self.compute_dtype.name, net.name, g(self.scaler.scale))
        self._flags = None
        self._unscale_kernel = None
        self.device_state = None  # the scaler on the device (to_device), else None
        self._reported = 0  # overflows the device state had counted at the last report
        log.info("Mixed precision: net '%s' computes in %s; %d float32 master parameter blobs; "
                 "loss scale %s (%s)", net.name, self.compute_dtype.name, len(self.params),
                 g(self.scaler.scale), "dynamic" if self.scaler.dynamic else "static")
        if not net.ctx.device.is_gpu:
            log.warning("compute_dtype %s on the CPU is slow (NumPy has no %s matrix multiply): it is "
                        "meant for tests; mixed precision pays on a GPU (--gpu 0)",
                        self.compute_dtype.name, self.compute_dtype.name)

    def _max_scale(self) -> float:
        """The largest power of two S with |loss_weight| * S finite in the compute dtype (a loss
        top's diff starts at weight * S), at most 2^24."""
        try:
            top = float(np.finfo(self.compute_dtype).max)
        except (TypeError, ValueError):  # bfloat16 from ml_dtypes: float32's range
            top = float(np.finfo(np.float32).max)
        weight = max([abs(w) for _, _, w in self.net._loss_tops] or [1.0]) or 1.0
        scale = 2.0 ** 24
        while scale > 1 and scale * weight > top:
            scale /= 2
        return scale

    # ---- copies between the master and the net -------------------------------------------------
    def pull(self, only_frozen: bool = False) -> None:
        """master <- net (upcast; exact)."""
        for master, p, frozen in zip(self.params, self.net.learnable_params, self.frozen):
            if frozen or not only_frozen:
                master.data[...] = p.data

    def push(self, everything: bool = False) -> None:
        """net <- master (rounded to the compute dtype), for the parameters an update moves."""
        for master, p, frozen in zip(self.params, self.net.learnable_params, self.frozen):
            if everything or not frozen:
                p.data[...] = master.data

    @contextlib.contextmanager
    def in_net(self):
        """Put the master blobs in the net's layers for the block (to read or write weights
        files at full precision), then put the compute-dtype blobs back."""
        net = self.net
        where = net._param_state._where  # (layer name, param index) of every parameter blob
        saved = []
        for (layer_name, j), lid in zip(where, net.learnable_param_ids):
            layer = net.layer_by_name[layer_name]
            saved.append((layer, j, layer.blobs[j]))
            layer.blobs[j] = self.params[lid]
        try:
            yield
        finally:
            for layer, j, blob in saved:
                layer.blobs[j] = blob

    # ---- one iteration ---------------------------------------------------------------------------
    def before_forward(self) -> None:
        if self.device_state is None:  # on the device the net reads S from device_state
            self.net.loss_scale = self.scaler.scale

    def unscale(self) -> bool:
        """master.diff = net.diff / S; True when every gradient is finite (one device sync)."""
        xp = self.xp
        inv = self.dtype.type(1.0 / self.scaler.scale)
        n = len(self.params)
        if self._flags is None or self._flags.shape[0] != n:
            self._flags = xp.empty(max(n, 1), dtype=bool)
            self._flags[...] = True
        flags = self._flags
        for i, (master, p) in enumerate(zip(self.params, self.net.learnable_params)):
            grad = master.diff
            if xp is np:
                grad[...] = p.diff
                grad *= inv
            else:
                self._gpu_unscale(p.diff, inv, grad)
            flags[i] = xp.isfinite(grad).all()
        return bool(flags.all())

    def _gpu_unscale(self, scaled, inv, out) -> None:
        """One fused kernel: out (master dtype U) = (U) scaled (compute dtype T) * inv."""
        if self._unscale_kernel is None:
            self._unscale_kernel = self.xp.ElementwiseKernel(
                "T g, U inv", "U out", "out = (U)g * inv", "caffelite_unscale")
        self._unscale_kernel(scaled, inv, out)

    def after_backward(self, iteration: int) -> bool:
        """Unscale and check; on overflow log, adapt the scale and return False (skip the step)."""
        finite = self.unscale()
        if not finite:
            before = self.scaler.scale
            self.scaler.update(overflow=True)
            if self.scaler.scale < 1:
                raise overflow_at_scale_one(iteration, before)
            log.info("Iteration %d: gradient overflow, skipping the update; loss scale -> %s",
                     iteration, g(self.scaler.scale))
            return False
        before = self.scaler.scale
        self.scaler.update(overflow=False)
        if self.scaler.scale != before:
            log.info("Iteration %d: %d iterations without overflow; loss scale -> %s", iteration,
                     self.scaler.window, g(self.scaler.scale))
        return True

    def update(self) -> None:
        """W -= diff on the master weights, then the net gets the new weights."""
        for master, frozen in zip(self.params, self.frozen):
            if not frozen:
                data = master.data
                data -= master.diff
        self.push()

    # ---- the scaler on the device (flat_update.py, kernels/mixed.py) ------------------------------
    def to_device(self) -> None:
        """Move the scaler's state to the device; from now on the device update checks, skips
        and rescales (``scaler_step``), and ``report`` logs what it did."""
        if self.device_state is not None:
            return
        xp = self.xp
        self.device_state = kernels.new_state(xp, self.scaler.scale, self.scaler.clean)
        self.overflow = xp.zeros(1, np.int32)
        self.iteration = xp.zeros(1, np.float64)
        self.net.loss_scale = self.device_state[kernels.SCALE:kernels.SCALE + 1]
        self._reported = 0

    def scaler_step(self) -> None:
        s = self.scaler
        kernels.scaler_step(self.overflow, self.device_state, self.iteration, dynamic=s.dynamic,
                            window=s.window, max_scale=s.max_scale)

    def _read_device_state(self):
        """The device state on the host (one small copy); the host scaler follows it."""
        state = to_numpy(self.device_state)
        self.scaler.scale, self.scaler.clean = float(state[kernels.SCALE]), int(state[kernels.CLEAN])
        return state

    def report(self) -> None:
        """Log the overflows and scale changes the device made since the last report; an
        overflow at loss scale 1 is a TrainingError, as on the host path."""
        if self.device_state is None:
            return
        before = self.scaler.scale
        state = self._read_device_state()
        new = int(state[kernels.OVERFLOWS]) - self._reported
        scale = self.scaler.scale
        if new:
            self._reported += new
            self.device_state[kernels.FIRST:kernels.FIRST + 1].fill(-1)
            first, last = int(state[kernels.FIRST]), int(state[kernels.LAST])
            if self.scaler.dynamic and scale < 1:
                raise overflow_at_scale_one(last, scale * 2)
            if new == 1:
                log.info("Iteration %d: gradient overflow, skipping the update; loss scale -> %s",
                         last, g(scale))
            else:
                log.info("Iterations %d to %d: %d gradient overflows, updates skipped; loss scale -> %s",
                         first, last, new, g(scale))
        elif scale > before:
            log.info("Loss scale -> %s (doubled after each %d iterations without overflow)",
                     g(scale), self.scaler.window)

    def state_dict(self) -> dict:
        if self.device_state is not None:
            self._read_device_state()
        return {"compute_dtype": self.compute_dtype.name, **self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state)
        if self.device_state is not None:
            values = [self.scaler.scale, self.scaler.clean]
            self.device_state[kernels.SCALE:kernels.CLEAN + 1] = self.xp.asarray(values, np.float64)


__all__ = ["LossScaler", "MasterWeights"]
