"""Stride-1 convolution on shifted flat columns (the Convolution layer's "flat" engine, CPU).

Pad each plane of x (N, C, *S) to Sp = S + 2p and flatten it. With stride 1,
output o reads x_pad[o + k*d] for kernel offset k, so on the flat padded plane
(strides st_a = prod(Sp[a+1:])) every kernel offset is one shift::

    col[(c, k), n, q] = xflat[n, c, q + shift(k)],   shift(k) = sum_a k_a d_a st_a
    top[:, n, q]      = [W | b] (M, C*prod(K) + 1) @ [col; 1]

for q on the grid (So_0, Sp_1, ..., Sp_last): the output rows at the padded
width. Grid points past the output width read pixels of the next row; they are
computed and thrown away (Wp/Wo more GEMM work) in exchange for what the
strided im2col of im2col.py cannot give: a column row of one item is one
contiguous run of prod(grid) elements, so a copy per kernel offset moves them
at memcpy speed (the strided copies run Wo elements at a time), the bias rides
in the GEMM on a row of ones, and cropping the grid to the top is one copy.
That pays where the copies weigh most against the GEMM: few input channels
(the first layer of a net) and little thrown away (``worth_it``).

Every buffer is scratch from the arena all layers share (im2col.ARENA); nothing
is kept from forward to backward. Forward builds the columns ``chunk`` items at a
time and runs each chunk's GEMM while they are still in the cache. Backward puts
dy on the grid with zeros at the thrown-away points and builds the columns again,
chunk by chunk for the weight gradient (a whole batch of them was the largest
buffer of CIFAR-10 quick; rebuilding costs about what the cache saves forward);
dW^T = [col; 1] @ dy^T (its last row is the bias gradient). The data gradient
takes spans of up to ``im2col.MAX_COL_ELEMENTS``: dcol = W^T dy, and col2im is
one shifted add per kernel offset.
"""
from __future__ import annotations

import math

import numpy as np

from . import im2col
from .im2col import ARENA, Geometry, Scratch, fill_outside

#: A forward chunk's columns take about this many bytes, so they stay in the cache.
CHUNK_BYTES = 1 << 23
#: A weight gradient with fewer elements per group than DW_SMALL runs as GEMMs over about
#: DW_PIXELS grid pixels each (see ``_weight_grad``), a larger one as one GEMM.
DW_SMALL = 1024
DW_PIXELS = 2048
#: Chosen only where at most this share of the GEMM is thrown away (Wp/Wo - 1)...
MAX_WASTE = 0.2
#: ... and the column rows per group, C/G x prod(K), are at most this many.
MAX_ROWS = 128


def worth_it(channels: int, group: int, in_spatial: tuple, geometry: Geometry) -> bool:
    """Whether the flat engine should run this stride-1 convolution (measured on 2 CPU
    cores: LeNet's and CIFAR-10's first layers and 3-channel 224x224 layers gain 10-40%
    forward; wide layers with many channels are GEMM-bound and lose the thrown-away work)."""
    g = geometry
    out = g.conv_out(in_spatial)
    grid = out[:1] + tuple(s + 2 * p for s, p in zip(in_spatial[1:], g.pad[1:]))
    waste = math.prod(grid) / math.prod(out) - 1
    return channels // group * g.kernel_count <= MAX_ROWS and waste <= MAX_WASTE


class FlatConvolution:
    """The flat engine for one layer and one input geometry (see the module doc)."""

    def __init__(self, xp, dtype, n: int, c: int, m: int, group: int, in_spatial: tuple,
                 geometry: Geometry, bias: bool):
        g = geometry
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.c, self.m, self.group, self.g, self.bias = c, m, group, g, bias
        self.in_spatial = tuple(in_spatial)
        self.padded = tuple(s + 2 * p for s, p in zip(in_spatial, g.pad))
        self.out_spatial = g.conv_out(in_spatial)
        self.grid = (self.out_spatial[0],) + self.padded[1:]
        self.valid = (slice(None), slice(None)) + tuple(slice(0, s) for s in self.out_spatial)
        self.plane = math.prod(self.padded)
        self.pixels = math.prod(self.grid)
        strides = [math.prod(self.padded[a + 1:]) for a in range(len(self.padded))]
        self.shifts = [sum(k * d * s for k, d, s in zip(offset, g.dilation, strides))
                       for offset in g.offsets()]
        # Rows per group: C/G channels x prod(K) offsets, then the bias' row of ones.
        self.rows = c // group * g.kernel_count + bias
        per_item = group * self.rows * self.pixels
        self.batch = _even(n, im2col.MAX_COL_ELEMENTS // per_item)                # backward
        self.chunk = _even(n, CHUNK_BYTES // (per_item * self.dtype.itemsize))    # forward
        self.ws = Scratch()   # all scratch, from the shared arena: nothing is kept for backward
        self.x_ready = False  # (kept columns: none, backward rebuilds them)

    @staticmethod
    def _spans(n: int, size: int):
        return [(i, min(i + size, n)) for i in range(0, n, size)]

    # ---- buffers ----------------------------------------------------------------------------
    def _columns(self, n: int):
        """The column buffer (G, rows, n*pixels) for n items."""
        return self.ws.get(self.xp, "col", (self.group, self.rows, n * self.pixels), self.dtype)

    def _image_rows(self, col, n: int):
        """The column buffer's image rows as (G, C/G, prod(K), n, pixels)."""
        return col[:, :self.rows - self.bias].reshape(self.group, self.c // self.group,
                                                      self.g.kernel_count, n, self.pixels)

    def _padded(self, role: str, n: int, fill=0):
        """A flat zero-padded buffer for n images, with a tail for the last plane's shifts."""
        return self.ws.get(self.xp, role, (n * self.c * self.plane + max(self.shifts),),
                           self.dtype, fill=fill)

    def _interior(self, flat, n: int):
        """The real images inside a flat padded buffer, (n, C, *S)."""
        planes = flat[:n * self.c * self.plane].reshape((n, self.c) + self.padded)
        return planes[(slice(None), slice(None)) + self.g.interior(self.in_spatial)]

    def _shifted(self, flat, n: int, shift: int):
        """(G, C/G, n, pixels) view: every plane's grid read at kernel offset ``shift``."""
        planes = flat[shift:shift + n * self.c * self.plane].reshape(n, self.group, -1, self.plane)
        return planes[..., :self.pixels].transpose(1, 2, 0, 3)

    def _im2col(self, x, col, role: str = "pad") -> None:
        """The image rows of [col; 1] (G, rows, n*pixels) from the images x (n, C, *S)."""
        n = x.shape[0]
        flat = self._padded(role, n)
        self._interior(flat, n)[...] = x
        image = self._image_rows(col, n)
        for i, shift in enumerate(self.shifts):
            image[:, :, i] = self._shifted(flat, n, shift)

    def _on_grid(self, dy):
        """(n, M, *So) -> (G, M/G, n*pixels) on the grid, zeros at the thrown-away points."""
        n = dy.shape[0]
        buf = self.ws.get(self.xp, "dy", (self.m, n) + self.grid, self.dtype)
        fill_outside(buf, self.valid, 0)
        buf.swapaxes(0, 1)[self.valid] = dy
        return buf.reshape(self.group, self.m // self.group, n * self.pixels)

    def _weight_grad(self, col, dyg, grad):
        """grad (G, rows, M/G) += [col; 1] @ dy^T over n items.

        dW has few elements and a long inner dimension. OpenBLAS splits a very small
        one badly between threads (LeNet's conv1, 26 x 20: 46 GFLOP/s on 2 cores), and a
        stack of GEMMs over ~2k pixels each runs at 90; larger ones (CIFAR-10's conv1,
        76 x 32) run best as one GEMM, which is also what a busy second core hurts
        least. [col; 1] @ dy^T is the faster orientation (~30% over dy @ col^T).
        """
        g, mg = self.group, self.m // self.group
        n = col.shape[2] // self.pixels
        q = n if self.rows * mg >= DW_SMALL else _divisor(n, DW_PIXELS // self.pixels)  # per GEMM
        stacked = (n // q, q * self.pixels)
        cols = col.reshape((g, self.rows) + stacked).transpose(2, 0, 1, 3)
        dys = dyg.reshape((g, mg) + stacked).transpose(2, 0, 3, 1)
        part = self.xp.matmul(cols, dys).sum(axis=0)
        return part if grad is None else self.xp.add(grad, part, out=grad)

    # ---- the layer's passes --------------------------------------------------------------------
    def forward(self, x, weight, bias, y) -> None:
        """y (N, M, *So) = conv(x (N, C, *S)) + bias."""
        with ARENA.scope():
            self._forward(x, weight, bias, y)

    def _forward(self, x, weight, bias, y) -> None:
        xp, g, mg = self.xp, self.group, self.m // self.group
        w = self.ws.get(xp, "w", (g, mg, self.rows), self.dtype)
        w[:, :, :self.rows - self.bias] = weight.reshape(g, mg, -1)
        if self.bias:
            w[:, :, -1] = bias.reshape(g, mg)
        for n0, n1 in self._spans(x.shape[0], self.chunk):
            part = self._columns(n1 - n0)
            if self.bias:
                part[:, -1] = 1
            self._im2col(x[n0:n1], part)
            out = self.ws.get(xp, "out", (g, mg, part.shape[2]), self.dtype)
            if g == 1:   # (NumPy's stacked matmul is slower for a single matrix)
                xp.matmul(w[0], part[0], out=out[0])
            else:
                xp.matmul(w, part, out=out)
            grid = out.reshape((self.m, n1 - n0) + self.grid).swapaxes(0, 1)
            y[n0:n1] = grid[self.valid]

    def backward(self, x, weight, dy, dx, weight_blob, bias_blob) -> None:
        """dx (or None) = conv^T(dy); the weight and bias blobs' diffs += their gradients
        (each unless None)."""
        with ARENA.scope():
            self._backward(x, weight, dy, dx, weight_blob, bias_blob)

    def _backward(self, x, weight, dy, dx, weight_blob, bias_blob) -> None:
        xp, g, mg = self.xp, self.group, self.m // self.group
        rows = self.rows - self.bias
        if bias_blob is not None and (weight_blob is None or not self.bias):
            bias_blob.add_to_diff(dy.sum(axis=(0,) + tuple(range(2, dy.ndim))))
            bias_blob = None
        grad = None
        for n0, n1 in self._spans(dy.shape[0], self.batch):
            n = n1 - n0
            # The data gradient needs dy on the grid for the whole span; the weight gradient
            # alone takes it a chunk at a time, with the columns (rebuilt as in forward, not
            # kept: a whole batch of them would be the largest buffer of a small net).
            dyg = self._on_grid(dy[n0:n1]) if dx is not None else None
            if weight_blob is not None:
                for c0, c1 in self._spans(n, self.chunk):
                    part = self._columns(c1 - c0)
                    if self.bias:
                        part[:, -1] = 1
                    self._im2col(x[n0 + c0:n0 + c1], part)
                    dyc = (self._on_grid(dy[n0 + c0:n0 + c1]) if dyg is None
                           else dyg[:, :, c0 * self.pixels:c1 * self.pixels])
                    grad = self._weight_grad(part, dyc, grad)
            if dx is not None:
                dcol = self._columns(n)
                xp.matmul(weight.reshape(g, mg, -1).swapaxes(1, 2), dyg, out=dcol[:, :rows])
                acc = self._padded("acc", n, fill=0)
                image = self._image_rows(dcol, n)
                for i, shift in enumerate(self.shifts):
                    self._shifted(acc, n, shift)[...] += image[:, :, i]
                dx[n0:n1] = self._interior(acc, n)
        if grad is not None:
            # grad (G, rows, M/G): the (C/G, prod(K)) weights' rows, then the bias'.
            weight_blob.add_to_diff(grad[:, :rows].swapaxes(1, 2).reshape(weight_blob.shape))
            if bias_blob is not None:
                bias_blob.add_to_diff(grad[:, -1].reshape(-1))


def _divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is at most ``at_most`` (and at least 1)."""
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def _even(n: int, size: int) -> int:
    """The chunk size that splits n into as many chunks as ``size`` does, evened out."""
    size = max(1, min(n, size))
    return -(-n // -(-n // size))
