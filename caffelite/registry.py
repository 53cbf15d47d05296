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

# ---- engines: alternative implementations of a layer type (Caffe's ``engine`` field) ---------
ENGINE_NAMES = {0: "DEFAULT", 1: "CAFFE", 2: "CUDNN"}  # the same numbers in every *Parameter.Engine
_ENGINES: dict[str, list] = {}


def register_engine(layer_type: str):
    """Register a class as another engine for ``layer_type``. The class decides with
    ``engine_chosen(ctx, requested) -> bool`` (``requested``: 'DEFAULT', 'CAFFE' or 'CUDNN')
    whether it runs a layer; when no engine says yes the registered layer class runs it."""
    def decorate(cls):
        variants = _ENGINES.setdefault(layer_type, [])
        if cls not in variants:
            variants.append(cls)
        return cls
    return decorate


def requested_engine(layer_param, cls) -> str:
    """The ``engine`` the layer's own *_param asks for ('DEFAULT' when it has none)."""
    name = getattr(cls, "param_name", None)
    if not name or not layer_param.HasField(name):
        return "DEFAULT"
    param = getattr(layer_param, name)
    return ENGINE_NAMES.get(getattr(param, "engine", 0), "DEFAULT")


def layer_class(layer_param, ctx):
    """The class that runs ``layer_param`` in ``ctx``: an engine that chooses to, else the type's."""
    cls = LAYERS.get(layer_param.type)
    variants = _ENGINES.get(layer_param.type)
    if variants:
        requested = requested_engine(layer_param, cls)
        for variant in variants:
            if variant.engine_chosen(ctx, requested):
                return variant
    return cls


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
