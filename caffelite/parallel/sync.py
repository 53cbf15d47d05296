"""GradientSync: the solver callback that keeps N data-parallel replicas identical.

As Caffe's P2PSync / NCCL classes:

- ``on_start`` of the first iteration: rank 0 broadcasts every learnable
  parameter and the solver history (after a resume too), so all ranks start
  from rank 0's weights whatever their own fillers drew;
- after backward, gradients are summed over the ranks and scaled by 1/N
  (Caffe: ``ncclAllReduce(sum)`` then ``scal(1 / solver_count)``), so each
  rank applies the update of the mean gradient over N x batch_size items.

Gradients travel in buckets: flat buffers of about ``bucket_bytes`` (8 MiB, or
``$CAFFELITE_BUCKET_MB``) into which the parameter diffs are packed, in the
order backward finishes them. With
``overlap`` a bucket's all-reduce starts as soon as the last layer holding
one of its parameters has run backward (Caffe's ``layer_wise_reduce``), while
backward goes on with the earlier layers.

Stop and snapshot requests (signals) are agreed on: each rank adds its flags
to the last bucket, and every rank acts on the sum, in the same iteration.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 8 << 20
FLAG_SLOTS = 2  # snapshot, stop


class _Bucket:
    __slots__ = ("params", "offsets", "size", "buffer", "layers", "pending", "handle", "started", "flags")

    def __init__(self, params: list[int]):
        self.params = params
        self.offsets: list[int] = []
        self.size = 0
        self.buffer = None
        self.layers: set[int] = set()
        self.pending = 0  # holder-layer backward passes still to come this iteration
        self.handle = None
        self.started = False
        self.flags = False


class GradientSync:
    """Broadcast at start, bucketed gradient all-reduce after backward (see the module doc)."""

    def __init__(self, context, solver, *, bucket_bytes: int | None = None, overlap: bool | None = None):
        self.ctx = context
        self.comm = context.comm
        self.solver = solver
        self.world = context.size
        self.bucket_bytes = int(bucket_bytes or _env_bucket_bytes() or DEFAULT_BUCKET_BYTES)
        device = solver.device
        # Overlap pays on GPUs (NCCL runs beside the compute stream). On CPUs the ranks'
        # cores are busy with backward and MPI makes no progress outside its calls.
        self.overlap = device.is_gpu if overlap is None else bool(overlap)
        self.xp = device.xp
        self.dtype = solver.dtype
        self._scale = self.dtype.type(1) / self.dtype.type(self.world)
        self._synced = False
        self._armed = False
        self._iteration_ended = False
        self._agreed = (False, False)
        self._timeout = None
        self._snapshot_agreed = False
        self._build_buckets(solver.net)
        if self.overlap:
            self._install_hooks(solver.net)

    # ---- buckets ------------------------------------------------------------------------------
    def _build_buckets(self, net) -> None:
        """Group the parameters that receive gradients into buckets, in backward order."""
        params = net.learnable_params
        holders: dict[int, set[int]] = {i: set() for i in range(len(params))}
        reduced: set[int] = set()
        for layer_id, learnable_id, param_id in _layer_params(net):
            if net.layer_need_backward[layer_id]:
                holders[learnable_id].add(layer_id)
                if net.layers[layer_id].param_propagate_down[param_id]:
                    reduced.add(learnable_id)
        # A parameter no layer writes a gradient into (lr_mult 0, a frozen branch) keeps a zero
        # diff on every rank: nothing to reduce.
        order = sorted(reduced, key=lambda i: (-min(holders[i]), i))
        self.reduced = order
        buckets, current, nbytes = [], [], 0
        itemsize = self.dtype.itemsize
        for i in order:
            size = params[i].count * itemsize
            if current and nbytes + size > self.bucket_bytes:
                buckets.append(_Bucket(current))
                current, nbytes = [], 0
            current.append(i)
            nbytes += size
        buckets.append(_Bucket(current))  # the last one also carries the request flags
        buckets[-1].flags = True
        self.layer_buckets: dict[int, list[int]] = {}
        for b, bucket in enumerate(buckets):
            offset = 0
            for i in bucket.params:
                bucket.offsets.append(offset)
                offset += params[i].count
                bucket.layers |= holders[i]
            bucket.size = offset + (FLAG_SLOTS if bucket.flags else 0)
            bucket.buffer = self.xp.zeros(bucket.size, self.dtype)
            for layer_id in bucket.layers:
                self.layer_buckets.setdefault(layer_id, []).append(b)
        self.buckets = buckets
        total = sum(params[i].count for i in order)
        if self.ctx.is_root:
            log.info("Gradient all-reduce over %d ranks (%s): %d of %d parameter blobs, %d values "
                     "in %d bucket(s)%s", self.world, self.comm.name, len(order), len(params), total,
                     len(buckets), ", overlapped with backward" if self.overlap else "")

    def _install_hooks(self, net) -> None:
        """Call ``_layer_done(i)`` after layer i's backward (the Net's ``after_backward`` hooks)."""
        net.after_backward.append(self._layer_done)

    # ---- solver callbacks ---------------------------------------------------------------------
    def on_start(self, solver) -> None:
        if not self._synced:
            self.broadcast_state(solver)
            self._synced = True
            self._timeout = None  # the first all-reduce waits for every rank's set-up
        else:
            self._timeout = None if self._root_was_busy(solver) else self.ctx.timeout
        iter_size = solver.param.iter_size
        for bucket in self.buckets:
            bucket.pending = len(bucket.layers) * iter_size
            bucket.started = False
            bucket.handle = None
        self._armed = True

    def _root_was_busy(self, solver) -> bool:
        """Did rank 0 test (this iteration) or snapshot (after the last one)? The others then
        wait for it in the next collective: no timeout there."""
        p, it = solver.param, solver.iter
        tested = p.test_interval and it % p.test_interval == 0 and (it > 0 or p.test_initialization)
        snapshotted = (p.snapshot and it % p.snapshot == 0) or self._snapshot_agreed
        return bool(tested or snapshotted)

    def _layer_done(self, layer_id: int) -> None:
        if not self._armed:  # a backward outside the solver's step
            return
        for b in self.layer_buckets.get(layer_id, ()):
            bucket = self.buckets[b]
            bucket.pending -= 1
            if bucket.pending == 0:
                self._start(bucket)

    def on_gradients_ready(self, solver) -> None:
        self._armed = False
        what = f"gradient all-reduce of iteration {solver.iter}"
        if self.overlap:
            for bucket in self.buckets:
                if not bucket.started:
                    self._start(bucket)
            self.comm.wait([b.handle for b in self.buckets], what, self._timeout)
        else:
            for bucket in self.buckets:
                self._pack(bucket)
                self.comm.allreduce_sum_(bucket.buffer, what, self._timeout)
        self._unpack()

    def on_iteration_end(self, solver) -> None:
        self._iteration_ended = True

    # ---- requests -----------------------------------------------------------------------------
    def take_requests(self) -> tuple[bool, bool]:
        """The (snapshot, stop) requests every rank acts on after this iteration; (False, False)
        elsewhere (rank 0's test loop), so no rank stops or snapshots alone. Only rank 0 snapshots."""
        if not self._iteration_ended:
            return False, False
        self._iteration_ended = False
        snapshot, stop = self._agreed
        self._snapshot_agreed = snapshot
        return snapshot and self.ctx.is_root, stop

    # ---- packing ------------------------------------------------------------------------------
    def _start(self, bucket: _Bucket) -> None:
        self._pack(bucket)
        bucket.handle = self.comm.start_allreduce_sum(bucket.buffer)
        bucket.started = True

    def _pack(self, bucket: _Bucket) -> None:
        params = self.solver.net.learnable_params
        buf = bucket.buffer
        for i, offset in zip(bucket.params, bucket.offsets):
            diff = params[i].diff
            buf[offset:offset + diff.size] = diff.ravel()
        if bucket.flags:
            # Taken now: a request that arrives later stays for the next iteration.
            snapshot, stop = self._take_local()
            buf[-FLAG_SLOTS:] = self.xp.asarray([float(snapshot), float(stop)], self.dtype)

    def _take_local(self) -> tuple[bool, bool]:
        from ..solvers.base import Solver  # noqa: PLC0415

        return Solver.take_requests(self.solver)

    def _unpack(self) -> None:
        params = self.solver.net.learnable_params
        xp, scale = self.xp, self._scale
        for bucket in self.buckets:
            buf = bucket.buffer
            for i, offset in zip(bucket.params, bucket.offsets):
                diff = params[i].diff
                xp.multiply(buf[offset:offset + diff.size].reshape(diff.shape), scale, out=diff)
            if bucket.flags:
                flags = buf[-FLAG_SLOTS:]
                flags = flags.get() if hasattr(flags, "get") else flags
                self._agreed = (bool(flags[0] > 0), bool(flags[1] > 0))

    # ---- start-up -----------------------------------------------------------------------------
    def broadcast_state(self, solver) -> None:
        """Rank 0's parameters, history, iteration and lr step into every rank."""
        ctrl = self.ctx.ctrl
        here = (solver.iter, solver.current_step)
        there = ctrl.bcast_object(here, what="start-up broadcast")
        if tuple(there) != here:
            from ..errors import TrainingError  # noqa: PLC0415

            raise TrainingError(f"rank {self.ctx.rank} is at iteration {here[0]} but rank 0 at "
                                f"{there[0]}: the ranks did not resume from the same snapshot",
                                hint="resume every rank from the same .solverstate")
        # The update's parameters: the net's, or with mixed precision their float32 master copies.
        params = getattr(solver, "learnable_params", solver.net.learnable_params)
        arrays = [p.data for p in params] + [h.data for h in solver.history]
        self.comm.bcast_(arrays, 0, "parameter broadcast", None)
        if hasattr(solver, "sync_net_params"):
            solver.sync_net_params()
        if self.ctx.is_root:
            log.info("Broadcast %d parameter and %d history blobs from rank 0 to %d ranks",
                     len(params), len(solver.history), self.world)


def _env_bucket_bytes() -> int | None:
    """``$CAFFELITE_BUCKET_MB`` (MiB per gradient bucket), if set."""
    import os  # noqa: PLC0415

    text = os.environ.get("CAFFELITE_BUCKET_MB", "").strip()
    try:
        return int(float(text) * (1 << 20)) if text else None
    except ValueError:
        from ..errors import ConfigError  # noqa: PLC0415

        raise ConfigError(f"CAFFELITE_BUCKET_MB='{text}' is not a number", hint="e.g. 8") from None


def _layer_params(net):
    """(layer index, learnable index, param index in the layer) for every parameter blob."""
    net_param_id = 0
    for layer_id, layer in enumerate(net.layers):
        for param_id in range(len(layer.blobs)):
            yield layer_id, net.learnable_param_ids[net_param_id], param_id
            net_param_id += 1


__all__ = ["GradientSync", "DEFAULT_BUCKET_BYTES"]
