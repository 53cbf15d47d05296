"""Stride-1 convolution through small DFTs computed with GEMMs (the Convolution layer's
"dft" engine).

For input x (N, C, H, W), weight w (M, C/G, Kh, Kw), pad (ph, pw), stride and
dilation 1, take P = H + 2ph and Q = W + 2pw. Place x at rows 0..H-1 and the
flipped kernel at g[(ph - a) mod P, (pw - b) mod Q] = w[a, b]; then the
circular convolution of size P x Q equals Caffe's cross-correlation at the
outputs 0..Ho-1 (no wrap-around reaches them), and likewise for both gradients::

    Y(f)  = X(f) G(f)                        per frequency f, (N, C) @ (C, M)   complex
    dX(f) = dY(f) G(f)^H                     (N, M) @ (M, C)
    dG(f) = dY(f)^T conj(X(f))               (M, N) @ (N, C), summed over the batch

The transforms are not FFTs but dense DFT matrices applied as GEMMs (the
sizes are small, 8 to 40): along the width a real DFT to Q/2+1 frequencies,
then a complex DFT along the height; only the needed input rows/columns enter
and only the needed output rows/columns are computed, so padding and cropping
cost nothing. Complex numbers are kept as separate real and imaginary planes
and every product is a real GEMM. Arrays are laid out (spatial..., n, c) so
that each frequency's matrix is contiguous; the first and the last GEMM of a
pass read and write the blobs' (n, c, spatial...) order in place (BLAS takes
the strided rows as a transposed operand), so no transposing copy is needed.

Against im2col this does 3-5x fewer FLOPs for 5x5 kernels and moves much
less memory (the column matrix is Kh*Kw times the input). The results equal
the direct sum up to rounding (float32: ~1e-6 of the largest output).
"""
from __future__ import annotations

import math

import numpy as np

from . import cpu_kernels
from .cpu_threads import run_parts, split
from .im2col import ARENA, Workspace

#: Roles that live from a forward to its backward (per engine: the input's spectrum, for dW);
#: the rest, the kernel's spectra included (cheap to make again), are scratch from the
#: arena all layers share (im2col.ARENA). Inner scopes give each step's planes back early.
_KEPT = ("x_f",)


def _forward_mats(rows_in, cols_in, P: int, Q: int):
    """DFT matrices taking values at grid positions (rows_in, cols_in) to frequencies.

    Dw (2Qf, S): [cos; -sin] of 2 pi l s / Q  (real input -> Re, Im of l = 0..Q/2);
    E (2P, 2R): rows (k, re/im), columns (h, re/im): e^{-2 pi i k r_h / P} as a real 2x2 block.
    """
    qf = Q // 2 + 1
    ang = 2 * np.pi * np.outer(np.arange(qf), np.asarray(cols_in)) / Q
    dw = np.concatenate([np.cos(ang), -np.sin(ang)], axis=0)
    th = 2 * np.pi * np.outer(np.arange(P), np.asarray(rows_in)) / P
    c, s = np.cos(th), np.sin(th)
    e = np.empty((P, 2, len(rows_in), 2))
    e[:, 0, :, 0], e[:, 0, :, 1] = c, s
    e[:, 1, :, 0], e[:, 1, :, 1] = -s, c
    return dw, e.reshape(2 * P, 2 * len(rows_in))


def _inverse_mats(rows_out, cols_out, P: int, Q: int):
    """Inverse DFT matrices producing only the grid positions (rows_out, cols_out).

    Einv (2R, 2P): e^{+2 pi i k r / P} / P as real 2x2 blocks; Dinv (S, 2Qf): the real
    inverse of the half spectrum (frequencies other than 0 and Q/2 count twice).
    """
    qf = Q // 2 + 1
    th = 2 * np.pi * np.outer(np.asarray(rows_out), np.arange(P)) / P
    c, s = np.cos(th) / P, np.sin(th) / P
    e = np.empty((len(rows_out), 2, P, 2))
    e[:, 0, :, 0], e[:, 0, :, 1] = c, -s
    e[:, 1, :, 0], e[:, 1, :, 1] = s, c
    weight = np.full(qf, 2.0)
    weight[0] = 1.0
    if Q % 2 == 0:
        weight[-1] = 1.0
    ang = 2 * np.pi * np.outer(np.asarray(cols_out), np.arange(qf)) / Q
    dinv = np.concatenate([weight * np.cos(ang), -weight * np.sin(ang)], axis=1) / Q
    return e.reshape(2 * len(rows_out), 2 * P), dinv


def estimated_seconds(n, c, m, group, in_spatial, kernel, out_spatial, pad) -> tuple[float, float]:
    """(im2col + GEMM, DFT) time estimates of forward + backward on one CPU core.

    A model fitted on 2-core AMD EPYC measurements (CIFAR-10 and AlexNet layers):
    GEMM FLOPs at 90 GFLOP/s for the big im2col GEMMs and 50 for the DFT's
    smaller ones, plus about 0.6 ns per element per pass over the column matrix
    and the spectra, and 1 ns per pass over the kernel's spectrum (F x C/G x M,
    large for small batches with many channels, where the DFT loses).
    """
    (h, w), (kh, kw), (ho, wo) = in_spatial, kernel, out_spatial
    cg = c // group
    P, Q = h + 2 * pad[0], w + 2 * pad[1]
    qf = Q // 2 + 1
    direct = 2.0 * n * m * cg * kh * kw * ho * wo
    columns = float(c * kh * kw * n * ho * wo)
    gemm = 3 * direct / 90e9 + 5 * columns * 0.6e-9
    product = 8.0 * n * cg * m * P * qf
    transforms = (4.0 * qf * w * h * n * c + 8.0 * P * h * qf * n * c
                  + 8.0 * ho * P * qf * n * m + 4.0 * wo * qf * ho * n * m)
    spectra = 2.0 * P * qf * n * (c + m)
    kernel_spectrum = 2.0 * P * qf * cg * m
    dft = 3 * (product + transforms) / 50e9 + 4 * spectra * 0.6e-9 + 6 * kernel_spectrum * 1e-9
    return gemm, dft


class DFTConvolution:
    """The DFT engine for one layer and one input geometry (see the module doc)."""

    def __init__(self, xp, dtype, n, c, m, group, in_spatial, kernel, pad):
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.n, self.c, self.m, self.group = n, c, m, group
        (self.h, self.w), (self.kh, self.kw), (self.ph, self.pw) = in_spatial, kernel, pad
        self.P, self.Q = self.h + 2 * self.ph, self.w + 2 * self.pw
        self.qf = self.Q // 2 + 1
        self.ho, self.wo = self.P - self.kh + 1, self.Q - self.kw + 1
        P, Q = self.P, self.Q
        k_rows = [(self.ph - a) % P for a in range(self.kh)]
        k_cols = [(self.pw - b) % Q for b in range(self.kw)]
        as_xp = lambda a: xp.asarray(np.ascontiguousarray(a, dtype=self.dtype))  # noqa: E731
        # Forward transforms of x, dy and the kernel; inverse ones to y, dx and the kernel's gradient.
        self.fx = [as_xp(a) for a in _forward_mats(range(self.h), range(self.w), P, Q)]
        self.fdy = [as_xp(a) for a in _forward_mats(range(self.ho), range(self.wo), P, Q)]
        self.fk = [as_xp(a) for a in _forward_mats(k_rows, k_cols, P, Q)]
        self.iy = [as_xp(a) for a in _inverse_mats(range(self.ho), range(self.wo), P, Q)]
        self.idx = [as_xp(a) for a in _inverse_mats(range(self.h), range(self.w), P, Q)]
        self.ik = [as_xp(a) for a in _inverse_mats(k_rows, k_cols, P, Q)]
        self.ws = Workspace()
        self.x_ready = False  # the spectrum of the last forward's input is kept for dW

    # ---- transforms -------------------------------------------------------------------------
    def _buf(self, role, shape):
        if role in _KEPT:
            return self.ws.get(self.xp, role, shape, self.dtype)
        return ARENA.get(shape, self.dtype)

    def _to_freq(self, images, mats, role):
        """(n, ch, R, S) -> spectrum (P, 2, Qf, n, ch): re/im planes, each frequency's (n, ch) contiguous.

        The width transform reads each image row in place: per row r it multiplies by the
        (S, n*ch) matrix x[:, :, r, :]^T, whose columns lie R*S apart, and BLAS takes that
        as a transposed operand; a transposing copy to (R, S, n, ch) first would cost a
        pass over the images that is as slow as the GEMM."""
        xp = self.xp
        dw, e = mats
        n, ch, r, s = images.shape
        spec = self._buf(role + "_f", (2 * self.P, self.qf * n * ch))
        with ARENA.scope():   # (the half-transformed planes are gone before the next step)
            half = self._buf(role + "_a", (r, 2 * self.qf, n * ch))
            xp.matmul(dw, images.reshape(n * ch, r, s).transpose(1, 2, 0), out=half)
            xp.matmul(e, half.reshape(2 * r, self.qf * n * ch), out=spec)
        return spec.reshape(self.P, 2, self.qf, n, ch)

    def _from_freq(self, spec, mats, role, out=None):
        """Spectrum (P, 2, Qf, n, ch) -> images at the matrices' output positions: written to
        ``out`` (n, ch, R, S) (the last GEMM writes each image row in place, as ``_to_freq``
        reads them), or returned as (R, S, n, ch)."""
        xp = self.xp
        e, dinv = mats
        P, _, qf, n, ch = spec.shape
        rows = e.shape[0] // 2
        half = self._buf(role + "_h", (2 * rows, qf * n * ch))
        xp.matmul(e, spec.reshape(2 * P, qf * n * ch), out=half)
        half = half.reshape(rows, 2 * qf, n * ch)
        if out is not None and out.flags.c_contiguous:
            xp.matmul(half.transpose(0, 2, 1), dinv.T,
                      out=out.reshape(n * ch, rows, dinv.shape[0]).transpose(1, 0, 2))
            return out
        images = self._buf(role + "_o", (rows, dinv.shape[0], n * ch))
        xp.matmul(dinv, half, out=images)
        images = images.reshape(rows, dinv.shape[0], n, ch)
        if out is not None:
            out[...] = images.transpose(2, 3, 0, 1)
        return images

    def _kernel_spectrum(self, weight, backward: bool):
        """G per frequency as (P, 1, Qf, G, ...) blocks: [Gr | Gi] (C/G, 2M/G) for Y, or
        [Gr^T | Gi^T] (M/G, 2C/G) for dX when ``backward``. Cheap (F x C/G x M), so each pass
        computes the one it needs instead of keeping both."""
        g, cg, mg = self.group, self.c // self.group, self.m // self.group
        kernel = weight.reshape(self.m, cg, self.kh, self.kw)
        rows, cols = (mg, cg) if backward else (cg, mg)
        blocks = self._buf("g", (self.P, self.qf, g, rows, 2, cols))
        with ARENA.scope():
            spec = self._to_freq(kernel.transpose(1, 0, 2, 3), self.fk, "k")  # (P, 2, Qf, cg, m)
            spec = spec.reshape(self.P, 2, self.qf, cg, g, mg)
            # fwd[k, l, gi] = [Gr | Gi] (cg, 2mg);  bwd[k, l, gi] = [Gr^T | Gi^T] (mg, 2cg)
            blocks[...] = spec.transpose((0, 2, 4, 5, 1, 3) if backward else (0, 2, 4, 3, 1, 5))
        return blocks.reshape(self.P, 1, self.qf, g, rows, 2 * cols)

    def _product(self, spec, blocks, out_ch, role, conj):
        """Per frequency and group: out = spec @ B (conj=False) or spec @ conj(B) (as laid out by
        _kernel_spectrum); spec (P, 2, Qf, n, G*k), result (P, 2, Qf, n, G*out_ch)."""
        P, _, qf, n, _ = spec.shape
        g = self.group
        out = self._buf(role, (P, 2, qf, n, g * out_ch))
        # In two halves of the frequencies: the products z (twice the result) take less memory.
        half = -(-P // 2)
        with ARENA.scope():
            z = self._buf(role + "_z", (half, 2, qf, n, 2 * out_ch))
            for p0 in range(0, P, half):
                def run(part, p0=p0):
                    rows = slice(p0 + part[0], p0 + part[1])
                    self._product_groups(spec[rows], blocks[rows], out_ch, out[rows],
                                         z[slice(*part)], conj)
                run_parts(run, self._parts(min(P, p0 + half) - p0, z[0].size))
        return out

    def _parts(self, rows: int, elements_each: int) -> list:
        """Parts of ``rows`` frequency rows for the cores (xp = numpy; one part on a GPU). The
        products per frequency are small GEMMs that BLAS runs on one core each."""
        return split(rows, elements_each) if self.xp is np else [(0, rows)]

    def _product_groups(self, spec, blocks, out_ch, out, z, conj) -> None:
        xp, g = self.xp, self.group
        k = spec.shape[-1] // g
        for gi in range(g):
            xp.matmul(spec[..., gi * k:(gi + 1) * k], blocks[:, :, :, gi], out=z)
            if xp is np and cpu_kernels.handles(z):   # (the passes below in one, compiled)
                cpu_kernels.complex_combine(z, out, gi * out_ch, conj)
                continue
            re, im = out[:, 0, ..., gi * out_ch:(gi + 1) * out_ch], out[:, 1, ..., gi * out_ch:(gi + 1) * out_ch]
            a_re, a_im = z[:, 0, ..., :out_ch], z[:, 0, ..., out_ch:]   # Re(spec) times [Br | Bi]
            b_re, b_im = z[:, 1, ..., :out_ch], z[:, 1, ..., out_ch:]   # Im(spec) times [Br | Bi]
            if conj:   # (a + ib)(Br - iBi) = (aBr + bBi) + i(bBr - aBi)
                xp.add(a_re, b_im, out=re)
                xp.subtract(b_re, a_im, out=im)
            else:      # (a + ib)(Br + iBi) = (aBr - bBi) + i(aBi + bBr)
                xp.subtract(a_re, b_im, out=re)
                xp.add(a_im, b_re, out=im)

    # ---- the layer's passes -------------------------------------------------------------------
    def forward(self, x, weight, bias, y) -> None:
        """y (N, M, Ho, Wo) = conv(x (N, C, H, W)) + bias."""
        with ARENA.scope():
            self._forward(x, weight, bias, y)

    def _forward(self, x, weight, bias, y) -> None:
        g_fwd = self._kernel_spectrum(weight, backward=False)
        self._x_spec = self._to_freq(x, self.fx, "x")
        self.x_ready = True
        y_spec = self._product(self._x_spec, g_fwd, self.m // self.group, "y_spec", conj=False)
        if bias is not None:
            # A constant b on every pixel is b*P*Q at frequency (0, 0): the inverse adds it for free.
            y_spec[0, 0, 0] += bias * (self.P * self.Q)
        self._from_freq(y_spec, self.iy, "y", out=y)

    def backward(self, x, weight, dy, dx, weight_blob, bias_blob=None) -> None:
        """dx (or None) = conv^T(dy); the weight and bias blobs' diffs += their gradients
        (each unless None). Reuses the spectra of the last forward."""
        with ARENA.scope():
            self._backward(x, weight, dy, dx, weight_blob, bias_blob)

    def _backward(self, x, weight, dy, dx, weight_blob, bias_blob) -> None:
        if dx is None and weight_blob is None:
            if bias_blob is not None:
                bias_blob.add_to_diff(dy.sum(axis=(0, 2, 3)))
            return
        if not self.x_ready and weight_blob is not None:
            self._x_spec = self._to_freq(x, self.fx, "x")
        self.x_ready = False
        dy_spec = self._to_freq(dy, self.fdy, "dy")  # (P, 2, Qf, N, M)
        if bias_blob is not None:
            # Frequency (0, 0) is the sum over the pixels: no pass over dy for the bias.
            bias_blob.add_to_diff(dy_spec[0, 0, 0].sum(axis=0))
        if weight_blob is not None:
            with ARENA.scope():
                self._weight_grad(dy_spec, weight_blob)
        if dx is not None:
            g_bwd = self._kernel_spectrum(weight, backward=True)
            dx_spec = self._product(dy_spec, g_bwd, self.c // self.group, "dx_spec", conj=True)
            self._from_freq(dx_spec, self.idx, "dx", out=dx)

    def _weight_grad(self, dy_spec, weight_blob) -> None:
        """weight_blob.diff += the kernel gradient dG = dY^T conj(X), summed over the batch."""
        xp = self.xp
        g, cg, mg = self.group, self.c // self.group, self.m // self.group
        P, qf = self.P, self.qf
        grad = self._buf("w_spec", (P, 2, qf, g, mg, cg))
        same = self._buf("w_same", (P, 2, qf, mg, cg))
        cross = self._buf("w_cross", (P, 2, qf, mg, cg))

        def run(part):   # the frequency rows ``part``
            rows = slice(*part)
            for gi in range(g):
                d = dy_spec[rows, ..., gi * mg:(gi + 1) * mg].swapaxes(-1, -2)  # (p, 2, Qf, mg, N)
                xs = self._x_spec[rows, ..., gi * cg:(gi + 1) * cg]               # (p, 2, Qf, N, cg)
                xp.matmul(d, xs, out=same[rows])            # [dYr^T Xr, dYi^T Xi]
                xp.matmul(d[:, ::-1], xs, out=cross[rows])  # [dYi^T Xr, dYr^T Xi]
                # dG = dY^T conj(X): re = dYr^T Xr + dYi^T Xi, im = dYi^T Xr - dYr^T Xi
                xp.add(same[rows, 0], same[rows, 1], out=grad[rows, 0, :, gi])
                xp.subtract(cross[rows, 0], cross[rows, 1], out=grad[rows, 1, :, gi])
        run_parts(run, self._parts(P, dy_spec[0].size + self._x_spec[0].size))
        kgrad = self._from_freq(grad.reshape(P, 2, qf, 1, self.m * cg), self.ik, "kg")
        weight_blob.add_to_diff(kgrad.reshape(self.kh, self.kw, self.m, cg)
                                .transpose(2, 3, 0, 1).reshape(weight_blob.shape))


def worth_it(n, c, m, group, in_spatial, kernel, out_spatial, pad) -> bool:
    """Use the DFT engine where the model expects it to be clearly faster, and its kernel
    spectra (about six arrays of F x C/G x M) need no more memory than im2col's columns."""
    gemm, dft = estimated_seconds(n, c, m, group, in_spatial, kernel, out_spatial, pad)
    (h, w), (ho, wo) = in_spatial, out_spatial
    P, Q = h + 2 * pad[0], w + 2 * pad[1]
    kernel_spectrum = 2 * P * (Q // 2 + 1) * (c // group) * m
    columns = c * math.prod(kernel) * n * ho * wo
    return dft < DFT_ADVANTAGE * gemm and 6 * kernel_spectrum <= columns


#: Required margin of the DFT engine's estimate (below 1: it must win clearly).
DFT_ADVANTAGE = 0.8
