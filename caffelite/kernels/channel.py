"""Per-channel sums and per-channel elementwise maps, for BatchNorm, Scale and Bias on a GPU.

Arrays are viewed as (outer, dim, inner): for an (N, C, H, W) blob and a per-channel operand,
outer = N, dim = C, inner = H * W. Two kernels do the reductions, deterministically (a fixed
order, no atomics) and in ``acc_t``:

    channel_partial_sums   block (c, p) sums its slice p of channel c:
                           s0 = sum(a - K),  s1 = sum((a - K) * b)   (b = a - K when b is NULL)
                           with K = a[0, c, 0] when ``shift`` (the shifted-data variance formula:
                           var = s1/m - (s0/m)^2 keeps its precision when |mean| >> std), else 0
    a finaliser            one thread per channel adds the parts in order and applies the
                           layer's formula (BatchNorm statistics, or parameter gradients)

A channel is split into ``parts`` slices along ``outer`` so that small channel counts still
fill the GPU.
"""
from __future__ import annotations

import numpy as np

from ..backend import cupy_module
from . import BLOCK, NULL, acc_dtype, blocks, compiled

SOURCE = r"""
// q = i / d and r = i % d in 32-bit arithmetic when both fit (64-bit division is a long
// software sequence on a GPU, and these kernels run it per element).
__device__ __forceinline__ void divmod(long long i, long long d, long long& q, long long& r) {
    if (i < 4294967296LL && d < 4294967296LL) {
        unsigned int q32 = (unsigned int)i / (unsigned int)d;
        q = q32;
        r = (unsigned int)i - q32 * (unsigned int)d;
    } else {
        q = i / d;
        r = i - q * d;
    }
}

// The channel of element i of an (outer, dim, inner) array.
__device__ __forceinline__ int channel_at(long long i, int dim, long long inner) {
    long long q, r;
    divmod(i, inner, q, r);
    if (q < 4294967296LL) return (int)((unsigned int)q % (unsigned int)dim);
    return (int)(q % dim);
}

__device__ __forceinline__ acc_t warp_sum(acc_t v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

// Sum of a block's values; the result is valid in thread 0.
__device__ __forceinline__ void block_sum2(acc_t& s0, acc_t& s1) {
    __shared__ acc_t sh0[32], sh1[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    s0 = warp_sum(s0);
    s1 = warp_sum(s1);
    if (lane == 0) { sh0[warp] = s0; sh1[warp] = s1; }
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    if (warp == 0) {
        s0 = lane < warps ? sh0[lane] : (acc_t)0;
        s1 = lane < warps ? sh1[lane] : (acc_t)0;
        s0 = warp_sum(s0);
        s1 = warp_sum(s1);
    }
}

extern "C" __global__ void channel_partial_sums(
        const T* a, const T* b, long long outer, int dim, long long inner, int parts, int shift,
        acc_t* partial) {  // partial: (2, dim, parts)
    int c = blockIdx.x, p = blockIdx.y;
    long long o0 = outer * p / parts, o1 = outer * (p + 1) / parts;
    long long count = (o1 - o0) * inner;
    acc_t k = shift ? ld(a[(long long)c * inner]) : (acc_t)0;
    acc_t s0 = 0, s1 = 0;
    for (long long i = threadIdx.x; i < count; i += blockDim.x) {
        long long o, j;
        divmod(i, inner, o, j);
        long long idx = ((o0 + o) * dim + c) * inner + j;
        acc_t d = ld(a[idx]) - k;
        s0 += d;
        s1 += d * (b ? ld(b[idx]) : d);
    }
    block_sum2(s0, s1);
    if (threadIdx.x == 0) {
        partial[(long long)c * parts + p] = s0;
        partial[((long long)dim + c) * parts + p] = s1;
    }
}

__device__ __forceinline__ void add_parts(const acc_t* partial, int dim, int parts, int c,
                                          acc_t& s0, acc_t& s1) {
    s0 = 0; s1 = 0;
    for (int p = 0; p < parts; ++p) {
        s0 += partial[(long long)c * parts + p];
        s1 += partial[((long long)dim + c) * parts + p];
    }
}

// BatchNorm in TRAIN: batch mean and inverse std, and Caffe's running statistics.
extern "C" __global__ void bn_batch_stats(
        const acc_t* partial, int dim, int parts, const T* x, long long inner, acc_t m, acc_t eps,
        acc_t maf, acc_t correction, T* mean_sum, T* var_sum, T* factor,
        acc_t* mean, acc_t* inv_std) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c == 0) factor[0] = st(ld(factor[0]) * maf + (acc_t)1);
    if (c >= dim) return;
    acc_t s0, s1;
    add_parts(partial, dim, parts, c, s0, s1);
    acc_t d = s0 / m;
    acc_t var = s1 / m - d * d;
    if (var < (acc_t)0) var = 0;
    acc_t mu = ld(x[(long long)c * inner]) + d;
    mean[c] = mu;
    inv_std[c] = (acc_t)1 / sqrt(var + eps);
    mean_sum[c] = st(ld(mean_sum[c]) * maf + mu);
    var_sum[c] = st(ld(var_sum[c]) * maf + var * correction);
}

// BatchNorm with global statistics: mean = mean_sum / factor, var = var_sum / factor (0 while
// the factor is 0).
extern "C" __global__ void bn_global_stats(
        const T* mean_sum, const T* var_sum, const T* factor, int dim, acc_t eps,
        acc_t* mean, acc_t* inv_std) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    acc_t f = ld(factor[0]);
    acc_t inv = f == (acc_t)0 ? (acc_t)0 : (acc_t)1 / f;
    mean[c] = ld(mean_sum[c]) * inv;
    inv_std[c] = (acc_t)1 / sqrt(ld(var_sum[c]) * inv + eps);
}

// xn = (x - mean[c]) * inv_std[c], into keep (the normalised copy backward reads) if given;
// y = xn, or with a fused Scale (caffelite/fusion.py) y = xn * s[c] + b[c] (b may be NULL).
extern "C" __global__ void bn_normalize(
        const T* x, const acc_t* mean, const acc_t* inv_std, long long n, int dim, long long inner,
        T* y, T* keep, const T* s, const T* b) {
    FOR_EACH(long long, i, n) {
        int c = channel_at(i, dim, inner);
        T v = st((ld(x[i]) - mean[c]) * inv_std[c]);
        if (keep) keep[i] = v;
        if (s) v = st(ld(v) * ld(s[c]) + (b ? ld(b[c]) : (acc_t)0));
        y[i] = v;
    }
}

// means[c] = s0 * scale, means[dim + c] = s1 * scale (one thread per channel).
extern "C" __global__ void channel_means(const acc_t* partial, int dim, int parts, acc_t scale,
                                         acc_t* means) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    acc_t s0, s1;
    add_parts(partial, dim, parts, c, s0, s1);
    means[c] = s0 * scale;
    means[dim + c] = s1 * scale;
}

// BatchNorm backward: dx = (dy - mean(dy) - xn * mean(dy * xn)) * inv_std in TRAIN (means from
// channel_means), dx = dy * inv_std with global statistics (means NULL); times s[c] with a fused
// Scale (s not NULL: dy is then the Scale's top diff). dx may be dy.
extern "C" __global__ void bn_backward(
        const T* dy, const T* xn, const acc_t* means, const acc_t* inv_std, long long n, int dim,
        long long inner, T* dx, const T* s) {
    FOR_EACH(long long, i, n) {
        int c = channel_at(i, dim, inner);
        acc_t g = ld(dy[i]);
        if (means) g -= means[c] + ld(xn[i]) * means[dim + c];
        g *= inv_std[c];
        if (s) g *= ld(s[c]);
        dx[i] = st(g);
    }
}

// Scale / Bias forward: y = x * s[c] (s may be NULL: 1) + b[c] (b may be NULL: 0); keep = x.
extern "C" __global__ void channel_affine(
        const T* x, const T* s, const T* b, long long n, int dim, long long inner, T* y, T* keep) {
    FOR_EACH(long long, i, n) {
        int c = channel_at(i, dim, inner);
        acc_t v = ld(x[i]);
        if (keep) keep[i] = x[i];
        if (s) v *= ld(s[c]);
        if (b) v += ld(b[c]);
        y[i] = st(v);
    }
}

// Parameter gradients from the partial sums of dy (s0) and dy * x (s1):
// mode 0: leave, 1: write, 2: add.  d1 <- s1 (Scale's ds), d0 <- s0 (the bias gradient).
extern "C" __global__ void channel_grads(
        const acc_t* partial, int dim, int parts, T* d0, int mode0, T* d1, int mode1) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    acc_t s0, s1;
    add_parts(partial, dim, parts, c, s0, s1);
    if (mode0) d0[c] = st(mode0 == 2 ? ld(d0[c]) + s0 : s0);
    if (mode1) d1[c] = st(mode1 == 2 ? ld(d1[c]) + s1 : s1);
}
"""

#: Blocks the partial sums aim at (a few per SM of a large GPU).
TARGET_BLOCKS = 1024
#: Fewest elements one block of a split channel sums.
MIN_PER_BLOCK = 4096


def _parts(outer: int, dim: int, inner: int) -> int:
    parts = -(-TARGET_BLOCKS // dim)
    parts = min(parts, max(1, outer * inner // MIN_PER_BLOCK), outer, 65535)
    return max(1, parts)


class ChannelOps:
    """The kernels above for one layer: caches its partial-sum buffer and statistics."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.acc = acc_dtype(dtype)
        self.cp = cupy_module()
        self._buffers: dict[str, object] = {}
        self.parts = 1

    def _kernel(self, name):
        return compiled(SOURCE, name, self.dtype)

    def buffer(self, role: str, shape):
        buf = self._buffers.get(role)
        if buf is None or buf.shape != tuple(shape):
            buf = self._buffers[role] = self.cp.empty(shape, self.acc)
        return buf

    def scalar(self, value):
        return self.acc.type(value)

    def partial_sums(self, a, b, dims, shift: bool):
        """Sums of (a - K) and (a - K) * b per channel, into the partial buffer (module doc)."""
        outer, dim, inner = (int(d) for d in dims)
        self.parts = _parts(outer, dim, inner)
        partial = self.buffer("partial", (2, dim, self.parts))
        self._kernel("channel_partial_sums")(
            (dim, self.parts), (BLOCK,),
            (a, b, np.int64(outer), np.int32(dim), np.int64(inner), np.int32(self.parts),
             np.int32(shift), partial))
        return partial

    def per_channel(self, name: str, dim: int, args) -> None:
        self._kernel(name)((blocks(dim),), (BLOCK,), args)

    def elementwise(self, name: str, n: int, args) -> None:
        self._kernel(name)((blocks(n),), (BLOCK,), args)


__all__ = ["ChannelOps", "NULL", "SOURCE"]
