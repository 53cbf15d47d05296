"""MAX and AVE pooling over 2-D windows in one pass each way, as Caffe's pooling_layer.cu.

The semantics are those of ``caffelite/layers/pooling.py`` (its module doc): window (oh, ow)
starts at (oh*s_h - p_h, ow*s_w - p_w) and covers k_h x k_w pixels; padding is never read.

- ``max_pool_forward``: one thread per output. The largest real pixel, the first one in
  row-major window order on ties; the int32 argmax h*W + w within the input plane goes to an
  index buffer for backward (when given) and, as a float, to the mask top (when given). A NaN
  makes the output NaN and freezes the index (as the CPU's running ``maximum``/``greater``);
  with ``nan_first`` (global pooling, where the CPU uses ``argmax``) the index is the first NaN.
  A window with no pixel above -inf gets the index of its first offset (hstart*W + wstart,
  possibly in the padding), again as the CPU.
- ``ave_pool_forward``: one thread per output; the sum of the real pixels divided by the window
  clipped to the padded image, (min(hs + k_h, H + p_h) - hs) * (same for w).
- ``max_pool_backward`` / ``ave_pool_backward``: one thread per BOTTOM element, gathering over the
  windows that contain it (no atomics, deterministic); they overwrite the bottom diff. The
  windows are visited in decreasing (oh, ow), the order in which the CPU's loop over kernel
  offsets adds them, so float32 results equal the CPU's.

Geometry everywhere is the tuple (H, W, Ho, Wo, k_h, k_w, s_h, s_w, p_h, p_w); every array is
C-contiguous (N, C, ., .) on the GPU.
"""
from __future__ import annotations

import numpy as np

from . import BLOCK, blocks, compiled

SOURCE = r"""
#define GEOMETRY const int H, const int W, const int Ho, const int Wo, const int kh, const int kw, \
                 const int sh, const int sw, const int ph, const int pw
#define GEOMETRY_ARGS H, W, Ho, Wo, kh, kw, sh, sw, ph, pw
// Each kernel twice: name32 indexes with int, name64 with long long (arrays past 2^31 elements).
#define INDEX_VARIANTS(name, impl, params, args) \
    extern "C" __global__ void name##32 params { impl<int> args; } \
    extern "C" __global__ void name##64 params { impl<long long> args; }

__device__ __forceinline__ int imin(const int a, const int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(const int a, const int b) { return a > b ? a : b; }

// Element i of (planes, rows, cols): its plane, row and column.
template <typename I> struct Cell { I plane; int row, col; };
template <typename I>
__device__ __forceinline__ Cell<I> cell(const I i, const int rows, const int cols) {
    return {i / ((I)cols * (I)rows), (int)((i / cols) % rows), (int)(i % cols)};
}

// Output (oh, ow)'s window: it starts at (hs, ws); its real pixels are rows [h0, h1) and
// columns [w0, w1) of the input plane.
struct Window { int hs, ws, h0, h1, w0, w1; };
__device__ __forceinline__ Window window(const int oh, const int ow, GEOMETRY) {
    const int hs = oh * sh - ph, ws = ow * sw - pw;
    return {hs, ws, imax(hs, 0), imin(hs + kh, H), imax(ws, 0), imin(ws + kw, W)};
}

// f(v, at) for the window's real pixels in row-major order: v the value, at = h * W + w.
template <typename F>
__device__ __forceinline__ void for_window(const T* src, const Window& win, const int W, F f) {
    for (int h = win.h0; h < win.h1; ++h)
        for (int w = win.w0; w < win.w1; ++w)
            f(ld(src[h * W + w]), h * W + w);
}

// The outputs whose windows contain input (h, w): rows [oh0, oh1) and columns [ow0, ow1)
// (padded coordinate h + p: windows start every s and cover k).
struct Span { int oh0, oh1, ow0, ow1; };
__device__ __forceinline__ int first_window(const int h, const int k, const int s, const int p) {
    return (h + p < k) ? 0 : (h + p - k) / s + 1;
}
__device__ __forceinline__ Span windows_over(const int h, const int w, GEOMETRY) {
    return {first_window(h, kh, sh, ph), imin((h + ph) / sh + 1, Ho),
            first_window(w, kw, sw, pw), imin((w + pw) / sw + 1, Wo)};
}

// f(oh, ow) for the span's outputs in decreasing (oh, ow): the order of the CPU's additions.
template <typename F>
__device__ __forceinline__ void for_span(const Span& span, F f) {
    for (int oh = span.oh1 - 1; oh >= span.oh0; --oh)
        for (int ow = span.ow1 - 1; ow >= span.ow0; --ow)
            f(oh, ow);
}

template <typename I>
__device__ __forceinline__ void max_forward(
        const T* __restrict__ x, T* __restrict__ y, int* argmax, T* mask, const long long count,
        GEOMETRY, const int write_index, const int write_mask, const int nan_first) {
    const acc_t neg_inf = (acc_t)(-__int_as_float(0x7f800000));
    FOR_EACH(I, i, count) {
        const Cell<I> o = cell(i, Ho, Wo);
        const Window win = window(o.row, o.col, GEOMETRY_ARGS);
        acc_t best = neg_inf;
        int idx = -1;
        for_window(x + o.plane * ((I)H * (I)W), win, W, [&](const acc_t v, const int at) {
            if (v > best) {
                best = v;
                idx = at;
            } else if (v != v && best == best) {   // the first NaN: the output is NaN
                best = v;
                if (nan_first) idx = at;
            }
        });
        if (idx < 0) idx = win.hs * W + win.ws;      // nothing above -inf: the first offset
        y[i] = st(best);
        if (write_index) argmax[i] = idx;
        if (write_mask) mask[i] = st((acc_t)idx);
    }
}

// AVE divides by the window clipped to the padded image (it may hold padding).
__device__ __forceinline__ int pool_size(const int start, const int k, const int size, const int p) {
    return imin(start + k, size + p) - start;
}

template <typename I>
__device__ __forceinline__ void ave_forward(
        const T* __restrict__ x, T* __restrict__ y, const long long count,
        GEOMETRY) {
    FOR_EACH(I, i, count) {
        const Cell<I> o = cell(i, Ho, Wo);
        const Window win = window(o.row, o.col, GEOMETRY_ARGS);
        acc_t sum = 0;
        for_window(x + o.plane * ((I)H * (I)W), win, W, [&](const acc_t v, int) { sum += v; });
        y[i] = st(sum / (acc_t)(pool_size(win.hs, kh, H, ph) * pool_size(win.ws, kw, W, pw)));
    }
}

template <typename I>
__device__ __forceinline__ void max_backward(
        const T* __restrict__ dy, const int* __restrict__ argmax, T* __restrict__ dx,
        const long long count,
        GEOMETRY) {
    FOR_EACH(I, i, count) {
        const Cell<I> in = cell(i, H, W);
        const I offset = in.plane * ((I)Ho * (I)Wo);
        const T* g = dy + offset;
        const int* am = argmax + offset;
        const int me = in.row * W + in.col;
        acc_t sum = 0;
        for_span(windows_over(in.row, in.col, GEOMETRY_ARGS), [&](const int oh, const int ow) {
            if (am[oh * Wo + ow] == me) sum += ld(g[oh * Wo + ow]);
        });
        dx[i] = st(sum);
    }
}

template <typename I>
__device__ __forceinline__ void ave_backward(
        const T* __restrict__ dy, T* __restrict__ dx, const long long count,
        GEOMETRY) {
    FOR_EACH(I, i, count) {
        const Cell<I> in = cell(i, H, W);
        const T* g = dy + in.plane * ((I)Ho * (I)Wo);
        acc_t sum = 0;
        for_span(windows_over(in.row, in.col, GEOMETRY_ARGS), [&](const int oh, const int ow) {
            const int pool = pool_size(oh * sh - ph, kh, H, ph) * pool_size(ow * sw - pw, kw, W, pw);
            sum += ld(g[oh * Wo + ow]) / (acc_t)pool;
        });
        dx[i] = st(sum);
    }
}

INDEX_VARIANTS(max_pool_forward, max_forward,
               (const T* __restrict__ x, T* __restrict__ y, int* argmax, T* mask, const long long count,
                GEOMETRY, const int write_index, const int write_mask, const int nan_first),
               (x, y, argmax, mask, count, GEOMETRY_ARGS, write_index, write_mask, nan_first))
INDEX_VARIANTS(ave_pool_forward, ave_forward,
               (const T* __restrict__ x, T* __restrict__ y, const long long count, GEOMETRY),
               (x, y, count, GEOMETRY_ARGS))
INDEX_VARIANTS(max_pool_backward, max_backward,
               (const T* __restrict__ dy, const int* __restrict__ argmax, T* __restrict__ dx,
                const long long count, GEOMETRY),
               (dy, argmax, dx, count, GEOMETRY_ARGS))
INDEX_VARIANTS(ave_pool_backward, ave_backward,
               (const T* __restrict__ dy, T* __restrict__ dx, const long long count, GEOMETRY),
               (dy, dx, count, GEOMETRY_ARGS))
"""

_INT32_LIMIT = 2 ** 31 - 1


def _launch(name: str, dtype, count: int, largest: int, arrays: tuple, geometry: tuple,
            flags: tuple = ()) -> None:
    """Run kernel ``name`` over ``count`` threads: its 32-bit-index variant when every index
    (thread, and element of the largest array, ``largest`` elements) fits in an int."""
    grid = blocks(count)
    bits = "32" if max(count + grid * BLOCK, largest) <= _INT32_LIMIT else "64"
    kernel = compiled(SOURCE, name + bits, dtype)
    kernel((grid,), (BLOCK,), arrays + (np.int64(count),) + tuple(np.int32(v) for v in geometry)
           + tuple(np.int32(v) for v in flags))


def max_pool_forward(x, y, geometry: tuple, argmax=None, mask=None, nan_first: bool = False) -> None:
    """``y`` = MAX pooling of ``x``; the int32 argmax into ``argmax`` and, as floats, into
    ``mask`` when they are given (arrays of ``y``'s shape)."""
    count = y.size
    if count == 0:
        return
    _launch("max_pool_forward", y.dtype, count, max(count, x.size),
            (x, y, y if argmax is None else argmax, y if mask is None else mask), geometry,
            (argmax is not None, mask is not None, nan_first))


def ave_pool_forward(x, y, geometry: tuple) -> None:
    """``y`` = AVE pooling of ``x``."""
    if y.size:
        _launch("ave_pool_forward", y.dtype, y.size, max(y.size, x.size), (x, y), geometry)


def max_pool_backward(dy, argmax, dx, geometry: tuple) -> None:
    """``dx`` = the MAX pooling gradient of ``dy`` through the forward's ``argmax`` (overwrites)."""
    if dx.size:
        _launch("max_pool_backward", dx.dtype, dx.size, max(dx.size, dy.size), (dy, argmax, dx), geometry)


def ave_pool_backward(dy, dx, geometry: tuple) -> None:
    """``dx`` = the AVE pooling gradient of ``dy`` (overwrites)."""
    if dx.size:
        _launch("ave_pool_backward", dx.dtype, dx.size, max(dx.size, dy.size), (dy, dx), geometry)


__all__ = ["SOURCE", "ave_pool_backward", "ave_pool_forward", "max_pool_backward",
           "max_pool_forward"]
