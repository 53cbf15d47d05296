"""LRN on a GPU in one pass forward and one pass backward (Caffe's lrn_layer.cu, both regions).

ACROSS_CHANNELS, window of ``size`` channels ``[c - pre, c + post]`` clipped to ``[0, C)``
(``pre = post = (size - 1) / 2``)::

    scale = k + alpha / size * sum_window x^2              (kept for backward)
    y = x * scale^-beta
    dx = dy * scale^-beta - 2 alpha beta / size * x * sum_window dy * y / scale

As in Caffe's LRNFillScale / LRNComputeDiff a thread walks the channels of one (n, h, w) with a
running window sum (add the channel entering, subtract the one leaving), but over a chunk of
``CHUNK`` channels that it starts with a direct window sum: a running sum then never drifts over
more than ``CHUNK`` steps (float32 loses the small terms of a long one), and a 13 x 13 map of 256
channels still gets enough threads. Forward writes ``scale`` and ``y`` in the same walk (Caffe's
LRNComputeOutput fused in).

WITHIN_CHANNEL (Caffe's Power -> AVE Pooling -> Power with shift 1, which divides by size^2):
one thread per element sums its ``size x size`` window directly; backward the same with
``dy * y / scale``.

Every thread writes only its own elements: no atomics, the results do not depend on scheduling.
"""
from __future__ import annotations

import numpy as np

from . import BLOCK, acc_dtype, blocks, compiled

#: Channels one thread walks (ACROSS_CHANNELS).
CHUNK = 32

SOURCE = r"""
__device__ __forceinline__ float lrn_pow(const float a, const float b) { return powf(a, b); }
__device__ __forceinline__ double lrn_pow(const double a, const double b) { return pow(a, b); }

__device__ __forceinline__ acc_t lrn_square(const T* __restrict__ x, const long long at) {
    const acc_t v = ld(x[at]);
    return v * v;
}

__device__ __forceinline__ acc_t lrn_ratio(const T* __restrict__ y, const T* __restrict__ dy,
                                           const T* __restrict__ scale, const long long at) {
    return ld(dy[at]) * ld(y[at]) / ld(scale[at]);
}

// ACROSS_CHANNELS, thread i: n = i / (nchunks * hw), chunk = (i / hw) % nchunks, pixel
// p = i % hw. It walks the chunk's channels c with the running window sum of term(at) (at: an
// element's offset), started with a direct sum, and hands each channel's sum to out(at, sum).
template <typename Term, typename Out>
__device__ __forceinline__ void walk_channels(
        const long long i, const int channels, const long long hw, const int chunk,
        const int nchunks, const int pre, const int post, Term term, Out out) {
    const long long p = i % hw;
    const long long rest = i / hw;
    const int c0 = (int)(rest % nchunks) * chunk;
    const int c1 = min(channels, c0 + chunk);
    const long long base = (rest / nchunks) * channels * hw + p;  // (n, 0, h, w)
    acc_t sum = 0;
    for (int j = max(0, c0 - pre); j <= min(channels - 1, c0 + post); ++j)
        sum += term(base + j * hw);
    for (int c = c0; c < c1; ++c) {
        if (c > c0) {
            if (c - pre - 1 >= 0) sum -= term(base + (c - pre - 1) * hw);
            if (c + post < channels) sum += term(base + (c + post) * hw);
        }
        out(base + c * hw, sum);
    }
}

// WITHIN_CHANNEL, thread i: element i of (N, C, H, W); the sum of term(at) over its window,
// rows [h - pre, h + post] and columns [w - pre, w + post] clipped to the map.
template <typename Term>
__device__ __forceinline__ acc_t window_sum(const long long i, const int height, const int width,
                                            const int pre, const int post, Term term) {
    const int w = (int)(i % width);
    const long long t = i / width;
    const int h = (int)(t % height);
    const long long plane = (t / height) * height * width;
    const int h1 = min(height - 1, h + post), w1 = min(width - 1, w + post);
    acc_t sum = 0;
    for (int hh = max(0, h - pre); hh <= h1; ++hh)
        for (int ww = max(0, w - pre); ww <= w1; ++ww)
            sum += term(plane + (long long)hh * width + ww);
    return sum;
}

// scale = k + alpha_over_size * sum (kept for backward); y = x * scale^-beta.
__device__ __forceinline__ void lrn_output(const T* __restrict__ x, T* __restrict__ scale,
                                           T* __restrict__ y, const long long at, const acc_t sum,
                                           const acc_t alpha_over_size, const acc_t k,
                                           const acc_t neg_beta) {
    const T s = st(k + alpha_over_size * sum);
    scale[at] = s;
    y[at] = st(ld(x[at]) * lrn_pow(ld(s), neg_beta));
}

// dx = dy * scale^-beta - cache_ratio * x * sum.
__device__ __forceinline__ void lrn_diff(const T* __restrict__ x, const T* __restrict__ dy,
                                         const T* __restrict__ scale, T* __restrict__ dx,
                                         const long long at, const acc_t sum,
                                         const acc_t cache_ratio, const acc_t neg_beta) {
    dx[at] = st(ld(dy[at]) * lrn_pow(ld(scale[at]), neg_beta) - cache_ratio * ld(x[at]) * sum);
}

extern "C" __global__ void lrn_across_forward(
        const T* __restrict__ x, T* __restrict__ scale, T* __restrict__ y,
        const long long count, const int channels, const long long hw, const int chunk,
        const int nchunks, const int pre, const int post,
        const acc_t alpha_over_size, const acc_t k, const acc_t neg_beta) {
    FOR_EACH(long long, i, count)
        walk_channels(i, channels, hw, chunk, nchunks, pre, post,
                      [&](const long long at) { return lrn_square(x, at); },
                      [&](const long long at, const acc_t sum) {
                          lrn_output(x, scale, y, at, sum, alpha_over_size, k, neg_beta); });
}

extern "C" __global__ void lrn_across_backward(
        const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ dy,
        const T* __restrict__ scale, T* __restrict__ dx,
        const long long count, const int channels, const long long hw, const int chunk,
        const int nchunks, const int pre, const int post,
        const acc_t cache_ratio, const acc_t neg_beta) {
    FOR_EACH(long long, i, count)
        walk_channels(i, channels, hw, chunk, nchunks, pre, post,
                      [&](const long long at) { return lrn_ratio(y, dy, scale, at); },
                      [&](const long long at, const acc_t sum) {
                          lrn_diff(x, dy, scale, dx, at, sum, cache_ratio, neg_beta); });
}

extern "C" __global__ void lrn_within_forward(
        const T* __restrict__ x, T* __restrict__ scale, T* __restrict__ y,
        const long long count, const int height, const int width, const int pre, const int post,
        const acc_t alpha_over_size, const acc_t k, const acc_t neg_beta) {
    FOR_EACH(long long, i, count)
        lrn_output(x, scale, y, i, window_sum(i, height, width, pre, post,
                                              [&](const long long at) { return lrn_square(x, at); }),
                   alpha_over_size, k, neg_beta);
}

extern "C" __global__ void lrn_within_backward(
        const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ dy,
        const T* __restrict__ scale, T* __restrict__ dx,
        const long long count, const int height, const int width, const int pre, const int post,
        const acc_t cache_ratio, const acc_t neg_beta) {
    FOR_EACH(long long, i, count)
        lrn_diff(x, dy, scale, dx, i, window_sum(i, height, width, pre, post, [&](const long long at) {
                     return lrn_ratio(y, dy, scale, at); }),
                 cache_ratio, neg_beta);
}
"""


def _layout(x, across: bool):
    """(threads, shape arguments) of a launch over the (N, C, H, W) array ``x``."""
    n, c, h, w = x.shape
    if across:
        nchunks = (c + CHUNK - 1) // CHUNK
        return n * nchunks * h * w, (np.int32(c), np.int64(h * w), np.int32(CHUNK),
                                     np.int32(nchunks))
    return x.size, (np.int32(h), np.int32(w))


def forward(x, scale, y, *, across: bool, size: int, alpha_over_size: float, k: float,
            beta: float) -> None:
    """scale = k + alpha_over_size * window sum of x^2; y = x * scale^-beta (all C-contiguous)."""
    count, shape_args = _layout(x, across)
    f = acc_dtype(x.dtype).type
    pre = (size - 1) // 2
    kernel = compiled(SOURCE, "lrn_across_forward" if across else "lrn_within_forward", x.dtype)
    kernel((blocks(count),), (BLOCK,),
           (x, scale, y, np.int64(count), *shape_args, np.int32(pre), np.int32(size - 1 - pre),
            f(alpha_over_size), f(k), f(-beta)))


def backward(x, y, dy, scale, dx, *, across: bool, size: int, cache_ratio: float,
             beta: float) -> None:
    """dx = dy * scale^-beta - cache_ratio * x * window sum of dy * y / scale."""
    count, shape_args = _layout(x, across)
    f = acc_dtype(x.dtype).type
    pre = (size - 1) // 2
    kernel = compiled(SOURCE, "lrn_across_backward" if across else "lrn_within_backward", x.dtype)
    kernel((blocks(count),), (BLOCK,),
           (x, y, dy, scale, dx, np.int64(count), *shape_args, np.int32(pre),
            np.int32(size - 1 - pre), f(cache_ratio), f(-beta)))


__all__ = ["CHUNK", "SOURCE", "backward", "forward"]
