"""2-D convolution on compiled im2col columns (the Convolution layer's "columns" engine, CPU).

Where the compiled CPU kernels are built (cpu_kernels.py) this engine runs the 2-D
convolutions the DFT engine does not take, unless their outputs are small
(MIN_PIXELS). The C im2col writes a chunk of items' columns straight from the
images (padding as zeros, no padded copy, no thrown-away pixels), and col2im sums
them back. With P = Ho x Wo pixels per item and K = prod(K)::

    forward   col (C*K, n*P) for a chunk of n items, sized to stay in the cache;
              out_g (M/G, n*P) = W_g @ col_g        (one GEMM per chunk and group)
              y[i] = out[:, i]                      (a copy in runs of P pixels; the bias
                                                     rides in the GEMM on a row of ones)
    backward  the chunk's columns again (nothing is kept from forward), per item:
              dW_g += col_ig @ dy_ig^T ;  db += dy_i @ 1        (dy read in place)
              dcol_ig = W_g^T @ dy_ig ;  dx_i = col2im(dcol_i)

Forward runs one GEMM over the chunk (measured faster than a GEMM per item, which
would need no copy), backward a GEMM per item (dy needs no copy to the pixel
order: about a third less time than the flat engine's backward on CIFAR-10's conv1).
Every buffer is scratch from the arena all layers share (im2col.ARENA).
"""
from __future__ import annotations

import math

import numpy as np

from . import cpu_kernels
from .im2col import ARENA, Geometry, Scratch

#: A chunk's columns take about this many bytes, so they stay in the cache.
CHUNK_BYTES = 1 << 22
#: Chosen for outputs of at least this many pixels per item. Measured on 2 cores against the
#: strided im2col + one GEMM (gemm engine), forward / backward ms: 16 channels 3x3 on 32x32
#: 18.7/41.6 -> 12.1/25.7, AlexNet conv1 (11x11/4, 55x55) 22.6/25.2 -> 20.2/21.6 and conv2
#: (5x5, 27x27) 34.5/79.2 -> 34.0/62.0; on 13x13 (AlexNet conv3-5) the GEMMs per chunk and per
#: item are too small: 18.3/40.2 -> 21.2/46.8.
MIN_PIXELS = 256


def available(dtype, geometry: Geometry) -> bool:
    """Whether the compiled kernels can run this convolution (2-D, float32 or float64)."""
    return (len(geometry.kernel) == 2 and cpu_kernels.LIB is not None
            and np.dtype(dtype) in (np.float32, np.float64))


def worth_it(out_spatial: tuple) -> bool:
    """Whether the per-item GEMMs are large enough for this engine to beat one big GEMM."""
    return math.prod(out_spatial) >= MIN_PIXELS


class ColumnsConvolution:
    """The columns engine for one layer and one input geometry (see the module doc)."""

    def __init__(self, dtype, n: int, c: int, m: int, group: int, in_spatial: tuple,
                 geometry: Geometry, bias: bool):
        self.dtype = np.dtype(dtype)
        self.m, self.group, self.bias = m, group, bias
        out = geometry.conv_out(in_spatial)
        self.pixels = math.prod(out)
        self.rows = c * geometry.kernel_count
        self.shape = cpu_kernels.conv_shape(c, in_spatial, out, geometry)
        per_item = self.rows * self.pixels * self.dtype.itemsize
        self.chunk = max(1, min(n, CHUNK_BYTES // per_item))
        self.ws = Scratch()
        self.x_ready = False   # (nothing is kept for backward: it builds the columns again)

    def _spans(self, n: int):
        return [(i, min(i + self.chunk, n)) for i in range(0, n, self.chunk)]

    def forward(self, x, weight, bias, y) -> None:
        """y (N, M, Ho, Wo) = conv(x (N, C, H, W)) + bias."""
        with ARENA.scope():
            g, p = self.group, self.pixels
            # Without groups the bias rides in the GEMM: [W | b] @ [col; 1] (an add with the
            # copy to the top costs more).
            ones = int(self.bias and g == 1)
            w = self.ws.get(np, "w", (g, self.m // g, self.rows // g + ones), self.dtype)
            w[:, :, :self.rows // g] = weight.reshape(g, self.m // g, -1)
            if ones:
                w[0, :, -1] = bias
            for n0, n1 in self._spans(x.shape[0]):
                n = n1 - n0
                col = self.ws.get(np, "col", (self.rows + ones, n * p), self.dtype)
                cpu_kernels.im2col(x[n0:n1], col, (0, n), (p, n * p), self.shape)
                col[self.rows:] = 1
                out = self.ws.get(np, "out", (self.m, n * p), self.dtype)
                if g == 1:   # (NumPy's stacked matmul is slower for a single matrix)
                    np.matmul(w[0], col, out=out)
                else:
                    np.matmul(w, col.reshape(g, -1, n * p), out=out.reshape(g, -1, n * p))
                per_item = out.reshape(self.m, n, p).swapaxes(0, 1)
                top = y[n0:n1].reshape(n, self.m, p)
                if self.bias and not ones:
                    np.add(per_item, bias.reshape(-1, 1), out=top)
                else:
                    top[...] = per_item

    def backward(self, x, weight, dy, dx, weight_blob, bias_blob) -> None:
        """dx (or None) = conv^T(dy); the weight and bias blobs' diffs += their gradients
        (each unless None)."""
        with ARENA.scope():
            self._backward(x, weight, dy, dx, weight_blob, bias_blob)

    def _backward(self, x, weight, dy, dx, weight_blob, bias_blob) -> None:
        g, p = self.group, self.pixels
        mg, rg = self.m // g, self.rows // g
        dw = self.ws.get(np, "dw", (g, rg, mg), self.dtype, fill=0) if weight_blob else None
        db = self.ws.get(np, "db", (self.m,), self.dtype, fill=0) if bias_blob else None
        ones = self.ws.get(np, "ones", (p,), self.dtype, fill=1) if bias_blob else None
        for n0, n1 in self._spans(dy.shape[0]):
            n = n1 - n0
            dys = dy[n0:n1].reshape(n, g, mg, p)
            col = self.ws.get(np, "col", (n, g, rg, p), self.dtype)
            if db is not None:
                per_item = self.ws.get(np, "db_items", (n, self.m), self.dtype)
                np.matmul(dys.reshape(n, self.m, p), ones, out=per_item)
                db += per_item.sum(axis=0)
            if dw is not None:
                cpu_kernels.im2col(x[n0:n1], col, (0, n), (self.rows * p, p), self.shape)
                per_item = self.ws.get(np, "dw_items", (n, g, rg, mg), self.dtype)
                np.matmul(col, dys.swapaxes(2, 3), out=per_item)
                dw += per_item.sum(axis=0)
            if dx is not None:   # (the columns are spent: their buffer takes dcol)
                np.matmul(weight.reshape(g, mg, rg).swapaxes(1, 2), dys, out=col)
                cpu_kernels.col2im(col, dx[n0:n1], (0, n), (self.rows * p, p), self.shape)
        if dw is not None:
            weight_blob.add_to_diff(dw.swapaxes(1, 2).reshape(weight_blob.shape))
        if db is not None:
            bias_blob.add_to_diff(db)
