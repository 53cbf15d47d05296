"""Python: a layer whose body is a user class (Caffe's ``python_param``).

``python_param { module: "mylayers" layer: "MyLayer" param_str: "..." }``
imports ``mylayers`` (from the current directory or PYTHONPATH) and builds
``MyLayer``. The class may subclass :class:`caffelite.layers.Layer` (it is
then constructed as any layer) or be a plain pycaffe-style class; either way it
gets ``param_str`` and ``phase`` before ``setup(bottom, top)`` and then
``reshape``, ``forward`` and ``backward(top, propagate_down, bottom)``.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys

from ..errors import ConfigError
from ..registry import register_layer
from .base import Layer


@register_layer("Python")
class PythonLayer(Layer):
    """Wraps a plain (pycaffe-style) user class; a Layer subclass is returned as itself."""

    param_name = "python_param"

    def __new__(cls, layer_param, ctx=None):
        user_cls = _load_class(layer_param)
        if inspect.isclass(user_cls) and issubclass(user_cls, Layer):
            impl = user_cls(layer_param, ctx)
            impl.param_str = layer_param.python_param.param_str
            return impl
        return super().__new__(cls)

    def __init__(self, layer_param, ctx=None):
        super().__init__(layer_param, ctx)
        self.impl = _construct(_load_class(layer_param), layer_param)
        self.impl.param_str = self.param.param_str
        self.impl.phase = self.phase
        self.impl.blobs = self.blobs

    def setup(self, bottom, top):
        self.impl.setup(bottom, top)
        self.blobs = self.impl.blobs

    def reshape(self, bottom, top):
        self.impl.reshape(bottom, top)

    def forward(self, bottom, top):
        self.impl.forward(bottom, top)

    def backward(self, top, propagate_down, bottom):
        self.impl.backward(top, propagate_down, bottom)


def _load_class(layer_param):
    param = layer_param.python_param
    where = dict(layer=layer_param.name)
    if not param.module or not param.layer:
        raise ConfigError("(Python) python_param needs 'module' and 'layer'", **where,
                          hint="for example python_param: {module: mylayers, layer: MyLayer}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(param.module)
    except ImportError as exc:
        raise ConfigError(f"(Python) cannot import module '{param.module}': {exc}", **where,
                          hint="put the module in the current directory or on PYTHONPATH") from None
    cls = getattr(module, param.layer, None)
    if cls is None:
        raise ConfigError(f"(Python) module '{param.module}' has no class '{param.layer}'", **where)
    return cls


def _construct(cls, layer_param):
    """pycaffe passes the LayerParameter to the constructor; accept classes without it too."""
    try:
        return cls(layer_param)
    except TypeError:
        return cls()
