"""caffelite's own exceptions and the exit codes the command line maps them to.

A user mistake is never an ``assert`` or a bare traceback: it is one of these,
with a message that names the file, the line, the layer and what to do.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class CaffeliteError(Exception):
    """Base of every error caffelite raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 layer: str | None = None, hint: str | None = None):
        self.message = message
        self.file = file
        self.line = line
        self.layer = layer
        self.hint = hint
        super().__init__(self.format())

    def format(self) -> str:
        where = ""
        if self.file:
            where = str(self.file)
            if self.line:
                where += f":{self.line}"
            where += ": "
        layer = f"layer '{self.layer}': " if self.layer else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}{layer}{self.message}{hint}"


class ConfigError(CaffeliteError):
    """A net, solver or command-line setting is wrong."""

    exit_code = 2


class DataError(CaffeliteError):
    """A data file, database record or weights file is missing or malformed."""

    exit_code = 3


class TrainingError(CaffeliteError):
    """Training itself went wrong (divergence, out of memory)."""

    exit_code = 4


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """Return "did you mean 'x'?" for the closest of ``choices``, or None."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
