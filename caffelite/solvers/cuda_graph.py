"""A training iteration on a GPU replayed as one CUDA graph.

A step of a small net (LeNet: ~100 kernels) costs the host more time to launch than the GPU
needs to run it. Caffe's nets have fixed shapes, so after one ordinary iteration caffelite
records the rest of an iteration once, with CUDA stream capture, and from then on launches the
recording: one call instead of hundreds. What is recorded, and what still runs in Python::

    each iteration, in Python   the data layers' forward (the leading layers without bottoms:
                                they copy the next batch from the host into their tops); each
                                layer's ``refresh_device_inputs`` (Dropout's seed); the learning
                                rate into the update's device scalar
    recorded (the graph)        every other layer's forward, the loss, backward, and the
                                one-kernel parameter update (flat_update.py; with mixed
                                precision also the overflow check and the loss scale's change)
    after each replay           the loss and the layers' deferred checks (labels in range) are
                                copied out, so that the next replay cannot overwrite them before
                                they are read; every blob's host copy is marked stale

Memory the recording uses comes from a pool of its own, which nothing else allocates from, so
no other array can be given an address the graph writes to. A change of the data's shape, or a
parameter blob given new memory, records again. The graph is used only where it is exact:
SGD or Nesterov through flat_update (float32 or mixed precision), iter_size 1, no Python or
HDF5Output layer, no net hooks (debug_info) and no callback that changes the gradients
(``on_gradients_ready``: multi-process training); anything else trains as before.
``CAFFELITE_CUDA_GRAPH=0`` turns it off.

Everything the solver does runs on one blocking CUDA stream of its own while it trains (tests
and snapshots included), so work outside the graph stays ordered with the replays.
"""
from __future__ import annotations

import logging
import os

from ..backend import DEFERRED
from ..blob import HEAD_GPU, SYNCED
from ..errors import CaffeliteError

log = logging.getLogger(__name__)

UNSAFE_TYPES = frozenset({"Python", "HDF5Output"})


def _enabled() -> bool:
    return os.environ.get("CAFFELITE_CUDA_GRAPH", "1").strip() not in ("0", "", "false", "no")


class StepGraph:
    """The recorded iteration of one solver (module doc)."""

    @staticmethod
    def applies(solver) -> bool:
        net = solver.net
        if not (_enabled() and solver.device.is_gpu and solver._flat is not None
                and solver.param.iter_size == 1
                and not any(hasattr(c, "on_gradients_ready") for c in solver.callbacks)
                and not net.after_forward and not net.after_backward):
            return False
        if any(layer.type in UNSAFE_TYPES for layer in net.layers):
            return False
        prefix = _data_prefix(net)
        return all(net.bottom_vecs[i] for i in range(prefix, len(net.layers)))

    def __init__(self, solver, stream):
        self.solver = solver
        self.cp = solver._xp
        self.stream = stream
        self.pool = self.cp.cuda.MemoryPool()
        self.prefix = _data_prefix(solver.net)
        self.graph = None
        self.shapes = None
        self.loss = None
        self.deferred: list = []
        self.written: list = []  # SyncedMemory of every blob a replay may write
        self.refreshers = [layer for layer in solver.net.layers
                           if type(layer).refresh_device_inputs is not _base_refresh()]
        self.failed = False

    # ---- one iteration ----------------------------------------------------------------------------
    def run(self) -> bool:
        """Run the data layers, then the rest of the iteration as the graph: True. False when
        the rest must run the ordinary way, from layer ``prefix`` on (the first iteration at
        new shapes, or a recording CUDA refused)."""
        solver, net = self.solver, self.solver.net
        for i in range(self.prefix):
            layer = net.layers[i]
            layer.reshape(net.bottom_vecs[i], net.top_vecs[i])
            layer.forward(net.bottom_vecs[i], net.top_vecs[i])
        shapes = tuple(tuple(blob.shape) for i in range(self.prefix) for blob in net.top_vecs[i])
        if solver._flat.moved():  # a parameter got new memory: an ordinary iteration, then record again
            shapes = None
        if self.graph is None or shapes != self.shapes:
            if self.shapes != shapes:  # first sight of these shapes: an ordinary iteration first
                self.shapes, self.graph = shapes, None
                return False
            if not self._record():
                self.failed = True
                return False
        solver._flat.set_rate(solver.update_rate())
        for layer in self.refreshers:
            layer.refresh_device_inputs()
        self.graph.launch(self.stream)
        for memory in self.written:  # the replay wrote them on the device behind the Blobs' back
            if memory.head == SYNCED:
                memory.head = HEAD_GPU
        solver._pending_losses.append((solver.iter, self.loss.copy()))
        for flag, details, make_error in self.deferred:
            DEFERRED.add(flag.copy(), tuple(d.copy() for d in details), make_error)
        return True

    def _record(self) -> bool:
        solver, net, cp = self.solver, self.solver.net, self.cp
        pending = len(DEFERRED._items)
        net.clear_param_diffs()
        self.pool.free_all_blocks()
        with cp.cuda.using_allocator(self.pool.malloc):
            self.stream.begin_capture()
            try:
                loss = net.forward(start=self.prefix, host_loss=False)
                net.backward()
                solver._flat.apply()
            except CaffeliteError:
                self._abandon(pending)
                raise
            except Exception as exc:  # a CUDA call that cannot be recorded: train step by step
                self._abandon(pending)
                log.warning("net '%s': the training iteration cannot be recorded as a CUDA graph "
                            "(%s: %s); iterations run layer by layer", net.name, type(exc).__name__, exc)
                return False
            graph = self.stream.end_capture()
        self.graph, self.loss = graph, loss
        blobs = [*net.blobs.values(), *(b for layer in net.layers for b in layer.blobs),
                 *solver.learnable_params, *solver.history]  # the float32 masters, if mixed
        self.written = list({id(m): m for b in blobs for m in (b._data, b._diff)}.values())
        self.deferred = DEFERRED._items[pending:]
        del DEFERRED._items[pending:]  # recorded, not run: they are re-added after each replay
        log.info("Training iterations of net '%s' run as one CUDA graph from iteration %d",
                 net.name, solver.iter)
        return True


    def _abandon(self, pending: int) -> None:
        try:
            self.stream.end_capture()
        except Exception:  # noqa: BLE001 - the capture was invalidated already
            pass
        del DEFERRED._items[pending:]
        self.solver.net.clear_param_diffs()  # the recording consumed the pending zeros


def _base_refresh():
    from ..layers.base import Layer  # noqa: PLC0415

    return Layer.refresh_device_inputs


def _data_prefix(net) -> int:
    """How many leading layers take no bottom (the data layers)."""
    k = 0
    while k < len(net.layers) and not net.bottom_vecs[k]:
        k += 1
    return k


__all__ = ["StepGraph"]
