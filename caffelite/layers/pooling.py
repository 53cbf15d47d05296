"""Pooling (``pooling_param``): MAX, AVE and STOCHASTIC over 2-D windows.

Bottom (N, C, H, W) -> top (N, C, Ho, Wo); with MAX an optional second top
holds the argmax as a float index h*W + w into the input plane (Caffe's mask).
Output size, kernel k, stride s, pad p per axis::

    CEIL (default): Ho = ceil((H + 2p - k) / s) + 1     FLOOR: floor(...) + 1
    and when p > 0 and (Ho-1)*s >= H + p the last window (starting in the pad) is dropped.

Window (oh, ow) starts at oh*s - p. MAX takes the largest real pixel (padding
never wins; the first maximum in row-major window order on ties). AVE sums the
real pixels and divides by the window clipped to the padded image,
(min(hstart+k, H+p) - hstart) * (same for w). STOCHASTIC (no padding) samples a
pixel with probability proportional to its value in TRAIN and outputs the
activation-weighted mean sum(x^2)/sum(x) (0 when sum(x) <= 0) in TEST.
``global_pooling`` pools the whole plane.

The loop runs over the k*k kernel offsets only; each step handles every
window of the batch at once with a strided slice (see im2col.py for the
batch-first / batch-last buffer orders). With a stride s > 1 in batch-first
order the (padded) input is first split into its s_h x s_w phases
(rows r = a + s_h*i, columns c = b + s_w*j go to phase (a, b) at (i, j)),
each a flat (N*C*Hph*Wph) array. Kernel offset (kh, kw) then reads phase
(kh % s_h, kw % s_w) shifted by (kh // s_h) * Wph + kw // s_w: one contiguous
1-d slice, which NumPy processes about 10x faster than a stride-s view. The
outputs are computed on the whole (N*C, Hph, Wph) grid, (Ho, Wo) of it used;
when kernel <= stride tiles the image the grid is the top itself, written in
place. Backward sums the windows into phases again, one phase at a time (a
phase's windows touch only it, so one phase of scratch does): each phase's
unshifted window writes it whole, so no pass zeroes it first. The first two
windows of a forward are combined at once (no copy of the first one). Work
buffers are scratch from the arena all layers share (im2col.ARENA), only the
argmax offsets are kept from forward to backward; padding is written around the
copied pixels, not by a pass over the whole buffer.

On a GPU, MAX and AVE (global pooling included) run instead as Caffe's CUDA kernels do
(caffelite/kernels/pooling.py): one thread per output forward, one per input element
backward, with the same results; MAX keeps its int32 argmax h*W + w per output for backward.
STOCHASTIC keeps the path above on every device.
"""
from __future__ import annotations

import math

import numpy as np

from ..registry import register_layer
from .base import Layer, TRAIN, check_not_in_place
from .cpu_threads import run_parts, split
from .im2col import ARENA, Geometry, Pixels, Scratch, copy_into, fill_outside, prefers_batch_last

MAX, AVE, STOCHASTIC = 0, 1, 2   # PoolingParameter.PoolMethod
CEIL, FLOOR = 0, 1               # PoolingParameter.RoundMode
_METHODS = {MAX: "MAX", AVE: "AVE", STOCHASTIC: "STOCHASTIC"}
#: Pooling does few passes per element, so transposing to batch-last pays only
#: for the narrowest outputs, where the phase grid wastes most (measured on 2 CPU
#: cores: CIFAR-10 pool3, 4 wide, gains; LeNet pool2 is even; AlexNet pool5 (6)
#: and CIFAR-10 pool2 (8) run 1.7-2x faster phased).
BATCH_LAST_MAX_WIDTH = 4


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    """Caffe's output size along one axis (see the module doc)."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if pad > 0 and (out - 1) * stride >= size + pad:
        out -= 1
    return out


@register_layer("Pooling")
class PoolingLayer(Layer):
    num_bottom = 1
    num_top = (1, 2)
    param_name = "pooling_param"

    def setup(self, bottom, top):
        check_not_in_place(self, bottom, top)
        p = self.param
        self.method = p.pool
        if len(top) > 1 and self.method != MAX:
            raise self.error(f"only MAX pooling has a second (mask) top, this is {_METHODS[self.method]}",
                             hint="remove the second top")
        has_k, has_hw = p.HasField("kernel_size"), (p.HasField("kernel_h"), p.HasField("kernel_w"))
        self.global_pooling = p.global_pooling
        if self.global_pooling:
            if has_k or any(has_hw):
                raise self.error("with global_pooling: true the kernel size cannot be given",
                                 hint="remove kernel_size / kernel_h / kernel_w")
        elif has_k and any(has_hw):
            raise self.error("the kernel is kernel_size OR kernel_h and kernel_w, not both",
                             hint="keep one of them")
        elif not has_k and not all(has_hw):
            raise self.error("the kernel size is missing: give kernel_size, or both kernel_h and kernel_w",
                             hint="e.g. kernel_size: 2")
        for name in ("pad", "stride"):
            has, has_h, has_w = p.HasField(name), p.HasField(f"{name}_h"), p.HasField(f"{name}_w")
            if (has_h or has_w) and (has or not (has_h and has_w)):
                raise self.error(f"give {name} OR both {name}_h and {name}_w",
                                 hint=f"remove '{name}' or add the missing _h/_w field")
        self.kernel = (int(p.kernel_size),) * 2 if has_k else (int(p.kernel_h), int(p.kernel_w))
        self.pad = (int(p.pad_h), int(p.pad_w)) if p.HasField("pad_h") else (int(p.pad),) * 2
        self.stride = (int(p.stride_h), int(p.stride_w)) if p.HasField("stride_h") else (int(p.stride),) * 2
        if not self.global_pooling and min(self.kernel) <= 0:
            raise self.error(f"kernel dimensions cannot be zero, got {self.kernel}",
                             hint="set kernel_size to a positive value")
        if min(self.stride) <= 0:
            raise self.error(f"stride must be positive, got {self.stride}", hint="use stride: 1 or more")
        if self.global_pooling and (any(self.pad) or self.stride != (1, 1)):
            raise self.error("with global_pooling: true only pad = 0 and stride = 1 are allowed",
                             hint="remove pad and stride")
        if any(self.pad):
            if self.method == STOCHASTIC:
                raise self.error("padding is implemented only for MAX and AVE pooling",
                                 hint="remove pad, or use pool: MAX or AVE")
            if not self.global_pooling and any(p_ >= k for p_, k in zip(self.pad, self.kernel)):
                raise self.error(f"pad {self.pad} must be smaller than the kernel {self.kernel}",
                                 hint="reduce pad")
        # Scratch from the shared arena; the argmax offsets stay from forward to backward.
        self.ws = Scratch(kept=("index",))
        self.pixels = Pixels(False)
        self._divisor_key = None
        # GPU: MAX/AVE through the CUDA kernels; the argmax buffer is cached across iterations.
        self._gpu = self.device.is_gpu and self.method != STOCHASTIC
        self._argmax = None

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"the bottom must have 4 axes (num, channels, height, width), got {shape}",
                             hint="reshape the input to N x C x H x W")
        n, c, h, w = shape
        if self.global_pooling:
            self.kernel = (h, w)
        ceil_mode = self.param.round_mode == CEIL
        out = tuple(pooled_size(size, k, s, p, ceil_mode)
                    for size, k, s, p in zip((h, w), self.kernel, self.stride, self.pad))
        if min(out) <= 0:
            raise self.error(f"output size {out} is not positive for input {(h, w)} with kernel "
                             f"{self.kernel}, stride {self.stride}, pad {self.pad}",
                             hint="the input is smaller than the kernel: reduce kernel_size or add pad")
        self.in_spatial, self.out_spatial = (h, w), out
        self.planes = n * c
        for t in top:
            t.reshape((n, c) + out)
        self.geometry = Geometry(self.kernel, self.stride, self.pad, (1, 1))
        # Rows/columns the windows cover, padded image included (CEIL may run past it).
        self.padded = tuple(max(size + 2 * p, (o - 1) * s + k) for size, p, o, s, k
                            in zip((h, w), self.pad, out, self.stride, self.kernel))
        self.direct = self.padded == (h, w)
        # Whole-plane MAX/AVE are plain reductions; STOCHASTIC keeps the window loop.
        self.global_fast = self.global_pooling and self.method != STOCHASTIC
        self.pixels = Pixels(not self.global_fast and prefers_batch_last(
            self.xp, self.planes, out, self.geometry, max_width=BATCH_LAST_MAX_WIDTH))
        self.phased = (not self.global_fast and not self.pixels.batch_last
                       and self.method != STOCHASTIC and self.stride != (1, 1))
        if self.phased:
            # Phase (a, b) holds padded rows a, a+s, ... and columns b, b+s, ...
            self.phase_shape = tuple(-(-size // s) for size, s in zip(self.padded, self.stride))
            self.phase_copies = [self._phase_copy(a, b) for a in range(self.stride[0])
                                 for b in range(self.stride[1])]
            hph, wph = self.phase_shape
            self.grid = self.planes * hph * wph
            self.shifts = [(kh % self.stride[0], kw % self.stride[1],
                            (kh // self.stride[0]) * wph + kw // self.stride[1])
                           for kh, kw in self.geometry.offsets()]
            # Phases without an unshifted kernel offset (kernel < stride) get no window.
            self.unwritten_phases = [(a, b) for a in range(self.stride[0]) for b in range(self.stride[1])
                                     if a >= self.kernel[0] or b >= self.kernel[1]]
            # Past the last plane the shifted reads run into a tail of padding.
            self.phase_len = self.grid + max(shift for _, _, shift in self.shifts)
        # With kernel <= stride tiling the image (no pad, sizes divisible) the grid is the top.
        self.grid_is_top = self.phased and self.phase_shape == out
        # Phased work on the CPU runs in parts of whole planes, one per core (cpu_threads.py).
        self.parts = (split(self.planes, h * w) if self.phased and self.xp is np
                      else [(0, self.planes)])
        self._global_index = None
        self._index_ready = False

    # ---- helpers -----------------------------------------------------------
    def _planes(self, array):
        """(N, C, H, W) -> canonical (N*C, H, W)."""
        return array.reshape((self.planes,) + array.shape[2:])

    def _phase_copy(self, a: int, b: int):
        """(phase index, rows of the phase, columns of the phase, rows of x, columns of x) for
        the image pixels that land in phase (a, b)."""
        picks = []
        for start, size, s, p in ((a, self.in_spatial[0], self.stride[0], self.pad[0]),
                                  (b, self.in_spatial[1], self.stride[1], self.pad[1])):
            first = max(0, -(-(p - start) // s))        # first phase index on a real pixel
            last = (size - 1 + p - start) // s           # last one
            count = max(0, last - first + 1)
            x0 = start + s * first - p
            picks.append((slice(first, first + count), slice(x0, x0 + s * (count - 1) + 1, s) if count else
                          slice(0, 0)))
        (pi, xi), (pj, xj) = picks
        return (a, b), pi, pj, xi, xj

    def _phase_view(self, buf, a, b):
        """Phase (a, b) of a phases buffer as (N*C, Hph, Wph)."""
        return buf[a, b, :self.grid].reshape((self.planes,) + self.phase_shape)

    def _phases(self, x, fill, role):
        """The flat phases (sh, sw, grid + tail) of the padded input, padding = ``fill``: the
        tail here, each part's planes by ``_fill_phases``."""
        buf = self.ws.get(self.xp, role, self.stride + (self.phase_len,), x.dtype)
        buf[:, :, self.grid:] = fill
        return buf

    def _fill_phases(self, buf, x, fill, part) -> None:
        """Copy the planes ``part`` of x into their phases, padding = ``fill``."""
        planes = slice(*part)
        for (a, b), pi, pj, xi, xj in self.phase_copies:
            phase = self._phase_view(buf, a, b)[planes]
            fill_outside(phase, (slice(None), pi, pj), fill)   # (scratch: no pass over the inside)
            phase[:, pi, pj] = x[planes, xi, xj]

    def _part(self, work, part):
        """Planes [start, stop) of a work array: of a flat phased grid, or of (N*C, ...)."""
        start, stop = part
        if self.phased:
            size = math.prod(self.phase_shape)
            return work[start * size:stop * size]
        return work[start:stop]

    def _crop(self, grid):
        """The (planes, Ho, Wo) outputs of a flat output grid (or of a part of it)."""
        return grid.reshape((-1,) + self.phase_shape)[:, :self.out_spatial[0], :self.out_spatial[1]]

    def _store(self, out, y) -> None:
        """Copy the computed outputs ``out`` (a grid, or a batch-last buffer; of one part
        when phased) to the top (its planes)."""
        if self.grid_is_top:
            return   # computed in place (``_output``)
        if self.phased:
            y[...] = self._crop(out)
        elif out is not y:
            y[...] = out

    def _padded_input(self, x, fill):
        """Canonical (N*C, Hb, Wb) view of ``x`` padded with ``fill`` (a view when no pad is needed);
        when this layer works phased, the phases' buffer (see ``_phases``), still to be filled."""
        if self.phased:
            return self._phases(x, fill, f"phases{fill}")
        if self.direct and not self.pixels.batch_last:
            return x
        _, canon = self.pixels.alloc(self.ws, self.xp, f"pad{fill}", (), self.planes, self.padded,
                                     x.dtype)
        inside = (slice(None),) + self.geometry.interior(self.in_spatial)
        fill_outside(canon, inside, fill)
        copy_into(canon[inside], x, 0, self.pixels.batch_last)
        return canon

    def _output(self, top_array, role="out"):
        """Where to compute the output: the top itself, or a batch-last buffer / phased grid."""
        if self.grid_is_top and role == "out":
            return top_array.reshape(-1)   # (a recomputation must not touch the top: in-place layers)
        if self.pixels.batch_last or self.phased:
            return self._scratch(role, top_array.dtype)
        return top_array

    def _scratch(self, role, dtype, fill=None):
        """An output-shaped work array in this layer's pixel order (phased: a flat grid, with
        ``fill`` in the cells outside the outputs)."""
        if self.phased:
            grid = self.ws.get(self.xp, role, (self.grid,), dtype)
            if fill is not None:
                fill_outside(grid.reshape((self.planes,) + self.phase_shape),
                             (slice(None),) + tuple(slice(0, o) for o in self.out_spatial), fill)
            return grid
        return self.pixels.alloc(self.ws, self.xp, role, (), self.planes, self.out_spatial, dtype)[1]

    def _index_buffer(self):
        """Argmax (or sampled) kernel offset per output."""
        return self._scratch("index", np.uint8 if math.prod(self.kernel) <= 256 else np.int32)

    def _windows(self, image, part=None):
        """(offset index, view of ``image`` for that kernel offset) for every offset, over the
        planes ``part`` (all when None); ``image`` is a padded input (strided views) or its
        phases (contiguous slices)."""
        g = self.geometry
        start, stop = part or (0, self.planes)
        if self.phased:
            size = math.prod(self.phase_shape)
            for i, (a, b, shift) in enumerate(self.shifts):
                yield i, image[a, b, shift + start * size:shift + stop * size]
            return
        for i, offset in enumerate(g.offsets()):
            yield i, image[(slice(start, stop),) + g.window(offset, self.out_spatial)]

    def _overwrites(self, i: int) -> bool:
        """Whether backward writes kernel offset ``i``'s window instead of adding to it."""
        return self.phased and self.shifts[i][2] == 0

    def _divisor_array(self, dtype):
        """AVE pool sizes per output, clipped to the padded image (Caffe's rule)."""
        key = (self.in_spatial, self.out_spatial, np.dtype(dtype))
        if self._divisor_key != key:
            self._divisor_key = key
            sizes = []
            for size, k, s, p, o in zip(self.in_spatial, self.kernel, self.stride, self.pad,
                                        self.out_spatial):
                start = np.arange(o) * s - p
                sizes.append(np.minimum(start + k, size + p) - start)
            self._divisor = self.xp.asarray(np.outer(sizes[0], sizes[1]).astype(dtype))
        return self._divisor

    # ---- GPU (CUDA kernels) -------------------------------------------------
    def _gpu_geometry(self) -> tuple:
        return self.in_spatial + self.out_spatial + self.kernel + self.stride + self.pad

    def _argmax_buffer(self, shape):
        """The int32 argmax per output, reallocated only when the top shape changes."""
        if self._argmax is None or self._argmax.shape != tuple(shape):
            self._argmax = self.xp.empty(tuple(shape), np.int32)
        return self._argmax

    def _gpu_max_forward(self, x, y, want_index: bool, mask=None) -> None:
        from ..kernels import pooling as kernels

        kernels.max_pool_forward(x, y, self._gpu_geometry(),
                                 argmax=self._argmax_buffer(y.shape) if want_index else None,
                                 mask=mask, nan_first=self.global_pooling)
        self._index_ready = want_index

    def _forward_gpu(self, bottom, top) -> None:
        from ..kernels import pooling as kernels

        x, y = bottom[0].gpu_data(), top[0].data
        self._index_ready = False
        if self.method == MAX:
            self._gpu_max_forward(x, y, self.phase == TRAIN or len(top) > 1,
                                  mask=top[1].data if len(top) > 1 else None)
        else:
            kernels.ave_pool_forward(x, y, self._gpu_geometry())

    def _backward_gpu(self, top, bottom) -> None:
        from ..kernels import pooling as kernels

        dy, dx = top[0].gpu_diff(), bottom[0].diff
        if self.method == AVE:
            kernels.ave_pool_backward(dy, dx, self._gpu_geometry())
            return
        if not self._index_ready:
            # As the CPU path: no argmax kept by the forward (TEST phase), so find it again.
            scratch = self.ws.get(self.xp, "recompute", dy.shape, dy.dtype)
            self._gpu_max_forward(bottom[0].gpu_data(), scratch, True)
        kernels.max_pool_backward(dy, self._argmax, dx, self._gpu_geometry())

    # ---- forward -----------------------------------------------------------
    def forward(self, bottom, top):
        if self._gpu:
            self._forward_gpu(bottom, top)
            return
        with ARENA.scope():
            self._forward_cpu(bottom, top)

    def _forward_cpu(self, bottom, top) -> None:
        x = self._planes(bottom[0].data)
        y = self._planes(top[0].data)
        self._index_ready = False
        if self.global_fast:
            self._forward_global(x, y, top)
        elif self.method == MAX:
            self._max(x, self._output(y), self.phase == TRAIN or len(top) > 1, y)
            if len(top) > 1:
                self._write_mask(self._planes(top[1].data))
        elif self.method == AVE:
            self._ave(x, y)
        else:
            self._stochastic(x, y)

    def _max(self, x, out, want_index: bool, y=None) -> None:
        """MAX pooling of x into ``out`` (see ``_output``), then into the top y unless None; with
        ``want_index`` the argmax offsets too. Phased, in parts of planes at once."""
        image = self._padded_input(x, -np.inf)
        work = (None,) * 3
        if want_index:
            index = self._index_buffer()
            work = (index, self._scratch("greater", bool), self._scratch("step", index.dtype))
        store = y is not None and out is not y

        def run(part):
            if self.phased:
                self._fill_phases(image, x, -np.inf, part)
            part_out = self._part(out, part)
            self._max_part(self._windows(image, part), part_out,
                           *(None if a is None else self._part(a, part) for a in work))
            if store:
                self._store(part_out, y[slice(*part)])
        run_parts(run, self.parts)
        self._index_ready = want_index

    def _max_part(self, windows, out, index, greater, step) -> None:
        xp = self.xp
        _, first = next(windows)
        if math.prod(self.kernel) == 1:
            out[...] = first
        if index is None:
            for i, win in windows:
                xp.maximum(first if i == 1 else out, win, out=out)
            return
        # Masked copies branch on random masks and are slow; arithmetic is not.
        # A strictly greater value at offset i (offsets increase) makes the
        # index i, so the first maximum in window order wins, as in Caffe.
        if math.prod(self.kernel) == 1:
            index[...] = 0
        for i, win in windows:
            if i == 1:   # offsets 0 and 1 at once: no copy of the first window, no zeroing
                xp.greater(win, first, out=greater)
                xp.maximum(first, win, out=out)
                xp.multiply(greater, index.dtype.type(1), out=index, casting="unsafe")
                continue
            xp.greater(win, out, out=greater)
            xp.maximum(out, win, out=out)
            xp.multiply(greater, index.dtype.type(i), out=step, casting="unsafe")
            xp.maximum(index, step, out=index)

    def _ave(self, x, y) -> None:
        """AVE pooling of x into the top y; phased, in parts of planes at once."""
        xp = self.xp
        out = self._output(y)
        image = self._padded_input(x, 0)
        divisor = self._divisor_array(y.dtype)

        def run(part):
            if self.phased:
                self._fill_phases(image, x, 0, part)
            part_out = self._part(out, part)
            windows = self._windows(image, part)
            _, first = next(windows)
            if math.prod(self.kernel) == 1:
                part_out[...] = first
            for i, win in windows:
                if i == 1:   # (the first window is never copied)
                    xp.add(first, win, out=part_out)
                else:
                    part_out += win
            if self.phased:
                xp.divide(self._crop(part_out), divisor, out=y[slice(*part)])
            else:
                part_out /= divisor
        run_parts(run, self.parts)
        if not self.phased:
            self._store(out, y)

    def _write_mask(self, mask) -> None:
        """Argmax kernel offsets -> flat input indices h*W + w, as floats."""
        xp = self.xp
        index = self._index_buffer()
        index = (self._crop(index) if self.phased else index).astype(np.int32)
        kw = self.kernel[1]
        width = self.in_spatial[1]
        rows = np.arange(self.out_spatial[0]) * self.stride[0] - self.pad[0]
        cols = np.arange(self.out_spatial[1]) * self.stride[1] - self.pad[1]
        base = xp.asarray((rows[:, None] * width + cols[None, :]).astype(np.int32))
        mask[...] = base + (index // kw) * width + index % kw

    def _forward_global(self, x, y, top) -> None:
        flat = x.reshape(self.planes, -1)
        out = y.reshape(self.planes)
        if self.method == MAX:
            self._global_index = flat.argmax(axis=1)
            out[...] = flat[self.xp.arange(self.planes), self._global_index]
            if len(top) > 1:
                self._planes(top[1].data).reshape(self.planes)[...] = self._global_index
        elif self.method == AVE:
            out[...] = flat.sum(axis=1) / flat.shape[1]

    def _stochastic(self, x, y) -> None:
        """TRAIN: sample a pixel by value; TEST: sum(x^2) / sum(x), 0 if sum(x) <= 0."""
        xp = self.xp
        src = self._padded_input(x, 0)
        out = self._output(y)
        if self.phase != TRAIN:
            total = xp.zeros_like(out)
            squares = xp.zeros_like(out)
            for _, win in self._windows(src):
                total += win
                squares += win * win
            positive = total > 0
            out[...] = xp.where(positive, squares / xp.where(positive, total, 1), 0)
        else:
            total = xp.zeros_like(out)
            for _, win in self._windows(src):
                total += win
            threshold = xp.asarray(self.rng.random(out.shape).astype(out.dtype)) * total
            index = self._index_buffer()
            index[...] = 0
            out[...] = 0
            cumulative = xp.zeros_like(out)
            done = xp.zeros(out.shape, bool)
            for i, win in self._windows(src):
                cumulative += win
                hit = (cumulative >= threshold) & ~done
                out += hit * win
                xp.maximum(index, hit.astype(index.dtype) * index.dtype.type(i), out=index)
                done |= hit
            self._index_ready = True
        if out is not y:
            y[...] = out

    # ---- backward ----------------------------------------------------------
    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if self._gpu:
            self._backward_gpu(top, bottom)
            return
        with ARENA.scope():
            self._backward_cpu(top, bottom)

    def _backward_cpu(self, top, bottom) -> None:
        xp = self.xp
        dx = self._planes(bottom[0].diff)
        dy = self._planes(top[0].diff)
        if self.global_fast:
            flat = dx.reshape(self.planes, -1)
            if self.method == AVE:
                flat[...] = dy.reshape(self.planes, 1) / flat.shape[1]
            else:
                flat[...] = 0
                flat[xp.arange(self.planes), self._global_index] = dy.reshape(self.planes)
            return
        if self.method != AVE and not self._index_ready:
            if self.method == STOCHASTIC:
                raise self.error("STOCHASTIC pooling has a gradient only in the TRAIN phase",
                                 hint="run backward after a TRAIN forward")
            self._max(self._planes(bottom[0].data),
                      self._output(self._planes(top[0].data), role="recompute"), True)
        divisor = self._divisor_array(dy.dtype) if self.method == AVE else None
        if self.phased:
            # Each part works in its planes of whole-grid scratch, and in its own stretch of the
            # accumulator (its planes plus a tail): parts cost no more memory than one.
            work = {"share": self._scratch("share", dy.dtype)}
            if self.method != AVE:
                work.update(index=self._index_buffer(), hit=self._scratch("greater", bool),
                            dy=None if self.grid_is_top else self._scratch("dy", dy.dtype))
            tail = self.phase_len - self.grid
            acc = self.ws.get(xp, "acc_phase", (self.grid + len(self.parts) * tail,), dx.dtype)
            run_parts(lambda job: self._backward_phased(dy, dx, divisor, work, acc, *job),
                      enumerate(self.parts))
        else:
            self._backward_windows(dy, dx, divisor)

    def _adder(self, share, grad=None, index=None, hit=None):
        """add(i, window): kernel offset i's gradient into its window of the accumulator. AVE:
        ``share`` is dy / pool size; MAX and STOCHASTIC: grad where ``index`` is i, with
        ``share`` and ``hit`` as work arrays."""
        xp = self.xp
        if self.method == AVE:
            def add(i, win):
                if self._overwrites(i):
                    win[...] = share
                else:
                    win += share
            return add

        def add(i, win):
            xp.equal(index, i, out=hit)
            if self._overwrites(i):
                xp.multiply(grad, hit, out=win)
            else:
                xp.multiply(grad, hit, out=share)
                win += share
        return add

    def _backward_windows(self, dy, dx, divisor) -> None:
        """Backward of the unphased layouts: every window summed into one padded accumulator."""
        xp = self.xp
        if self.pixels.batch_last:
            grad = self._output(dy, role="dy")
            copy_into(grad, dy, 0, True)
        else:
            grad = dy
        if self.direct and not self.pixels.batch_last:
            acc = dx
        else:
            acc = self.pixels.alloc(self.ws, xp, "acc", (), self.planes, self.padded, dx.dtype)[1]
        acc[...] = 0
        if self.method == AVE:
            add = self._adder(grad / divisor)
        else:
            add = self._adder(self._scratch("share", grad.dtype), grad, self._index_buffer(),
                              self._scratch("greater", bool))
        for i, win in self._windows(acc):
            add(i, win)
        if acc is not dx:
            dx[...] = acc[(slice(None),) + self.geometry.interior(self.in_spatial)]

    def _backward_phased(self, dy, dx, divisor, work, acc, i, part) -> None:
        """Backward of the planes ``part`` (the i-th), phased: a phase's windows touch only that
        phase, so the phases are summed one at a time in one phase of scratch. The first window
        of a phase (shift 0) covers its whole grid and overwrites it; the tail past the grid
        only receives the grid's unused zeros."""
        xp = self.xp
        planes = slice(*part)
        shape = (part[1] - part[0],) + self.phase_shape
        size = math.prod(shape)
        outputs = (slice(None),) + tuple(slice(0, o) for o in self.out_spatial)

        def on_grid(name):
            """This part's planes of a flat work grid, its unused cells 0, as (planes, Hph, Wph)."""
            grid = self._part(work[name], part).reshape(shape)
            fill_outside(grid, outputs, 0)
            return grid

        if self.method == AVE:
            share = on_grid("share")
            xp.divide(dy[planes], divisor, out=share[outputs])
            add = self._adder(share.reshape(-1))
        else:
            if work["dy"] is None:
                grad = dy[planes].reshape(-1)
            else:
                grad = on_grid("dy")
                grad[outputs] = dy[planes]
                grad = grad.reshape(-1)
            add = self._adder(self._part(work["share"], part), grad,
                              self._part(work["index"], part), self._part(work["hit"], part))
        tail = self.phase_len - self.grid
        start = part[0] * math.prod(self.phase_shape) + i * tail
        acc = acc[start:start + size + tail]
        acc[size:] = 0
        for (a, b), pi, pj, xi, xj in self.phase_copies:
            if (a, b) in self.unwritten_phases:   # (kernel < stride: no window reaches it)
                acc[:size] = 0
            for k, (pa, pb, shift) in enumerate(self.shifts):
                if (pa, pb) == (a, b):
                    add(k, acc[shift:shift + size])
            dx[planes, xi, xj] = acc[:size].reshape(shape)[:, pi, pj]
