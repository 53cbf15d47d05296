"""Log lines in Caffe's (glog's) shape, so Caffe's ``parse_log.py`` reads caffelite logs.

Every line starts with glog's prefix::

    I0210 13:39:22.381027 25210 base.py:231] Iteration 100, lr = 0.00992565

(level letter, month and day, time with microseconds, process id, file and
line of the call). Messages keep Caffe's wording and numbers are printed as a
C++ stream prints them (``g``: 6 significant digits). Everything logs under
the ``caffelite`` logger; the command line calls ``setup_logging`` once.

On a terminal, training also shows a progress bar (``ProgressBar``, a solver
callback: iterations, iter/s, ETA, smoothed loss); log lines are then printed
above it, so the Caffe-style lines are never lost. In a pipe or a file there
is no bar and the log is exactly the Caffe-style lines.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import IO

LOGGER_NAME = "caffelite"
_LEVEL_LETTERS = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W",
                  logging.ERROR: "E", logging.CRITICAL: "F"}


def g(value) -> str:
    """A number as C++'s ``ostream << value`` prints it: ``%g`` with 6 significant digits."""
    return "%g" % float(value)


class GlogFormatter(logging.Formatter):
    """``I%m%d %H:%M:%S.%f <pid> <file>:<line>] message``."""

    def format(self, record: logging.LogRecord) -> str:
        letter = _LEVEL_LETTERS.get(record.levelno, "I" if record.levelno < logging.WARNING else "E")
        stamp = time.strftime("%m%d %H:%M:%S", time.localtime(record.created))
        usec = int((record.created % 1) * 1e6)
        prefix = f"{letter}{stamp}.{usec:06d} {record.process} {record.filename}:{record.lineno}] "
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return prefix + message


class _LogHandler(logging.StreamHandler):
    """A stream handler that prints above the active progress bar, if there is one."""

    def emit(self, record: logging.LogRecord) -> None:
        bar, stream = _active_bar
        if bar is None or stream is not self.stream:
            super().emit(record)
            return
        try:
            bar.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


_active_bar: tuple = (None, None)  # (the tqdm bar on screen, the stream it draws on)


class ProgressBar:
    """Solver callback: a tqdm bar (iterations, iter/s, ETA, smoothed loss) on ``stream``."""

    def __init__(self, stream: IO | None = None, refresh_s: float = 0.5):
        self.stream = stream if stream is not None else sys.stderr
        self.refresh_s = refresh_s
        self.bar = None
        self._next_postfix = 0.0

    def on_solve_start(self, solver) -> None:
        global _active_bar
        from tqdm import tqdm  # noqa: PLC0415

        self.bar = tqdm(total=solver.param.max_iter, initial=solver.iter, file=self.stream, unit="iter",
                        desc="train", dynamic_ncols=True, leave=False, mininterval=0.2)
        _active_bar = (self.bar, self.stream)

    def on_iteration_end(self, solver) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.monotonic()
        if now >= self._next_postfix:
            self._next_postfix = now + self.refresh_s
            self.bar.set_postfix_str(f"loss={g(solver.smoothed_loss)}", refresh=False)

    def on_solve_end(self, solver) -> None:
        global _active_bar
        if self.bar is not None:
            self.bar.close()
            if _active_bar[0] is self.bar:
                _active_bar = (None, None)
            self.bar = None


def is_terminal(stream: IO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def get_logger(name: str | None = None) -> logging.Logger:
    """The ``caffelite`` logger, or a child of it (``caffelite.<name>``)."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def setup_logging(stream: IO | None = None, level: int = logging.INFO) -> logging.Logger:
    """Send caffelite's log to ``stream`` (stderr, as glog does) in glog's format.

    Calling it again replaces the handler it installed before. The logger stops
    propagating to the root logger, so lines are not printed twice.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if getattr(handler, "_caffelite", False):
            logger.removeHandler(handler)
    handler = _LogHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(GlogFormatter())
    handler._caffelite = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


__all__ = ["g", "GlogFormatter", "get_logger", "setup_logging", "ProgressBar", "is_terminal",
           "LOGGER_NAME"]
