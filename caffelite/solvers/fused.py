"""Fused per-parameter solver updates on the GPU: one CuPy ElementwiseKernel each.

The NumPy bodies in sgd.py / adaptive.py take several passes over a parameter (Caffe's axpby
and friends); on a GPU each pass is a kernel launch and a trip through memory, so the update
is written once as an elementwise kernel instead. The arithmetic is the same (the CUDA compiler
may contract a multiply-add into an FMA, so the last bit can differ from the CPU's).
"""
from __future__ import annotations

_kernels: dict[str, object] = {}


def fused_kernel(xp, in_params: str, out_params: str, operation: str, name: str):
    """The compiled ``xp.ElementwiseKernel`` (cached by name; CuPy caches the binary per dtype)."""
    kernel = _kernels.get(name)
    if kernel is None:
        kernel = _kernels[name] = xp.ElementwiseKernel(in_params, out_params, operation, name)
    return kernel


__all__ = ["fused_kernel"]
