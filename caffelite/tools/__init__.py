"""Extra ``caffelite`` subcommands, one module each.

A tool module defines ``COMMAND`` (its name), ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; the command line finds it
here by itself. Keep heavy imports inside ``run`` so ``caffelite --help`` stays fast.
"""
import importlib
import pkgutil


def tool_modules():
    """Every tool module in this package, in name order."""
    return [importlib.import_module(f"{__name__}.{m.name}") for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)]
