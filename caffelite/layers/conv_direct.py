"""Direct 2-D convolution on the CPU's vector units (the Convolution layer's "direct" engine).

For stride-1 float32 convolutions im2col + GEMM spends much of its time writing and
packing columns that BLAS then uses only M times (worst with few input channels, as a net's
first layer), and BLAS runs the weight gradient's long, thin product (M x C*K, summed over
every pixel) on one core. conv_direct.c reads the zero-padded image instead: forward and the
weight gradient are register-blocked sums over the taps, with no columns at all, on every
core (items split among threads). The input gradient is the same forward kernel run over dy
padded by kernel - 1 - pad, with the weights flipped and transposed::

    dx[n, c] = sum over o, ky, kx of  W[o, c, KH-1-ky, KW-1-kx] * dy_pad[n, o, y + ky, x + kx]

The kernels compute each output row Wp = W + 2 pw pixels wide and drop the extra Wp - Wo
columns, and whole blocks of 64 pixels, so small maps waste much of their work: the engine is
taken only where at least MIN_USEFUL of the computed pixels are wanted (CIFAR-10's and
LeNet's conv1: 0.89 and 0.82; 8x8 maps with 5x5 kernels: 0.5).
"""
from __future__ import annotations

import math

import numpy as np

from . import cpu_kernels
from .cpu_threads import run_parts, split
from .im2col import ARENA, Geometry

#: The kernels' rows are computed in blocks of this many pixels (the largest FV x VL).
BLOCK = 64
#: Taken where at least this share of the pixels the kernels compute are output pixels.
#: Measured on 2 cores (forward / weight gradient ms, columns engine -> direct): CIFAR-10
#: conv1 7.4 / 10.9 -> 4.2 / 4.0, LeNet conv1 0.83 / 0.66 -> 0.45 / 0.51; forward / backward
#: with dx, 3x3 pad 1: 64 -> 64 channels on 56x56, batch 8, 19.0 / 38.0 -> 10.4 / 21.6, and
#: 32 -> 32 on 32x32, batch 16, 3.3 / 8.0 -> 3.1 / 6.7. LeNet conv2 (share 0.5) loses to the
#: GEMM engine: forward 4.15 ms against about 2.
MIN_USEFUL = 0.75


def available(dtype, geometry: Geometry, group: int) -> bool:
    """Whether the direct kernels can run this convolution: 2-D float32, stride 1, no
    dilation, no groups, pad below the kernel (for dx), not 1x1 (the pointwise path needs
    no kernel), on a CPU with AVX2 or AVX-512."""
    g = geometry
    return (len(g.kernel) == 2 and g.kernel != (1, 1) and np.dtype(dtype) == np.float32 and group == 1
            and all(s == 1 for s in g.stride) and all(d == 1 for d in g.dilation)
            and all(p < k for p, k in zip(g.pad, g.kernel)) and cpu_kernels.vector_bits() > 0)


def _rows(in_spatial: tuple, kernel: tuple, pad: tuple) -> tuple[int, int, int, int]:
    """(Ho, Wo, Wp, the wide rows' length): Ho rows Wp wide, rounded up to whole blocks."""
    (h, w), (kh, kw), (ph, pw) = in_spatial, kernel, pad
    ho, wo, wp = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1, w + 2 * pw
    return ho, wo, wp, -(-ho * wp // BLOCK) * BLOCK


class _Plan:
    """One kernel call's shape array, tap offsets and scratch size (see conv_direct.c)."""

    def __init__(self, channels: int, in_spatial: tuple, outputs: int, kernel: tuple, pad: tuple):
        (h, w), (kh, kw), (ph, pw) = in_spatial, kernel, pad
        ho, wo, wp, self.wide = _rows(in_spatial, kernel, pad)
        plane = (h + 2 * ph) * wp
        # The last block reads up to (wide - ho * wp) + kw - 1 past the last plane.
        padded = channels * plane + self.wide - ho * wp + kw
        self.shape = np.array((channels, h, w, outputs, ho, wo, ph, pw, channels * kh * kw, wp,
                               padded, self.wide), np.int64)
        c, ky, kx = np.meshgrid(np.arange(channels), np.arange(kh), np.arange(kw), indexing="ij")
        self.taps = (c * plane + ky * wp + kx).ravel().astype(np.int64)
        self.padded = padded

    def scratch(self, rows: int) -> int:
        """Elements of one part's scratch: the padded planes and ``rows`` wide rows."""
        return self.padded + rows * self.wide


def worth_it(in_spatial: tuple, geometry: Geometry) -> bool:
    """Whether at least MIN_USEFUL of the pixels the kernels compute are output pixels."""
    ho, wo, _, wide = _rows(in_spatial, geometry.kernel, geometry.pad)
    return ho * wo >= MIN_USEFUL * wide


class DirectConvolution:
    """The direct engine for one layer and one input geometry (see the module doc)."""

    def __init__(self, n: int, c: int, m: int, in_spatial: tuple, geometry: Geometry):
        g = geometry
        self.m = m
        self.forward_plan = _Plan(c, in_spatial, m, g.kernel, g.pad)
        out = g.conv_out(in_spatial)
        flipped = tuple(k - 1 - p for k, p in zip(g.kernel, g.pad))
        self.dx_plan = _Plan(m, out, c, g.kernel, flipped)
        # Parts of items, one per core (the work per item: every output times every tap).
        self.parts = split(n, m * math.prod(out) * c * math.prod(g.kernel) // 16)
        self.x_ready = False   # (nothing is kept from forward for backward)

    def forward(self, x, weight, bias, y) -> None:
        """y (N, M, Ho, Wo) = conv(x (N, C, H, W)) + bias (or None)."""
        self._forward(self.forward_plan, x, weight, bias, y)

    def _forward(self, plan, x, weight, bias, y) -> None:
        weight = np.ascontiguousarray(weight, np.float32)
        bias = None if bias is None else np.ascontiguousarray(bias, np.float32)
        parts = self.parts
        with ARENA.scope():
            scratch = ARENA.get((len(parts), plan.scratch(cpu_kernels.DIRECT_FORWARD_ROWS)),
                                np.float32)
            run_parts(lambda k: cpu_kernels.direct_forward(
                x, weight, bias, plan.taps, plan.shape, y, scratch[k], parts[k]), range(len(parts)))

    def backward(self, x, weight, dy, dx, weight_blob, bias_blob) -> None:
        """dx (or None) = conv^T(dy); the weight and bias blobs' diffs += their gradients
        (each unless None; the kernel computes both whenever either is wanted)."""
        if dx is not None:
            # W[o, c, ky, kx] -> Wt[c, o, KH-1-ky, KW-1-kx]: dx is a forward over dy.
            self._forward(self.dx_plan, dy, weight[:, :, ::-1, ::-1].swapaxes(0, 1), None, dx)
        if weight_blob is None and bias_blob is None:
            return
        plan, parts = self.forward_plan, self.parts
        with ARENA.scope():
            scratch = ARENA.get((len(parts), plan.scratch(self.m)), np.float32)
            dw = ARENA.get((len(parts), self.m, plan.taps.size), np.float32, fill=0)
            db = ARENA.get((len(parts), self.m), np.float32, fill=0) if bias_blob else None
            run_parts(lambda k: cpu_kernels.direct_weight_grad(
                x, dy, plan.taps, plan.shape, dw[k], None if db is None else db[k], scratch[k],
                parts[k]), range(len(parts)))
            if weight_blob is not None:
                weight_blob.add_to_diff(dw.sum(axis=0).reshape(weight_blob.shape))
            if db is not None:
                bias_blob.add_to_diff(db.sum(axis=0))
