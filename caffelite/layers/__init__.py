"""Layer families. Every module in this package is imported on first use of the
registry, so adding a layer is one new file (or one function in a family file).
(``_cpu_kernels`` is the compiled C library of cpu_kernels.py, not a module.)"""
import importlib
import pkgutil

from .base import TRAIN, TEST, DataLayer, Layer, LayerContext, LossLayer, NeuronLayer

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def __getattr__(name: str):
    """pycaffe's idiom ``from caffelite import layers as L``: ``L.Convolution(...)`` builds a NetSpec layer."""
    if name[:1].isupper():
        from ..net_spec import layers as builder  # noqa: PLC0415

        return getattr(builder, name)
    raise AttributeError(name)


__all__ = ["TRAIN", "TEST", "Layer", "LayerContext", "NeuronLayer", "LossLayer", "DataLayer"]
