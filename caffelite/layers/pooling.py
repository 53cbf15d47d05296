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
windows of a forward are combined at once (no copy of the first one). Phased
work goes through the planes in chunks whose phases fit the cache
(CHUNK_BYTES), in parts of the planes on all cores (cpu_threads.py), each part in
chunk buffers of its own. Work buffers are scratch from the arena all layers
share (im2col.ARENA), only the argmax offsets are kept from forward to backward;
padding is written around the copied pixels, not by a pass over the whole buffer.
Where the compiled CPU kernels are built (cpu_kernels.py), MAX and STOCHASTIC
backward is instead Caffe's own loop in C, one plane at a time, in parts of the
planes, reading the same kernel offsets; the NumPy backward above serves AVE and
builds without a compiler. On a CPU with AVX-512, float32 MAX forward and AVE
forward and backward are C too (pool_avx512.c: 16 outputs of a row at once,
straight from the bottom's planes), and the passes above are not used for them.

On a GPU, MAX and AVE (global pooling included) run instead as Caffe's CUDA kernels do
(caffelite/kernels/pooling.py): one thread per output forward, one per input element
backward, with the same results; MAX keeps its int32 argmax h*W + w per output for backward.
STOCHASTIC keeps the path above on every device.
"""
from __future__ import annotations

import math

import numpy as np

from ..registry import register_layer
from . import cpu_kernels
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
#: Phased work handles the planes in chunks whose phases take about this many bytes: less
#: scratch, and on 2 cores CIFAR-10 quick's pool1 ran 3.7/3.6 ms against 4.1/3.8 in one chunk
#: (smaller chunks lose: NumPy's ~50 calls per chunk, 10.3/9.6 ms with 256 KiB).
CHUNK_BYTES = 1 << 21


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
        # MAX and AVE in C with AVX-512 (pool_avx512.c) read the bottom's planes as they are: no
        # phases, no batch-last buffers. (AVE backward there takes horizontal strides 1 and 2 and
        # kernels up to 16 wide.)
        self.vectors = (not self.global_fast and self.xp is np and self.dtype == np.float32
                        and cpu_kernels.vector_bits() == 512
                        and (self.method == MAX
                             or self.method == AVE and self.stride[1] <= 2 and self.kernel[1] <= 16))
        self.pixels = Pixels(not self.global_fast and not self.vectors and prefers_batch_last(
            self.xp, self.planes, out, self.geometry, max_width=BATCH_LAST_MAX_WIDTH))
        self.phased = (not self.global_fast and not self.pixels.batch_last and not self.vectors
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
            self.tail = max(shift for _, _, shift in self.shifts)
        # With kernel <= stride tiling the image (no pad, sizes divisible) the grid is the top.
        self.grid_is_top = self.phased and self.phase_shape == out
        # Phased work and the compiled MAX backward (cpu_kernels.py) run in parts of whole planes,
        # one per core (cpu_threads.py); phased work goes through each part in chunks of planes.
        self.parts = split(self.planes, h * w) if self.xp is np else [(0, self.planes)]
        self.kernel_geometry = cpu_kernels.geometry(self.in_spatial, out, self.kernel, self.stride,
                                                    self.pad)
        if self.phased:
            phases = math.prod(self.stride) * math.prod(self.phase_shape) * self.dtype.itemsize
            self.chunk = max(1, min(CHUNK_BYTES // phases, max(b - a for a, b in self.parts)))
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

    def _fill_phases(self, buf, x, fill) -> None:
        """The images x (n, H, W) padded with ``fill`` and split into the phases of ``buf``
        (sh, sw, n planes' grid + tail); the tail, which the last plane's shifts read, = fill."""
        size = len(x) * math.prod(self.phase_shape)
        buf[:, :, size:size + self.tail] = fill
        for (a, b), pi, pj, xi, xj in self.phase_copies:
            phase = buf[a, b, :size].reshape((len(x),) + self.phase_shape)
            fill_outside(phase, (slice(None), pi, pj), fill)   # (scratch: no pass over the inside)
            phase[:, pi, pj] = x[:, xi, xj]

    def _per_part(self, role, dtype, lead=(), tail=0):
        """Each part's chunk buffer: (parts, *lead, chunk planes' grid + tail), scratch."""
        size = self.chunk * math.prod(self.phase_shape) + tail
        return self.ws.get(self.xp, role, (len(self.parts),) + tuple(lead) + (size,), dtype)

    def _in_chunks(self, step) -> None:
        """step(i, (start, stop)) for the chunks of planes of each part i, the parts at once."""
        def run(job):
            i, (start, stop) = job
            for first in range(start, stop, self.chunk):
                step(i, (first, min(stop, first + self.chunk)))
        run_parts(run, enumerate(self.parts))

    def _part(self, grid, planes):
        """Planes [start, stop) of a flat phased grid."""
        size = math.prod(self.phase_shape)
        return grid[planes[0] * size:planes[1] * size]

    def _crop(self, grid):
        """The (planes, Ho, Wo) outputs of a flat output grid (or of a part of it)."""
        return grid.reshape((-1,) + self.phase_shape)[:, :self.out_spatial[0], :self.out_spatial[1]]

    def _padded_input(self, x, fill):
        """Canonical (N*C, Hb, Wb) view of ``x`` padded with ``fill`` (a view when no pad is
        needed); not phased."""
        if self.direct and not self.pixels.batch_last:
            return x
        _, canon = self.pixels.alloc(self.ws, self.xp, f"pad{fill}", (), self.planes, self.padded,
                                     x.dtype)
        inside = (slice(None),) + self.geometry.interior(self.in_spatial)
        fill_outside(canon, inside, fill)
        copy_into(canon[inside], x, 0, self.pixels.batch_last)
        return canon

    def _output(self, top_array):
        """Where an unphased layer computes its output: the top itself or a batch-last buffer."""
        return self._scratch("out", top_array.dtype) if self.pixels.batch_last else top_array

    def _scratch(self, role, dtype):
        """An output-shaped work array in this layer's pixel order (phased: a flat grid)."""
        if self.phased:
            return self.ws.get(self.xp, role, (self.grid,), dtype)
        return self.pixels.alloc(self.ws, self.xp, role, (), self.planes, self.out_spatial, dtype)[1]

    def _index_buffer(self):
        """Argmax (or sampled) kernel offset per output."""
        return self._scratch("index", np.uint8 if math.prod(self.kernel) <= 256 else np.int32)

    def _windows(self, image, planes: int = 0):
        """(offset index, view of ``image`` for that kernel offset) for every offset; ``image``
        is a padded input (strided views) or the phases of ``planes`` planes (contiguous
        slices)."""
        g = self.geometry
        if self.phased:
            size = planes * math.prod(self.phase_shape)
            for i, (a, b, shift) in enumerate(self.shifts):
                yield i, image[a, b, shift:shift + size]
            return
        for i, offset in enumerate(g.offsets()):
            yield i, image[(slice(None),) + g.window(offset, self.out_spatial)]

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
            self._max(x, self.phase == TRAIN or len(top) > 1, y)
            if len(top) > 1:
                self._write_mask(self._planes(top[1].data))
        elif self.method == AVE:
            self._ave(x, y)
        else:
            self._stochastic(x, y)

    def _max(self, x, want_index: bool, y=None) -> None:
        """MAX pooling of x into the top y (None: only the argmax); with ``want_index`` the
        argmax offsets too."""
        if self.vectors:   # (the kernel writes the argmax whether wanted or not)
            out = y if y is not None else self._scratch("recompute", x.dtype)
            self._compiled(cpu_kernels.max_forward, x, out, self._index_buffer())
            self._index_ready = True
            return
        index = self._index_buffer() if want_index else None
        self._index_ready = want_index
        if not self.phased:
            out = self._output(y) if y is not None else self._scratch("recompute", x.dtype)
            work = (index, self._scratch("greater", bool), self._scratch("step", index.dtype)) \
                if want_index else (None,) * 3
            self._max_part(self._windows(self._padded_input(x, -np.inf)), out, *work)
            if y is not None and out is not y:
                y[...] = out
            return
        phases = self._per_part("phases", x.dtype, self.stride, self.tail)
        work = (self._per_part("greater", bool), self._per_part("step", index.dtype)) \
            if want_index else ()
        chunk_out = self._chunk_output(y)

        def step(i, planes):
            n = planes[1] - planes[0]
            self._fill_phases(phases[i], x[slice(*planes)], -np.inf)
            out = chunk_out(i, planes)
            size = len(out)
            self._max_part(self._windows(phases[i], n), out,
                           *((self._part(index, planes), *(w[i][:size] for w in work))
                             if want_index else (None,) * 3))
            if y is not None and not self.grid_is_top:
                y[slice(*planes)] = self._crop(out)
        self._in_chunks(step)

    def _chunk_output(self, y):
        """chunk_out(i, planes): the flat grid a chunk's outputs go to: the top's own planes when
        the grid is the top, else part i's chunk buffer (the caller crops it to the top)."""
        if self.grid_is_top and y is not None:
            flat = y.reshape(-1)
            return lambda i, planes: self._part(flat, planes)
        buffers = self._per_part("out", self.dtype)
        size = math.prod(self.phase_shape)
        return lambda i, planes: buffers[i][:(planes[1] - planes[0]) * size]

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
        """AVE pooling of x into the top y."""
        divisor = self._divisor_array(y.dtype)
        if self.vectors:
            self._compiled(cpu_kernels.ave_forward, x, y, divisor)
            return
        if not self.phased:
            out = self._output(y)
            self._ave_part(self._windows(self._padded_input(x, 0)), out)
            out /= divisor
            if out is not y:
                y[...] = out
            return
        phases = self._per_part("phases", x.dtype, self.stride, self.tail)
        chunk_out = self._chunk_output(y)

        def step(i, planes):
            self._fill_phases(phases[i], x[slice(*planes)], 0)
            out = chunk_out(i, planes)
            self._ave_part(self._windows(phases[i], planes[1] - planes[0]), out)
            self.xp.divide(self._crop(out), divisor, out=y[slice(*planes)])
        self._in_chunks(step)

    def _ave_part(self, windows, out) -> None:
        """out = the sum of the windows."""
        _, first = next(windows)
        if math.prod(self.kernel) == 1:
            out[...] = first
        for i, win in windows:
            if i == 1:   # (the first window is never copied)
                self.xp.add(first, win, out=out)
            else:
                out += win

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
            self._max(self._planes(bottom[0].data), True)
        if self.method != AVE and cpu_kernels.handles(dx, dy):
            self._backward_compiled(dy, dx)
            return
        if self.vectors:   # (AVE)
            self._compiled(cpu_kernels.ave_backward, dy, dx, self._divisor_array(dy.dtype))
            return
        divisor = self._divisor_array(dy.dtype) if self.method == AVE else None
        if self.phased:
            # Each part works in chunk buffers of its own.
            work = {"share": self._per_part("share", dy.dtype),
                    "acc": self._per_part("acc_phase", dx.dtype, tail=self.tail)}
            if self.method != AVE:
                work.update(hit=self._per_part("greater", bool),
                            dy=None if self.grid_is_top else self._per_part("dy", dy.dtype))
            index = None if self.method == AVE else self._index_buffer()
            self._in_chunks(lambda i, planes: self._backward_phased(
                dy, dx, divisor, index, {k: v if v is None else v[i] for k, v in work.items()}, planes))
        else:
            self._backward_windows(dy, dx, divisor)

    def _backward_compiled(self, dy, dx) -> None:
        """Caffe's backward loop, compiled (cpu_kernels.c): each output's gradient to its
        argmax (MAX) or sampled pixel (STOCHASTIC), in parts of the planes."""
        index = self._index_buffer()
        self._compiled(cpu_kernels.max_backward, dy, self._crop(index) if self.phased else index, dx)

    def _compiled(self, kernel, *arrays) -> None:
        """kernel(*arrays, planes, geometry) of cpu_kernels.py, for each part of the planes at once."""
        geom = self.kernel_geometry
        run_parts(lambda part: kernel(*arrays, part, geom), self.parts)

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
            grad = self._scratch("dy", dy.dtype)
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

    def _backward_phased(self, dy, dx, divisor, index, work, planes) -> None:
        """Backward of the chunk ``planes``, phased, in ``work`` (this part's chunk buffers): a
        phase's windows touch only that phase, so the phases are summed one at a time in one
        phase of scratch. The first window of a phase (shift 0) covers its whole grid and
        overwrites it; the tail past the grid only receives the grid's unused zeros."""
        xp = self.xp
        chunk = slice(*planes)
        shape = (planes[1] - planes[0],) + self.phase_shape
        size = math.prod(shape)
        outputs = (slice(None),) + tuple(slice(0, o) for o in self.out_spatial)

        def on_grid(name):
            """This chunk's flat work grid ``name``, its unused cells 0, as (planes, Hph, Wph)."""
            grid = work[name][:size].reshape(shape)
            fill_outside(grid, outputs, 0)
            return grid

        if self.method == AVE:
            share = on_grid("share")
            xp.divide(dy[chunk], divisor, out=share[outputs])
            add = self._adder(share.reshape(-1))
        else:
            if work["dy"] is None:
                grad = dy[chunk].reshape(-1)
            else:
                grad = on_grid("dy")
                grad[outputs] = dy[chunk]
                grad = grad.reshape(-1)
            add = self._adder(work["share"][:size], grad, self._part(index, planes), work["hit"][:size])
        acc = work["acc"][:size + self.tail]
        acc[size:] = 0
        for (a, b), pi, pj, xi, xj in self.phase_copies:
            if (a, b) in self.unwritten_phases:   # (kernel < stride: no window reaches it)
                acc[:size] = 0
            for k, (pa, pb, shift) in enumerate(self.shifts):
                if (pa, pb) == (a, b):
                    add(k, acc[shift:shift + size])
            dx[chunk, xi, xj] = acc[:size].reshape(shape)[:, pi, pj]
