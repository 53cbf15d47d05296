"""One parameter update, in Caffe's order (``apply_update``)::

    rate = lr_policy(iter)
    clip_gradients (global L2 norm of all diffs)
    per param: normalize (1 / iter_size), regularize (L2 / L1 weight decay),
               compute_update (the only per-type method: writes the step into diff)
    net.update()  (W -= diff)

A solver type implements ``compute_update(param_id, rate)`` with the helpers
here (``local_rate``, ``history_data``, ``scratch``, ``learnable_params``).
With mixed precision the update works on the float32 master copies of the
parameters (see mixed_precision.py). ``ParameterUpdate`` is a base of
``Solver`` (base.py).
"""
from __future__ import annotations

import logging
import math

import numpy as np

from ..blob import Blob
from ..io.weights import copy_weights
from ..layers import cpu_kernels
from ..log import g
from ..net import Net

log = logging.getLogger(__name__)


class ParameterUpdate:
    """The update step of a ``Solver`` and the helpers its ``compute_update`` uses."""

    def current_lr(self) -> float:
        """The learning rate of the current iteration, without side effects (for metrics)."""
        return float(self._lr_policy(self.param, self.iter, self.current_step, self._dt)[0])

    def get_learning_rate(self) -> float:
        rate, step = self._lr_policy(self.param, self.iter, self.current_step, self._dt)
        if self.param.lr_policy == "multistep" and step != self.current_step:
            log.info("MultiStep Status: Iteration %d, step = %d", self.iter, step)
        self.current_step = step
        return rate

    def update_rate(self):
        """This iteration's learning rate, logged on display iterations as Caffe does."""
        rate = self.get_learning_rate()
        if self.param.display and self.iter % self.param.display == 0:
            log.info("Iteration %d, lr = %s", self.iter, g(self._dt(rate)))
        return rate

    def apply_update(self) -> None:
        rate = self.update_rate()
        if self._flat_update():
            self._flat.apply(rate)
            return
        self.clip_gradients()
        for param_id in range(len(self.learnable_params)):
            self.normalize(param_id)
            self.regularize(param_id)
            if self._xp is np and self.fused_step(param_id):
                self._compiled_step(param_id, rate)
            else:
                self.compute_update(param_id, rate)
        if self.mixed is None:
            self.net.update()
        else:
            self.mixed.update()

    #: The one-kernel GPU update (flat_update.py), built at the first update where it applies.
    _flat = None
    _flat_checked = False

    def _flat_update(self) -> bool:
        if not self._flat_checked:
            from .flat_update import FlatUpdate  # noqa: PLC0415

            self._flat_checked = True
            if FlatUpdate.applies(self):
                self._flat = FlatUpdate(self)
        return self._flat is not None

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
    #: The solver type's step in the compiled CPU kernels (cpu_kernels.momentum_update), which
    #: adds the L2 decay itself too; None: NumPy on the CPU.
    cpu_kernel: str | None = None

    def fused_step(self, param_id: int) -> bool:
        """Whether this parameter's step runs as one fused kernel: on a GPU, or on the CPU in the
        compiled kernels."""
        if self._xp is not np:
            return self.fuses_l2_decay
        return self.cpu_kernel is not None and cpu_kernels.handles(self.learnable_params[param_id].data)

    def local_decay(self, param_id: int):
        """weight_decay * decay_mult, in the parameters' precision."""
        return self._dt(self.param.weight_decay) * self._dt(self.net.params_weight_decay[param_id])

    def _compiled_step(self, param_id: int, rate: float) -> None:
        """What ``compute_update`` does, in one pass of the compiled kernels (``cpu_kernel``)."""
        blob = self.learnable_params[param_id]
        cpu_kernels.momentum_update(self.cpu_kernel, self._dt(self.param.momentum),
                                    self.local_rate(param_id, rate), self.fused_l2_decay(param_id),
                                    blob.data, self.history_data(param_id), blob.diff)

    def fused_l2_decay(self, param_id: int):
        """The L2 decay a fused update kernel adds (g + decay * W) for this parameter: 0 when
        ``regularize`` did it (L1, NumPy, a type without such a kernel)."""
        if self.param.regularization_type == "L2" and self.fused_step(param_id):
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


__all__ = ["ParameterUpdate"]
