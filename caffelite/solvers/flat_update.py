"""The whole SGD / Nesterov update in one GPU kernel, over flat parameter buffers.

Per parameter, an update is a few small kernel launches (the fused update, then W -= diff);
ResNet-50 has 161 learnable blobs, so the update alone cost 26 ms a step on an H100, most of it
launching. Here every learnable parameter's data, diff and history become views into three flat
device buffers (an "arena" each), and one elementwise kernel updates them all::

    g = diff / iter_size + decay * W        decay = weight_decay * decay_mult   (L2)
    SGD:       V = m * V + (rate * lr_mult) * g;           step = V
    Nesterov:  V' = m * V + (rate * lr_mult) * g;          step = (1 + m) * V' - m * V;  V = V'
    diff = step;  W -= step

lr_mult and decay are per-element arrays made once. It is the per-parameter path's arithmetic
(sgd.py, update.py, Net.update) in one pass. Used on a GPU for SGD and Nesterov without
gradient clipping or L1 regularisation; other set-ups keep the per-parameter path.

With mixed precision the arenas hold the float32 master weights, their diffs and the history,
and two more hold the net's compute-dtype parameters and gradients at the same offsets; the
update then unscales, checks for overflow and moves the loss scale on the device too
(kernels/mixed.py), so an iteration needs no host round trip and can be a CUDA graph.

A blob whose memory was replaced since the arena was built (``blob.data = array``) makes the
arena rebuild itself before the next update, so the update never writes to stale memory.
"""
from __future__ import annotations

import numpy as np

from ..blob import HEAD_GPU
from ..kernels import fused_kernel, mixed

_KERNELS = {
    "SGD": ("T momentum, raw T rate, T norm, T lr_mult, T decay", "T w, T history, T diff",
            "T g = diff * norm + decay * w; history = momentum * history + (rate[0] * lr_mult) * g; "
            "diff = history; w -= history;", "caffelite_flat_sgd"),
    "Nesterov": ("T momentum, raw T rate, T norm, T lr_mult, T decay", "T w, T history, T diff",
                 "T g = diff * norm + decay * w; T previous = history; "
                 "history = momentum * history + (rate[0] * lr_mult) * g; "
                 "T step = (1 + momentum) * history - momentum * previous; diff = step; w -= step;",
                 "caffelite_flat_nesterov"),
}


#: Each blob's view starts on a 256-byte boundary, as cudaMalloc's memory does (cuDNN and
#: cuBLAS refuse or slow down on misaligned pointers).
ALIGN_BYTES = 256


def _offsets(memories, step: int) -> tuple[list[int], int]:
    """Each memory's start in an arena: a multiple of ``step`` elements."""
    offsets, total = [], 0
    for memory in memories:
        offsets.append(total)
        total += -(-memory.capacity // step) * step
    return offsets, total


def arena(xp, memories, dtype, step: int | None = None):
    """Copy each SyncedMemory's values into one flat device buffer and make each a view of it
    (aligned; the gaps hold zeros); returns the buffer and the views' offsets. Arenas built with
    the same ``step`` (elements) over memories of the same sizes share their offsets."""
    offsets, total = _offsets(memories, step or max(ALIGN_BYTES // np.dtype(dtype).itemsize, 1))
    flat = xp.zeros(total, dtype)
    for memory, offset in zip(memories, offsets):
        view = flat[offset:offset + memory.capacity]
        if not memory.zero_pending:
            view[...] = memory.mutable_gpu()
        memory.assign(view)
    return flat, offsets


def _unique(memories):
    seen, out = set(), []
    for memory in memories:
        if id(memory) not in seen:
            seen.add(id(memory))
            out.append(memory)
    return out


class FlatUpdate:
    """One solver's parameters in arenas, and its one-kernel update (module doc)."""

    @staticmethod
    def applies(solver) -> bool:
        p = solver.param
        return (solver.device.is_gpu and type(solver).__name__ in ("SGDSolver", "NesterovSolver")
                and p.clip_gradients < 0 and (p.regularization_type == "L2" or p.weight_decay == 0)
                and (solver.mixed is None or solver.dtype == np.float32))

    def __init__(self, solver):
        self.solver = solver
        self.kind = "SGD" if type(solver).__name__ == "SGDSolver" else "Nesterov"
        self.rate = solver._xp.zeros(1, solver.dtype)  # a device scalar: a CUDA graph replay reads it
        self.mixed = solver.mixed
        if self.mixed is not None:
            self.mixed.to_device()
        self._build()

    def _build(self) -> None:
        solver = self.solver
        xp, dtype = solver._xp, solver.dtype
        params = solver.learnable_params  # with mixed precision: the float32 masters
        n = len(params)
        self.data_mem = _unique([b._data for b in params])
        self.diff_mem = _unique([b._diff for b in params])
        if len(self.data_mem) != n or len(self.diff_mem) != n:
            raise RuntimeError("learnable parameters share memory")  # Net lists each owner once
        self.hist_mem = [b._data for b in solver.history[:n]]
        groups = [self.data_mem, self.diff_mem, self.hist_mem]
        dtypes = [dtype] * 3
        if self.mixed is not None:  # the net's compute-dtype copies, at the masters' offsets
            groups += [[b._data for b in solver.net.learnable_params],
                       [b._diff for b in solver.net.learnable_params]]
            dtypes += [self.mixed.compute_dtype] * 2
        step = max(ALIGN_BYTES // min(np.dtype(d).itemsize for d in dtypes), 1)
        self.memories = tuple(m for group in groups for m in group)
        arenas = [arena(xp, group, d, step) for group, d in zip(groups, dtypes)]
        offsets = arenas[0][1]
        self.w, self.diff, self.history = (a for a, _ in arenas[:3])
        self.net_w, self.net_diff = (a for a, _ in arenas[3:]) if self.mixed is not None else (None, None)
        lr, decay = np.zeros(self.w.size, dtype), np.zeros(self.w.size, dtype)  # gaps: never move
        for i, (offset, blob) in enumerate(zip(offsets, params)):
            lr[offset:offset + blob.count] = solver._dt(solver.net.params_lr[i])
            decay[offset:offset + blob.count] = solver.local_decay(i)
        self.lr_mult, self.decay = xp.asarray(lr), xp.asarray(decay)
        self._pointers = self._current_pointers()

    def _current_pointers(self):
        return [m._gpu.data.ptr if m._gpu is not None else 0 for m in self.memories]

    def moved(self) -> bool:
        """Whether a parameter blob was given memory outside the arenas since they were made."""
        return any(m._gpu is None or m._gpu.data.ptr != p for m, p in zip(self.memories, self._pointers))

    def set_rate(self, rate) -> None:
        """This iteration's learning rate (and, with mixed precision, its number, which an
        overflow is logged with) into device scalars: kernel arguments, no copy, no sync."""
        self.rate.fill(self.solver._dt(rate))
        if self.mixed is not None:
            self.mixed.iteration.fill(self.solver.iter)

    def apply(self, rate=None) -> None:
        """One update with learning rate ``rate`` (the lr policy's value this iteration; None:
        the one ``set_rate`` gave, as in a CUDA graph capture)."""
        if rate is not None:
            self.set_rate(rate)
        if self.moved():
            self._build()  # a blob was given new memory
        for memory in self.memories:
            # Values written on the host, or pending zeros (a parameter no backward reached),
            # go to the device first; the kernel below then writes every buffer on the device.
            if memory.head != HEAD_GPU or memory.zero_pending:
                memory.mutable_gpu()
        s = self.solver
        momentum, norm = s._dt(s.param.momentum), s._dt(1) / s._dt(s.param.iter_size)
        if self.mixed is None:
            fused_kernel(s._xp, *_KERNELS[self.kind])(
                momentum, self.rate, norm, self.lr_mult, self.decay, self.w, self.history, self.diff)
            return
        m = self.mixed
        mixed.check_finite(self.net_diff, m.overflow)
        mixed.mixed_update(overflow=m.overflow, state=m.device_state, rate=self.rate, momentum=momentum,
                           norm=norm, nesterov=self.kind == "Nesterov", lr_mult=self.lr_mult,
                           decay=self.decay, grad=self.net_diff, w=self.w, history=self.history,
                           diff=self.diff, w_net=self.net_w)
        m.scaler_step()


__all__ = ["FlatUpdate", "arena"]
