"""Window geometry, im2col / col2im and reusable buffers for the vision layers.

A convolution over an image x of shape (N, C, *S) with kernel K (one size per
spatial axis) becomes one GEMM once the windows are unrolled into columns::

    col[c, k..., n, o...] = x_pad[n, c, o*s + k*d]        (C*prod(K), P),  P = N*prod(So)
    top                   = W (M, C*prod(K)) @ col          (M, P)

and col2im is the adjoint: every column entry is added back to the pixel it
came from. Both loop in Python over the prod(K) kernel offsets only; each step
moves a whole (C, N, *So) block with one strided slice, so no Python loop
touches the batch or the pixels, and no ``add.at`` is needed.

Internal buffers keep the "pixel" axes either batch-first (n, *spatial) or
batch-last (*spatial, n). NumPy pays a fixed cost per innermost run of a strided
copy, and the innermost run is the last output width in the first layout but
N x width in the second, so small feature maps (LeNet conv2, CIFAR-10 conv2/3) use
batch-last on the CPU; large maps and the GPU use batch-first, which needs no
transposes. Layers see one canonical axis order, (*lead, n, *spatial), through
views, so the choice never shows in their code.

Everything works with ``xp`` = numpy or cupy and keeps the input dtype.

Buffers that live only inside one layer call come, on the CPU, from one arena
shared by every layer (``ARENA``, through ``Scratch``), so a net's scratch needs
the memory of its largest layer call, not the sum over its layers.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import mmap
import threading
from dataclasses import dataclass

import numpy as np

#: Larger column buffers are filled in batch chunks to bound memory (elements).
MAX_COL_ELEMENTS = 1 << 25
#: Batch-last is used on the CPU for outputs at most this wide whose innermost
#: run it makes at least BATCH_LAST_GAIN times longer (measured on 2 CPU cores:
#: LeNet conv2 and CIFAR-10 conv2/3 gain 10-25%; 24+ wide maps and 1x1 kernels lose).
BATCH_LAST_MAX_WIDTH = 16
BATCH_LAST_GAIN = 4
#: Tests and benchmarks may force "batch_first" or "batch_last".
FORCE_LAYOUT: str | None = None


@dataclass(frozen=True)
class Geometry:
    """Kernel, stride, pad and dilation, one entry per spatial axis."""

    kernel: tuple
    stride: tuple
    pad: tuple
    dilation: tuple

    @property
    def extent(self) -> tuple:
        """Span of one dilated window: d(k-1)+1."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))

    @property
    def kernel_count(self) -> int:
        return math.prod(self.kernel)

    def conv_out(self, spatial) -> tuple:
        """floor((in + 2p - (d(k-1)+1)) / s) + 1 per axis."""
        return tuple((n + 2 * p - e) // s + 1
                     for n, p, e, s in zip(spatial, self.pad, self.extent, self.stride))

    def deconv_out(self, spatial) -> tuple:
        """s(in-1) + d(k-1) + 1 - 2p per axis (the transpose of ``conv_out``)."""
        return tuple(s * (n - 1) + e - 2 * p
                     for n, p, e, s in zip(spatial, self.pad, self.extent, self.stride))

    def offsets(self):
        """Kernel offsets in row-major order (Caffe's window order)."""
        return itertools.product(*(range(k) for k in self.kernel))

    def window(self, offset, out_spatial) -> tuple:
        """Slices of the padded image that kernel ``offset`` sees for every output."""
        return tuple(slice(k * d, k * d + s * (n - 1) + 1, s)
                     for k, d, s, n in zip(offset, self.dilation, self.stride, out_spatial))

    def interior(self, spatial) -> tuple:
        """Slices of the padded image that hold the real image."""
        return tuple(slice(p, p + n) for p, n in zip(self.pad, spatial))


class Workspace:
    """A layer's scratch arrays, reused across iterations and keyed by role and shape.

    A role keeps at most two shapes (a full and a last, smaller batch chunk).
    ``fill`` is applied when an array is created only: padded buffers keep their
    borders because callers overwrite just the interior.
    """

    def __init__(self):
        self._store: dict = {}

    def get(self, xp, role: str, shape: tuple, dtype, fill=None):
        key = (tuple(shape), np.dtype(dtype).str, xp.__name__)
        entries = self._store.setdefault(role, {})
        array = entries.get(key)
        if array is None:
            if len(entries) >= 2:
                entries.clear()
            array = xp.empty(shape, dtype) if fill is None else xp.full(shape, fill, dtype)
            entries[key] = array
        return array

    def clear(self) -> None:
        self._store.clear()


class Arena(threading.local):
    """Scratch arrays that live inside one layer call, shared by every layer of this thread.

    Layers run one at a time, so the scratch of a whole net needs only as much memory as
    the largest single call, as Caffe's one shared column buffer. Inside ``scope()`` each
    ``get`` hands out the next region of one flat byte buffer (the same one again for a
    role asked for twice with one shape and dtype); leaving a scope frees what it handed
    out, so a layer may nest scopes to give a step's buffers back early. The buffer grows
    to the largest scope seen (a scope that does not fit gets mappings of its own until
    the next one starts). Contents never survive a layer call: arrays a layer keeps from
    forward to backward must not come from here. NumPy only: CuPy's pool already reuses
    device memory.
    """

    ALIGN = 64   # bytes: every region starts on a cache line

    def __init__(self):
        self.block = np.empty(0, np.uint8)
        self.used = 0      # bytes handed out in the open scopes
        self.high = 0      # the most any scope needed
        self.depth = 0
        self.named: list = []   # per open scope: (role, shape, dtype) -> array

    @contextlib.contextmanager
    def scope(self):
        if self.depth == 0 and self.high > self.block.size:
            self.block = np.empty(0, np.uint8)   # (release the old block before the new one)
            self.block = _mapped(self.high)
        mark = self.used
        self.depth += 1
        self.named.append({})
        try:
            yield self
        finally:
            self.named.pop()
            self.depth -= 1
            self.used = mark

    def get(self, shape: tuple, dtype, fill=None, role: str | None = None) -> np.ndarray:
        """A (shape, dtype) array valid until the enclosing scope ends, filled when asked:
        fresh, or for a ``role`` the one this scope already gave that role."""
        if self.depth == 0:
            raise RuntimeError("Arena.get outside Arena.scope()")
        dtype = np.dtype(dtype)
        key = (role, tuple(shape), dtype.str)
        if role is not None and key in self.named[-1]:
            array = self.named[-1][key]
            if fill is not None:
                array.fill(fill)
            return array
        start = -(-self.used // self.ALIGN) * self.ALIGN
        end = start + math.prod(shape) * dtype.itemsize
        self.used = end
        self.high = max(self.high, end)
        if end <= self.block.size:
            array = self.block[start:end].view(dtype).reshape(shape)
        else:
            array = _mapped(end - start).view(dtype).reshape(shape)
        if role is not None:
            self.named[-1][key] = array
        if fill is not None:
            array.fill(fill)
        return array

    def nbytes(self) -> int:
        return self.block.size


def _mapped(nbytes: int) -> np.ndarray:
    """nbytes of fresh memory in a mapping of their own: given back to the system as soon as
    the last view goes (freed malloc memory can stay resident and raise the peak). Huge
    pages where the system allows, as NumPy asks for its large arrays (strided copies into
    a large buffer of small pages run ~30% slower on TLB misses)."""
    area = mmap.mmap(-1, max(nbytes, 1))
    if nbytes >= HUGE_PAGES_FROM and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            area.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return np.frombuffer(area, np.uint8)[:nbytes]


#: Mappings at least this large ask for huge pages (NumPy's threshold too).
HUGE_PAGES_FROM = 1 << 22


#: The thread's shared scratch (see Arena).
ARENA = Arena()


class Scratch:
    """A layer's buffers by role, as ``Workspace.get``: the roles in ``kept`` (which live from a
    forward to its backward) and everything off NumPy from the layer's own Workspace, the
    rest from ARENA, inside the layer call's ``ARENA.scope()``. An arena array is filled
    with ``fill`` on every get (a Workspace one only when created), so callers that can
    pass None and write just the border (``fill_outside``)."""

    def __init__(self, kept: tuple = ()):
        self.kept = frozenset(kept)
        self.own = Workspace()

    def get(self, xp, role: str, shape: tuple, dtype, fill=None):
        if xp is not np or role in self.kept:
            return self.own.get(xp, role, shape, dtype, fill)
        return ARENA.get(shape, dtype, fill, role)


def fill_outside(array, inner: tuple, value) -> None:
    """Set every element of ``array`` outside the box ``inner`` (unit-step slices of its
    leading axes) to ``value``: a padded buffer's border, without a pass over its interior."""
    for axis, part in enumerate(inner):
        start, stop, _ = part.indices(array.shape[axis])
        head = tuple(inner[:axis])
        if start > 0:
            array[head + (slice(0, start),)] = value
        if stop < array.shape[axis]:
            array[head + (slice(stop, None),)] = value


def _interior_index(geometry: Geometry, spatial) -> tuple:
    return (slice(None), slice(None)) + geometry.interior(spatial)


class Pixels:
    """Allocation of (*lead, n, *spatial) arrays in batch-first or batch-last memory order."""

    def __init__(self, batch_last: bool = False):
        self.batch_last = batch_last

    def shape(self, lead: tuple, n: int, spatial: tuple) -> tuple:
        """Physical shape of a canonical (*lead, n, *spatial) array."""
        return lead + ((tuple(spatial) + (n,)) if self.batch_last else ((n,) + tuple(spatial)))

    def alloc(self, ws: Workspace, xp, role: str, lead: tuple, n: int, spatial: tuple,
              dtype, fill=None):
        """Returns (physical array, canonical view (*lead, n, *spatial))."""
        phys = ws.get(xp, role, self.shape(lead, n, spatial), dtype, fill)
        return phys, self.canonical(xp, phys, len(lead))

    def canonical(self, xp, phys, lead: int):
        """Canonical view of a physical array with ``lead`` leading axes."""
        return xp.moveaxis(phys, -1, lead) if self.batch_last else phys


def copy_into(dst, src, axis: int, batch_last: bool) -> None:
    """dst[...] = src for canonical views whose batch axis is ``axis``.

    Into a batch-last buffer this is a transpose; when the source items lie a
    multiple of 2 KiB apart (power-of-two feature maps) the plain copy keeps
    hitting the same cache sets, and copying 8 items at a time is ~4x faster.
    """
    n = src.shape[axis]
    if not batch_last or n <= 8 or src.strides[axis] % 2048:
        dst[...] = src
        return
    head = (slice(None),) * axis
    for start in range(0, n, 8):
        block = head + (slice(start, start + 8),)
        dst[block] = src[block]


def prefers_batch_last(xp, n: int, out_spatial: tuple, geometry: Geometry,
                       max_width: int | None = None) -> bool:
    """True when batch-last gives NumPy much longer innermost runs (see module doc).

    Never for a pointwise (1x1, stride 1, no pad) kernel: batch-first lets it skip im2col.
    """
    if FORCE_LAYOUT is not None:
        return FORCE_LAYOUT == "batch_last" and n > 1
    g = geometry
    if all(k == 1 for k in g.kernel) and all(s == 1 for s in g.stride) and not any(g.pad):
        return False
    max_width = BATCH_LAST_MAX_WIDTH if max_width is None else max_width
    if xp is not np or n < 2 or not out_spatial or out_spatial[-1] > max_width:
        return False
    first = out_spatial[-1]
    last = n * (out_spatial[-1] if g.stride[-1] == 1 else 1)
    return last >= BATCH_LAST_GAIN * first


class Columns:
    """im2col / col2im for one layer, with its buffers.

    The "image" side is (n, C, *S) (a Convolution's bottom, a Deconvolution's
    top); the "column" side is (C*prod(K), P) with P = n*prod(So) pixels in this
    object's pixel order. ``plan`` picks that order and the batch chunk size.
    """

    def __init__(self, geometry: Geometry):
        self.g = geometry
        self.ws = Scratch()   # (on the CPU every buffer is scratch of one layer call)
        self.pixels = Pixels(False)
        self.chunk = 1

    def plan(self, xp, n: int, rows: int, out_spatial: tuple) -> list:
        """Choose pixel order and chunking for ``n`` items; returns [(start, stop), ...].

        ``rows`` = C*prod(K), the column buffer's height.
        """
        per_item = max(rows * math.prod(out_spatial), 1)
        self.chunk = max(1, min(n, MAX_COL_ELEMENTS // per_item))
        self.pixels = Pixels(prefers_batch_last(xp, self.chunk, out_spatial, self.g))
        return [(i, min(i + self.chunk, n)) for i in range(0, n, self.chunk)]

    # ---- image <-> pixel matrices ------------------------------------------
    def to_pixels(self, xp, a, role: str):
        """(n, C, *S) -> (C, n*prod(S)) in this object's pixel order (a copy)."""
        n, c, spatial = a.shape[0], a.shape[1], a.shape[2:]
        phys, canon = self.pixels.alloc(self.ws, xp, role, (c,), n, spatial, a.dtype)
        copy_into(canon, a.swapaxes(0, 1), 1, self.pixels.batch_last)
        return phys.reshape(c, -1)

    def from_pixels(self, xp, mat, out, bias=None) -> None:
        """Write (C, P) ``mat`` (+ ``bias`` per channel) into ``out`` of shape (n, C, *S)."""
        n, c, spatial = out.shape[0], out.shape[1], out.shape[2:]
        canon = self.pixels.canonical(xp, mat.reshape(self.pixels.shape((c,), n, spatial)), 1)
        dst = out.swapaxes(0, 1)
        if bias is None:
            dst[...] = canon
        else:
            xp.add(canon, bias.reshape((c,) + (1,) * (1 + len(spatial))), out=dst)

    def buffer(self, xp, role: str, shape: tuple, dtype):
        return self.ws.get(xp, role, shape, dtype)

    # ---- im2col / col2im ---------------------------------------------------
    def _padded_input(self, xp, x):
        """Canonical (C, n, *Sp) view of ``x`` with zero padding (a view when none is needed)."""
        g = self.g
        n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
        if not any(g.pad) and not self.pixels.batch_last:
            return x.swapaxes(0, 1)
        padded = tuple(s + 2 * p for s, p in zip(spatial, g.pad))
        _, canon = self.pixels.alloc(self.ws, xp, "pad", (c,), n, padded, x.dtype, fill=0)
        copy_into(canon[_interior_index(g, spatial)], x.swapaxes(0, 1), 1, self.pixels.batch_last)
        return canon

    def column_buffer(self, xp, n: int, channels: int, out_spatial: tuple, dtype):
        """The 'col' buffer (C*prod(K), n*prod(So)) and its canonical view (C, *K, n, *So)."""
        phys, canon = self.pixels.alloc(self.ws, xp, "col", (channels,) + self.g.kernel, n,
                                        out_spatial, dtype)
        return phys.reshape(channels * self.g.kernel_count, -1), canon

    def im2col(self, xp, x, out_spatial: tuple):
        """(n, C, *S) -> columns (C*prod(K), n*prod(So)), written to the 'col' buffer."""
        g = self.g
        src = self._padded_input(xp, x)
        col, canon = self.column_buffer(xp, x.shape[0], x.shape[1], out_spatial, x.dtype)
        everything = (slice(None), slice(None))
        for offset in g.offsets():
            canon[(slice(None),) + offset] = src[everything + g.window(offset, out_spatial)]
        return col

    def col2im(self, xp, col, out, bias=None) -> None:
        """Sum columns (C*prod(K), P) back into ``out`` (n, C, *S), overwriting it (+ bias)."""
        g = self.g
        n, c, spatial = out.shape[0], out.shape[1], out.shape[2:]
        out_spatial = g.conv_out(spatial)
        lead = (c,) + g.kernel
        cols = self.pixels.canonical(xp, col.reshape(self.pixels.shape(lead, n, out_spatial)), len(lead))
        dst = out.swapaxes(0, 1)
        direct = not any(g.pad) and not self.pixels.batch_last
        if direct:
            acc = dst
        else:
            padded = tuple(s + 2 * p for s, p in zip(spatial, g.pad))
            _, acc = self.pixels.alloc(self.ws, xp, "acc", (c,), n, padded, out.dtype)
        acc[...] = 0
        everything = (slice(None), slice(None))
        for offset in g.offsets():
            acc[everything + g.window(offset, out_spatial)] += cols[(slice(None),) + offset]
        bias = None if bias is None else bias.reshape((c,) + (1,) * (1 + len(spatial)))
        if direct:
            if bias is not None:
                dst += bias
        elif bias is None:
            dst[...] = acc[_interior_index(g, spatial)]
        else:
            xp.add(acc[_interior_index(g, spatial)], bias, out=dst)
