"""The training loss: smoothing over ``average_loss`` iterations, the display line, and on a GPU
the losses kept on the device.

On a GPU the losses (and layers' checks such as labels in range, see
``backend.DEFERRED``) stay on the device and are read in one copy at display
time, before a test or a snapshot, every ``LOSS_DRAIN`` iterations and when
``step`` returns, so the host never waits for the GPU inside an iteration. A
NaN or Inf loss is reported when it is read.

``LossTracking`` is a base of ``Solver`` (base.py).
"""
from __future__ import annotations

import logging
import math
import time

from ..backend import DEFERRED, to_numpy
from ..log import g

log = logging.getLogger(__name__)

#: On a GPU, the device losses are read at least every this many iterations (see step).
LOSS_DRAIN = 100


class LossTracking:
    """The smoothed loss of a ``Solver``, its display line and the pending device losses."""

    def _forward_backward_on_device(self, start: int = 0) -> None:
        """forward/backward x iter_size with the loss left on the device (no host round trip).

        The losses are read in one copy at display time, before a test or a snapshot, every
        ``LOSS_DRAIN`` iterations and when ``step`` returns; a NaN/Inf loss is reported then.
        """
        p = self.param
        loss = self.net.forward_backward(host_loss=False, start=start)
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
        if self.mixed is not None:
            self.mixed.report()  # overflows the device update skipped
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


__all__ = ["LOSS_DRAIN", "LossTracking"]
