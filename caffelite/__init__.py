"""caffelite: a Caffe-compatible deep learning framework in Python.

The pycaffe-style API is loaded on first use, so ``import caffelite`` stays cheap::

    import caffelite
    net = caffelite.Net("deploy.prototxt", "weights.caffemodel", caffelite.TEST)
    solver = caffelite.get_solver("solver.prototxt")
    n = caffelite.NetSpec()                      # with caffelite.L / caffelite.P
"""
import os as _os

# OpenBLAS's idle threads spin for 2**28 cycles (about 0.1 s) after each call before
# they sleep, so between the GEMMs of a step they hold every core, and the threads
# that run NumPy passes in parts (layers/cpu_threads.py) find none free: on 2 cores,
# CIFAR-10 quick took 64.7 ms a step in one part and 63.8 in two. With 2**20 cycles,
# about as long as OpenMP's default spin, it was 65.1 against 53.2. OpenBLAS reads
# this when it loads, so it counts only if NumPy is imported after caffelite (the
# command line always is); a value in the environment wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

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
