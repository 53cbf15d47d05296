"""Writing a solver's snapshots and resuming from them.

A snapshot set is ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate`` (or
their .h5 forms) plus caffelite's sidecar (``extra_state``: what an exact
resume needs beyond Caffe's SolverState); see snapshots.py for the sets on
disk. Each set is written inside ``io.atomic.critical()`` (a second Ctrl-C
waits for it); ``snapshot_keep`` (a caffelite field) then deletes the sets
older than the newest K. The weights are checked before each snapshot: no
snapshot of diverged weights is written. With mixed precision the caffemodel
holds the float32 master weights.

``Checkpointing`` is a base of ``Solver`` (base.py).
"""
from __future__ import annotations

import logging
import os

from ..errors import CaffeliteError, ConfigError
from ..io.atomic import critical
from ..io.solverstate import SolverStateData, read_extra, read_solverstate, write_extra, write_solverstate
from ..io.weights import save_weights
from .failures import locate_error
from .snapshots import _find_learned_net, prune_snapshots

log = logging.getLogger(__name__)

HDF5 = 0  # SolverParameter.SnapshotFormat


class Checkpointing:
    """``snapshot`` and ``restore`` of a ``Solver``."""

    def snapshot_filename(self, extension: str) -> str:
        if self.prefix is None:
            raise self._error("cannot snapshot: snapshot_prefix is not set", hint="set snapshot_prefix")
        return f"{self.prefix}_iter_{self.iter}{extension}"

    def snapshot(self) -> tuple[str, str]:
        """Write ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate`` (or their .h5 forms).

        Refuses (TrainingError) when the weights are not finite, so the last snapshot on
        disk is always a good one; a second Ctrl-C waits until the whole set is written."""
        from ..diagnose import nonfinite_params  # noqa: PLC0415

        self._drain_losses()  # a NaN loss not yet read stops here, before anything is written
        if nonfinite_params(self.net) is not None:
            raise self.diverged("the weights are not finite", when="before the snapshot of")
        with critical():
            paths = self._write_snapshot()
        if self.param.snapshot_keep > 0 and self.prefix:
            prune_snapshots(self.prefix, self.param.snapshot_keep, self.iter)
        self._call("on_snapshot", *paths)
        return paths

    def _write_snapshot(self) -> tuple[str, str]:
        h5 = self.param.snapshot_format == HDF5
        kind = "HDF5 file" if h5 else "binary proto file"
        model_path = self.snapshot_filename(".caffemodel.h5" if h5 else ".caffemodel")
        log.info("Snapshotting to %s %s", kind, model_path)
        if self.mixed is None:
            save_weights(self.net, model_path, write_diff=self.param.snapshot_diff)
        else:  # the float32 master weights: full precision, a Caffe-compatible caffemodel
            self.mixed.pull(only_frozen=True)
            with self.mixed.in_net():
                save_weights(self.net, model_path, write_diff=self.param.snapshot_diff)
        state_path = self.snapshot_filename(".solverstate.h5" if h5 else ".solverstate")
        log.info("Snapshotting solver state to %s %s", kind, state_path)
        write_extra(state_path, self.extra_state())  # first: a state file never lacks its sidecar
        write_solverstate(state_path, SolverStateData(
            iter=self.iter, learned_net=model_path, current_step=self.current_step,
            history=[h.cpu_data() for h in self.history]))
        self._last_snapshot_iter = self.iter
        self.last_snapshot = (model_path, state_path)
        return model_path, state_path

    def extra_state(self) -> dict:
        """What an exact resume needs beyond Caffe's SolverState (JSON-safe)."""
        extra = {
            "iter": self.iter,
            "type": self.type,
            "seed": self.seed,
            "train_net": self.net.state_dict(),
            "test_nets": [net.state_dict() for net in self.test_nets],
            "loss_window": {"losses": [float(x) for x in self._losses],
                            "smoothed": float(self.smoothed_loss), "start_iter": self._loss_start},
        }
        if self.mixed is not None:
            extra["mixed_precision"] = self.mixed.state_dict()
        return extra

    def restore(self, state_file: str) -> None:
        """Resume from a .solverstate / .solverstate.h5: weights, history, iter, current_step
        (and caffelite's sidecar state when present)."""
        state_file = os.fspath(state_file)
        state = read_solverstate(state_file)
        weights = None
        if state.learned_net:
            weights = _find_learned_net(state.learned_net, state_file)
            try:
                self._copy_weights(self.net, weights)
            except CaffeliteError as exc:
                raise locate_error(exc, self.net.source or self.source, weights) from None
        if len(state.history) != len(self.history):
            raise ConfigError(f"the solver state holds {len(state.history)} history blobs; this "
                              f"{self.type} solver needs {len(self.history)} for this net",
                              file=state_file,
                              hint="resume with the solver type and net that wrote the snapshot")
        log.info("SGDSolver: restoring history")  # Caffe's wording for every type
        for i, (blob, array) in enumerate(zip(self.history, state.history)):
            if array.size != blob.count:
                raise ConfigError(f"history blob {i} has shape {tuple(array.shape)}, the net's "
                                  f"parameter has {blob.shape}", file=state_file,
                                  hint="resume with the net that wrote the snapshot")
            blob.set_data(array.reshape(blob.shape))
        self.iter = state.iter
        self.current_step = state.current_step
        self.last_snapshot = (weights, state_file)
        extra = read_extra(state_file)
        if extra is None:
            return
        if extra.get("iter") != state.iter:
            log.warning("ignoring %s: it belongs to iteration %s, the solver state to %d",
                        state_file + ".json", extra.get("iter"), state.iter)
            return
        self.net.load_state_dict(extra.get("train_net", {}))
        for net, net_state in zip(self.test_nets, extra.get("test_nets", [])):
            net.load_state_dict(net_state)
        if self.mixed is not None and "mixed_precision" in extra:
            self.mixed.load_state_dict(extra["mixed_precision"])
        window = extra.get("loss_window")
        if window:
            self._losses = [self._dt(x) for x in window["losses"]]
            self.smoothed_loss = self._dt(window["smoothed"])
            self._loss_start = int(window["start_iter"])
            self._keep_loss_window = True


__all__ = ["Checkpointing", "HDF5"]
