"""caffelite: a Caffe-compatible deep learning framework in Python.

The pycaffe-style API is loaded on first use, so ``import caffelite`` stays cheap::

    import caffelite
    net = caffelite.Net("deploy.prototxt", "weights.caffemodel", caffelite.TEST)
    solver = caffelite.get_solver("solver.prototxt")
    n = caffelite.NetSpec()                      # with caffelite.L / caffelite.P
"""
TRAIN, TEST = 0, 1  # caffe.Phase

# name -> (module, attribute)
_LAZY = {
    "Net": ("api", "Net"),
    "Blob": ("api", "Blob"),
    "Solver": ("api", "Solver"),
    "get_solver": ("api", "get_solver"),
    "set_mode_cpu": ("api", "set_mode_cpu"),
    "set_mode_gpu": ("api", "set_mode_gpu"),
    "set_device": ("api", "set_device"),
    "NetSpec": ("net_spec", "NetSpec"),
    "L": ("net_spec", "layers"),
    "P": ("net_spec", "params"),
    "params": ("net_spec", "params"),
    "to_proto": ("net_spec", "to_proto"),
    "export_onnx": ("onnx_export", "export_onnx"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib  # noqa: PLC0415

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'caffelite' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["TRAIN", "TEST", *_LAZY]
