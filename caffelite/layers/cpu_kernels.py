"""Compiled CPU kernels (the C files beside this one, one library), called through ctypes.

Most CPU layers are whole-array NumPy passes and BLAS. A few loops do not fit
that mould: MAX pooling backward sends every output's gradient to one pixel of
its window (NumPy needs passes over all planes per kernel offset, or
``np.add.at``); im2col / col2im copy short rows between images and columns
(conv_columns.py); a solver step is six or more NumPy passes over each parameter,
and the DFT engine's complex products four passes over their real parts
(cpu_kernels.c). A stride-1 convolution straight on the padded image
(conv_direct.c: AVX-512 or AVX2) and MAX and AVE pooling (pool_avx512.c) are
vector kernels, used where the CPU has those instructions (cpu_vectors.c). Each
call takes a range of planes or items, so layers can run parts on all cores
(cpu_threads.py): ctypes lets go of the GIL for the call. The C side trusts its
arguments; the wrappers here check shapes, element types and contiguity first.

The library is optional: where no C compiler was at hand when the package was
built, ``LIB`` is None and the layers keep their NumPy passes (the same results).
``caffelite device_query`` says which. Setting ``CAFFELITE_CPU_KERNELS=0`` turns
the library off, to compare.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import math
import os
from pathlib import Path

import numpy as np

_NAME = "_cpu_kernels"
_I64P = ctypes.POINTER(ctypes.c_int64)


def _load():
    if os.environ.get("CAFFELITE_CPU_KERNELS", "1") == "0":
        return None
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / (_NAME + suffix)
        if path.exists():
            return ctypes.CDLL(str(path))
    return None


#: The compiled library, or None (the NumPy passes run instead).
LIB = _load()

_TYPES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64",
          np.dtype(np.uint8): "u8", np.dtype(np.int32): "i32"}


def describe() -> str:
    """One line for ``caffelite device_query``."""
    if LIB is not None:
        vectors = {512: "AVX-512", 256: "AVX2 + FMA"}.get(vector_bits(), "none (no AVX2 here)")
        return f"CPU kernels: compiled ({Path(LIB._name).name}), vectors: {vectors}"
    why = ("turned off (CAFFELITE_CPU_KERNELS=0)" if os.environ.get("CAFFELITE_CPU_KERNELS") == "0"
           else "not built (no C compiler when caffelite was installed)")
    return f"CPU kernels: {why}; NumPy passes run instead"


def vector_bits() -> int:
    """The vector width in bits the kernels use on this CPU (cpu_vectors.c): 512 (AVX-512),
    256 (AVX2 + FMA), or 0 (none, or no library)."""
    return int(LIB.vector_bits()) if LIB is not None else 0


def handles(*arrays) -> bool:
    """Whether the library is loaded and has kernels for these arrays' element types."""
    return LIB is not None and all(a.dtype in _TYPES for a in arrays)


def _ptr(array):
    return ctypes.c_void_p(array.ctypes.data) if array is not None else None


def _strides(array):
    """A (planes, Ho, Wo) view's strides in elements, as the kernels take them (the caller
    holds the array while the kernel runs)."""
    return np.array([s // array.itemsize for s in array.strides], np.int64)


def _i64(array):
    return array.ctypes.data_as(_I64P)


def geometry(in_spatial, out_spatial, kernel, stride, pad):
    """The kernels' geometry array: H, W, Ho, Wo, kernel h, w, stride h, w, pad h, w."""
    return np.array(tuple(in_spatial) + tuple(out_spatial) + tuple(kernel) + tuple(stride)
                    + tuple(pad), np.int64)


def max_backward(dy, index, dx, planes, geom) -> None:
    """dx (planes, H, W) = dy (planes, Ho, Wo) routed to the pixels that ``index`` (each
    output's kernel offset, row-major in its window) names; planes [p0, p1) only."""
    height, width, out_h, out_w = (int(v) for v in geom[:4])
    if not (dx.flags.c_contiguous and dx.shape[1:] == (height, width) and dy.dtype == dx.dtype
            and dy.shape == index.shape == (dx.shape[0], out_h, out_w)
            and 0 <= planes[0] <= planes[1] <= dx.shape[0]):
        raise ValueError(f"max_backward: dx {dx.shape} (contiguous), dy {dy.shape} {dy.dtype} and "
                         f"index {index.shape} do not fit {height}x{width} -> {out_h}x{out_w} "
                         f"for planes {tuple(planes)}")
    fn = getattr(LIB, f"max_backward_{_TYPES[dx.dtype]}_{_TYPES[index.dtype]}")
    dy_strides, index_strides = _strides(dy), _strides(index)
    if fn(_ptr(dy), _i64(dy_strides), _ptr(index), _i64(index_strides), _ptr(dx),
          ctypes.c_int64(planes[0]), ctypes.c_int64(planes[1]), _i64(geom)):
        raise MemoryError("max_backward: no memory for the kernel offsets' table")


def _check_pool(name, x, y, planes, geom, extra=True) -> None:
    """What C would not check for the AVX-512 pooling kernels: x (planes, H, W) and y (planes,
    Ho, Wo) contiguous float32 (x: the image side, y: the output side), the planes in range."""
    height, width, out_h, out_w = (int(v) for v in geom[:4])
    if not (vector_bits() == 512 and x.dtype == y.dtype == np.float32 and extra
            and x.flags.c_contiguous and y.flags.c_contiguous and len(x) == len(y)
            and x.shape[1:] == (height, width) and y.shape[1:] == (out_h, out_w)
            and 0 <= planes[0] <= planes[1] <= len(x)):
        raise ValueError(f"{name}: {x.shape} {x.dtype} and {y.shape} {y.dtype} do not fit "
                         f"{height}x{width} -> {out_h}x{out_w} for planes {tuple(planes)} "
                         f"(or no AVX-512)")


def _pool_args(planes, geom):
    return ctypes.c_int64(planes[0]), ctypes.c_int64(planes[1]), _i64(geom)


def max_forward(x, y, index, planes, geom) -> None:
    """MAX pooling of planes [p0, p1) of x (planes, H, W) into y (planes, Ho, Wo), with each
    output's argmax kernel offset into ``index`` (a (planes, Ho, Wo) view with contiguous rows,
    uint8 or int32); AVX-512 only (vector_bits() == 512)."""
    _check_pool("max_forward", x, y, planes, geom, index.shape == y.shape
                and index.dtype in (np.uint8, np.int32) and index.strides[2] == index.itemsize)
    fn = getattr(LIB, f"max_forward_f32_{_TYPES[index.dtype]}")
    fn(_ptr(x), _ptr(y), _ptr(index), _i64(_strides(index)), *_pool_args(planes, geom))


def ave_forward(x, y, divisor, planes, geom) -> None:
    """AVE pooling of planes [p0, p1) of x into y, ``divisor`` (Ho, Wo) the pool sizes."""
    _check_pool("ave_forward", x, y, planes, geom, _fits(divisor, y))
    LIB.ave_forward_f32(_ptr(x), _ptr(y), _ptr(divisor), *_pool_args(planes, geom))


def ave_backward(dy, dx, divisor, planes, geom) -> None:
    """dx (planes, H, W) = AVE pooling's gradient from dy (planes, Ho, Wo), planes [p0, p1);
    horizontal strides 1 and 2 and kernels up to 16 wide only."""
    _check_pool("ave_backward", dx, dy, planes, geom,
                _fits(divisor, dy) and geom[7] in (1, 2) and geom[5] <= 16)
    LIB.ave_backward_f32(_ptr(dy), _ptr(dx), _ptr(divisor), *_pool_args(planes, geom))


def _fits(divisor, y) -> bool:
    return (divisor.shape == y.shape[1:] and divisor.dtype == np.float32
            and divisor.flags.c_contiguous)


def conv_shape(channels, in_spatial, out_spatial, g):
    """The im2col / col2im kernels' shape array for a 2-D im2col.Geometry ``g``: C, H, W, Ho,
    Wo, kernel, stride, pad, dilation (h and w each)."""
    return np.array((channels,) + tuple(in_spatial) + tuple(out_spatial) + tuple(g.kernel)
                    + tuple(g.stride) + tuple(g.pad) + tuple(g.dilation), np.int64)


def _columns_call(name, images, col, items, col_strides, shape) -> None:
    """Checks what C would not (the kernels trust their arguments), then calls it."""
    channels, height, width, out_h, out_w, kh, kw = (int(v) for v in shape[:7])
    last = (items[1] - 1) * col_strides[0] + (channels * kh * kw - 1) * col_strides[1] + out_h * out_w
    if not (images.flags.c_contiguous and col.flags.c_contiguous and images.dtype == col.dtype
            and images.shape[1:] == (channels, height, width)
            and 0 <= items[0] <= items[1] <= images.shape[0] and last <= col.size):
        raise ValueError(f"{name}: images {images.shape} {images.dtype} and columns {col.shape} "
                         f"{col.dtype} do not fit {tuple(int(v) for v in shape)} for items {tuple(items)}")
    fn = getattr(LIB, f"{name}_{_TYPES[images.dtype]}")
    pointers = (_ptr(images), _ptr(col)) if name == "im2col" else (_ptr(col), _ptr(images))
    fn(*pointers, *(ctypes.c_int64(v) for v in tuple(items) + tuple(col_strides)), _i64(shape))


def im2col(x, col, items, col_strides, shape) -> None:
    """The columns of images [b0, b1) of x (n, C, H, W) into ``col``, where image b, row r,
    pixel p is element b * image stride + r * row stride + p (``col_strides``: those two, in
    elements); ``shape`` from ``conv_shape``."""
    _columns_call("im2col", x, col, items, col_strides, shape)


def col2im(col, dx, items, col_strides, shape) -> None:
    """The adjoint of ``im2col``: images [b0, b1) of dx (n, C, H, W) = the column entries
    summed back at their pixels (overwritten)."""
    _columns_call("col2im", dx, col, items, col_strides, shape)


#: The direct forward kernel's wide output rows per part: its register block's output channels
#: (FO in conv_direct.c: 4 for AVX-512, 3 for AVX2).
DIRECT_FORWARD_ROWS = 4


def _check_direct(name, x, y, taps, shape, scratch, rows, items, **sized) -> None:
    """What C would not check for the direct convolution kernels (conv_direct.c): x (n, C, H, W)
    and y (n, M, Ho, Wo) as ``shape`` has them, the items in range, the taps and scratch (the
    padded planes and ``rows`` wide rows) large enough, and each of ``sized`` (name: (array or
    None, its element count)) of that size; every array contiguous, float32 (taps int64)."""
    c, h, w, m, ho, wo = (int(v) for v in shape[:6])
    k, padded, wide = (int(shape[i]) for i in (8, 10, 11))
    arrays = [x, y, scratch] + [a for a, _ in sized.values() if a is not None]
    if not (x.shape[1:] == (c, h, w) and y.shape[1:] == (m, ho, wo) and len(x) == len(y)
            and 0 <= items[0] <= items[1] <= len(x) and vector_bits() > 0
            and taps.shape == (k,) and taps.dtype == np.int64 and taps.flags.c_contiguous
            and scratch.size >= padded + rows * wide
            and all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)
            and all(a is None or a.size == size for a, size in sized.values())):
        parts = ", ".join(f"{key} {None if a is None else a.shape}" for key, (a, _) in sized.items())
        raise ValueError(f"{name}: x {x.shape} {x.dtype}, y {y.shape} {y.dtype}, {parts} and "
                         f"scratch {scratch.size} do not fit ({c}, {h}, {w}) -> ({m}, {ho}, {wo}) "
                         f"with {k} taps for items {tuple(items)} (contiguous float32 arrays; "
                         f"AVX2 or AVX-512)")


def direct_forward(x, weight, bias, taps, shape, y, scratch, items) -> None:
    """y[n] = bias + the direct convolution of x[n] (conv_direct.c) for items [n0, n1):
    ``taps`` and ``shape`` from conv_direct.py's plan, weight (M, taps), bias (M) or None,
    scratch for the padded planes and DIRECT_FORWARD_ROWS wide rows."""
    m, k = int(shape[3]), int(shape[8])
    _check_direct("direct_forward", x, y, taps, shape, scratch, DIRECT_FORWARD_ROWS, items,
                  weight=(weight, m * k), bias=(bias, m))
    LIB.direct_forward_f32(_ptr(x), _ptr(weight), _ptr(bias), _i64(taps), _i64(shape), _ptr(y),
                           _ptr(scratch), ctypes.c_int64(items[0]), ctypes.c_int64(items[1]))


def direct_weight_grad(x, dy, taps, shape, dw, db, scratch, items) -> None:
    """dw (M, taps) += the weight gradient and db (M, or None) += the bias gradient of the
    direct convolution for items [n0, n1) (conv_direct.c); scratch for the padded planes and
    M wide rows."""
    m, k = int(shape[3]), int(shape[8])
    _check_direct("direct_weight_grad", x, dy, taps, shape, scratch, m, items,
                  dw=(dw, m * k), db=(db, m))
    LIB.direct_weight_grad_f32(_ptr(x), _ptr(dy), _i64(taps), _i64(shape), _ptr(dw), _ptr(db),
                               _ptr(scratch), ctypes.c_int64(items[0]), ctypes.c_int64(items[1]))


def complex_combine(z, out, column, conj: bool) -> None:
    """The DFT engine's complex products from their real parts (cpu_kernels.c): z (rows, 2,
    ..., 2 * cols) contiguous, into columns [column, column + cols) of out (rows, 2, ...,
    width), whose leading axes match z's."""
    cols = z.shape[-1] // 2
    if not (z.dtype == out.dtype and z.flags.c_contiguous and out.flags.c_contiguous
            and z.shape[:-1] == out.shape[:-1] and z.shape[1] == 2 and z.shape[-1] == 2 * cols
            and 0 <= column and column + cols <= out.shape[-1]):
        raise ValueError(f"complex_combine: z {z.shape} {z.dtype} does not fit columns "
                         f"{column}..{column + cols} of {out.shape} {out.dtype} (both contiguous)")
    entries = math.prod(z.shape[2:-1])
    getattr(LIB, f"complex_combine_{_TYPES[z.dtype]}")(
        _ptr(z), ctypes.c_void_p(out.ctypes.data + column * out.itemsize), ctypes.c_int64(len(z)),
        ctypes.c_int64(entries), ctypes.c_int64(cols), ctypes.c_int64(out.shape[-1]),
        ctypes.c_int(int(conj)))


def momentum_update(kind, momentum, rate, decay, w, history, diff) -> None:
    """``kind`` "sgd" or "nesterov": the solver step of cpu_kernels.c in one pass, into
    ``history`` and ``diff`` (w, history and diff: contiguous, one element type)."""
    if not (w.dtype == history.dtype == diff.dtype and w.size == history.size == diff.size
            and all(a.flags.c_contiguous for a in (w, history, diff))):
        raise ValueError(f"{kind} update: the parameter, its history and its gradient must be "
                         f"contiguous arrays of one size and element type")
    scalar = ctypes.c_float if w.dtype == np.float32 else ctypes.c_double
    getattr(LIB, f"{kind}_update_{_TYPES[w.dtype]}")(
        ctypes.c_int64(w.size), *(scalar(v) for v in (momentum, rate, decay)),
        _ptr(w), _ptr(history), _ptr(diff))
