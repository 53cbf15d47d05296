"""Log lines in Caffe's (glog's) shape, so Caffe's ``parse_log.py`` reads caffelite logs.

Every line starts with glog's prefix::

    I0210 13:39:22.381027 25210 base.py:231] Iteration 100, lr = 0.00992565

(level letter, month and day, time with microseconds, process id, file and
line of the call). Messages keep Caffe's wording and numbers are printed as a
C++ stream prints them (``g``: 6 significant digits). Everything logs under
the ``caffelite`` logger; the command line calls ``setup_logging`` once.
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
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(GlogFormatter())
    handler._caffelite = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


__all__ = ["g", "GlogFormatter", "get_logger", "setup_logging", "LOGGER_NAME"]
