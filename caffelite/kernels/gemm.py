"""Matrix products on a GPU through cuBLAS directly (ctypes), so that they can be recorded in a
CUDA graph.

CuPy refuses any cuBLAS call while a stream is being captured (its wrapper raises
NotImplementedError), which would keep every net with an InnerProduct out of the CUDA graph
path (solvers/cuda_graph.py). cuBLAS itself records fine when its handle has a workspace of its
own and the scalars are host values, so this module keeps one handle per device with a 32 MiB
workspace and calls ``cublasGemmEx`` itself.

``matmul(a, b, out)``: out = a @ b (+ out with ``accumulate``) for 2-D CuPy arrays, each
C-contiguous or the transpose of one (``x.T``); anything else goes to ``xp.matmul``. float32
uses TF32 tensor cores when TF32 is on (backend.set_tf32), float16 and bfloat16 accumulate in
float32, float64 in float64.
"""
from __future__ import annotations

import ctypes
import re

import numpy as np

from ..backend import cupy_module, tf32_enabled

# cudaDataType and cublasComputeType_t values (cuBLAS's library_types.h / cublas_api.h).
_DATA_TYPES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 14}
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70
_OP_N, _OP_T = 0, 1
_GEMM_DEFAULT = -1
WORKSPACE_BYTES = 32 * 2 ** 20

_lib = None
_handles: dict[int, tuple] = {}


def _library():
    global _lib
    if _lib is None:
        cp = cupy_module()
        cp.cuda.device.get_cublas_handle()  # CuPy loads libcublas; we reuse that very library
        major = cp.cuda.runtime.runtimeGetVersion() // 1000
        try:
            _lib = ctypes.CDLL(f"libcublas.so.{major}")
        except OSError:
            with open("/proc/self/maps") as maps:
                paths = re.findall(r"(/\S*libcublas\.so[.\d]*)$", maps.read(), re.MULTILINE)
            if not paths:
                raise
            _lib = ctypes.CDLL(paths[0])
        for name in ("cublasCreate_v2", "cublasSetStream_v2", "cublasSetWorkspace_v2", "cublasGemmEx"):
            getattr(_lib, name).restype = ctypes.c_int
    return _lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLAS {what} failed with status {status}")


def _handle(device_id: int):
    entry = _handles.get(device_id)
    if entry is None:
        cp, lib = cupy_module(), _library()
        with cp.cuda.Device(device_id):
            handle = ctypes.c_void_p()
            _check(lib.cublasCreate_v2(ctypes.byref(handle)), "create")
            workspace = cp.empty(WORKSPACE_BYTES, np.uint8)
            _check(lib.cublasSetWorkspace_v2(handle, ctypes.c_void_p(workspace.data.ptr),
                                             ctypes.c_size_t(WORKSPACE_BYTES)), "set workspace")
        entry = _handles[device_id] = (handle, workspace)
    return entry[0]


def _layout(x):
    """(op, ld) of a 2-D array seen column-major as its transpose (see matmul), or None."""
    rows, cols = x.shape
    item = x.itemsize
    if x.strides == (cols * item, item) or rows == 1 and x.strides[1] == item:
        return _OP_N, max(cols, 1)
    if x.strides == (item, rows * item) or cols == 1 and x.strides[0] == item:
        return _OP_T, max(rows, 1)
    return None


def matmul(a, b, out, accumulate: bool = False) -> None:
    """out = a @ b, or out += a @ b with ``accumulate`` (module doc)."""
    cp = cupy_module()
    dtype = np.dtype(out.dtype)
    la, lb = _layout(a), _layout(b)
    if (la is None or lb is None or not out.flags.c_contiguous or a.dtype != dtype or b.dtype != dtype
            or dtype.name not in _DATA_TYPES):
        if accumulate:
            out += cp.matmul(a, b)
        else:
            cp.matmul(a, b, out=out)
        return
    m, k = a.shape
    n = b.shape[1]
    if dtype == np.float64:
        compute, scalar = _COMPUTE_64F, ctypes.c_double
    else:
        compute = _COMPUTE_32F_FAST_TF32 if dtype == np.float32 and tf32_enabled() else _COMPUTE_32F
        scalar = ctypes.c_float
    alpha, beta = scalar(1.0), scalar(1.0 if accumulate else 0.0)
    lib = _library()
    handle = _handle(out.device.id)
    _check(lib.cublasSetStream_v2(handle, ctypes.c_void_p(cp.cuda.get_current_stream().ptr)), "set stream")
    kind = _DATA_TYPES[dtype.name]
    # Row-major C = A B is column-major C^T = B^T A^T: B first, then A (see _layout).
    (op_b, ld_b), (op_a, ld_a) = lb, la
    _check(lib.cublasGemmEx(handle, op_b, op_a, n, m, k, ctypes.byref(alpha),
                            ctypes.c_void_p(b.data.ptr), kind, ld_b, ctypes.c_void_p(a.data.ptr), kind, ld_a,
                            ctypes.byref(beta), ctypes.c_void_p(out.data.ptr), kind, max(n, 1),
                            compute, _GEMM_DEFAULT), "GemmEx")


__all__ = ["matmul"]
