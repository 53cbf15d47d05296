"""Hand-written CUDA kernels for the layers whose generic CuPy path is slow on a GPU.

A profile of ResNet-50 and AlexNet training (benchmarks/gpu_profile.py) put most of the step in
BatchNorm, Scale, Pooling and LRN: written with ``xp`` they take many passes and kernel
launches per layer. The modules here compute each of them in one or two passes, as Caffe's own
CUDA kernels do. Only GPU code imports them; CuPy compiles each kernel once per element type.

Element types: float64 (``double``), float32 (``float``), float16 (``__half``) and bfloat16
(``__nv_bfloat16``); sums and the arithmetic run in ``acc_t`` (double for float64, else float).
A kernel source names its element type ``T`` and its accumulator ``acc_t``, and loops over
elements with ``FOR_EACH(index type, i, count)`` (a grid-stride loop)::

    kernel = compiled(SOURCE, "my_kernel", x.dtype)
    kernel(grid, block, (x, y, np.int32(n)))
"""
from __future__ import annotations

import numpy as np

from ..backend import cupy_module

_HEADER = """
#include <cuda_fp16.h>
#include <cuda_bf16.h>
typedef {T} T;
typedef {acc} acc_t;
__device__ __forceinline__ acc_t ld(const T v) {{ return (acc_t)v; }}
__device__ __forceinline__ T st(const acc_t v) {{ return (T)v; }}
// Thread i, of index type I, of a grid-stride loop over count elements.
#define FOR_EACH(I, i, count) \
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (I)(count); \
         i += (I)blockDim.x * (I)gridDim.x)
"""

_C_TYPES = {"float64": ("double", "double"), "float32": ("float", "float"),
            "float16": ("__half", "float"), "bfloat16": ("__nv_bfloat16", "float")}
_modules: dict[tuple[str, str], object] = {}
_elementwise: dict[str, object] = {}

#: Threads per block of the kernels here.
BLOCK = 256
#: A NULL pointer argument (kernels take NULL for an optional array).
NULL = np.uint64(0)


def c_type(dtype) -> str:
    """The CUDA type of an element dtype (see the module doc)."""
    return _C_TYPES[np.dtype(dtype).name][0]


def acc_dtype(dtype) -> np.dtype:
    """The NumPy dtype of ``acc_t`` for elements of ``dtype``."""
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def compiled(source: str, name: str, dtype):
    """The kernel ``name`` of ``source`` compiled for element type ``dtype`` (cached)."""
    key = (source, np.dtype(dtype).name)
    module = _modules.get(key)
    if module is None:
        t, acc = _C_TYPES[np.dtype(dtype).name]
        module = _modules[key] = cupy_module().RawModule(code=_HEADER.format(T=t, acc=acc) + source,
                                                         options=("-std=c++17",))
    return module.get_function(name)


def fused_kernel(xp, in_params: str, out_params: str, operation: str, name: str):
    """A CuPy ``ElementwiseKernel`` (one pass, one launch), made once per name; CuPy compiles it
    once per element type. For the maps simple enough to write as one expression per element."""
    kernel = _elementwise.get(name)
    if kernel is None:
        kernel = _elementwise[name] = xp.ElementwiseKernel(in_params, out_params, operation, name)
    return kernel


def blocks(n: int, block: int = BLOCK, cap: int = 65535 * 8) -> int:
    """Blocks for ``n`` threads of ``block`` (kernels loop when the grid is capped)."""
    return max(1, min((int(n) + block - 1) // block, cap))


__all__ = ["BLOCK", "NULL", "acc_dtype", "blocks", "c_type", "compiled", "fused_kernel"]
