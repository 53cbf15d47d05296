"""Registries that map Caffe's type names to classes and functions.

Adding a layer, solver, filler or lr policy is one decorated definition in
one file; nothing central needs editing::

    @register_layer("Convolution")
    class ConvolutionLayer(Layer): ...
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from .errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> entry table for one kind of thing (layers, solvers, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ConfigError(f"{self.kind} type '{name}' is registered twice")
            self._entries[name] = entry
            return entry
        return decorate

    def get(self, name: str) -> T:
        _load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} type '{name}'",
                              hint=did_you_mean(name, self._entries)
                              or f"known types: {', '.join(sorted(self._entries))}") from None

    def __contains__(self, name: str) -> bool:
        _load_builtins()
        return name in self._entries

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._entries)


LAYERS: Registry = Registry("layer")
SOLVERS: Registry = Registry("solver")
FILLERS: Registry = Registry("filler")
LR_POLICIES: Registry = Registry("lr_policy")

register_layer = LAYERS.register
register_solver = SOLVERS.register
register_filler = FILLERS.register
register_lr_policy = LR_POLICIES.register

_BUILTINS = ("caffelite.layers", "caffelite.solvers", "caffelite.fillers")
_loaded = False


def _load_builtins() -> None:
    """Import the built-in families once, so their decorators run."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTINS:
            importlib.import_module(module)


def load_plugin(module: str) -> None:
    """Import a user module whose decorators register more types (``--plugin``)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"cannot import plugin module '{module}': {exc}",
                          hint="check the module name and that its folder is on PYTHONPATH") from None
