"""The errors a solver reports: out of GPU memory, divergence (NaN/Inf), and an error placed in
the file it belongs to.

Divergence: the loss of every forward/backward pass is checked (one scalar;
with ``clip_gradients`` the global gradient norm too, which is computed anyway)
and the weights are checked before each snapshot. A NaN or Inf stops training
with a TrainingError naming the iteration and the layer found by
``caffelite.diagnose``. Running out of GPU memory, while building the nets or
training, is a TrainingError naming the net, its batch size and the
allocation that failed (caffelite/oom.py).

``FailureReports`` is a base of ``Solver`` (base.py).
"""
from __future__ import annotations

from ..errors import CaffeliteError, TrainingError
from ..log import g


class FailureReports:
    """The TrainingErrors of a ``Solver`` for running out of memory and for diverging."""

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


__all__ = ["FailureReports", "locate_error"]
