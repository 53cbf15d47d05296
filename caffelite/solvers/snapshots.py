"""The snapshot sets of a prefix on disk: find the newest complete one, prune old ones.

A snapshot set of iteration N is ``<prefix>_iter_N.caffemodel`` (the weights),
``<prefix>_iter_N.solverstate`` (Caffe's solver state) and caffelite's sidecar
``<prefix>_iter_N.solverstate.json``; with ``snapshot_format: HDF5`` the first
two end in ``.h5``. The solver writes the weights, then the sidecar, then the
state, each atomically, so a set whose state file exists was complete when it
was written. ``--snapshot auto`` still parses every file of a candidate before
trusting it, and skips temporary files (``.<name>.XXXX.tmp``) left by a kill.
Pruning deletes the state first, so an interrupted prune never leaves a set
that looks complete but is not.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from ..errors import CaffeliteError, DataError

log = logging.getLogger(__name__)

_SUFFIX = re.compile(r"_iter_(\d+)\.(caffemodel|solverstate)(\.h5)?(\.json)?$")


@dataclass
class SnapshotSet:
    iter: int
    hdf5: bool
    weights: str | None = None
    state: str | None = None
    extra: str | None = None

    def files(self) -> list[str]:
        """Its files, in deletion order: state, sidecar, weights."""
        return [p for p in (self.state, self.extra, self.weights) if p]


def list_snapshots(prefix: str) -> list[SnapshotSet]:
    """Every snapshot set (complete or not) of ``prefix``, newest iteration first."""
    folder = os.path.dirname(prefix) or "."
    stem = os.path.basename(prefix)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    sets: dict[tuple[int, bool], SnapshotSet] = {}
    for name in names:
        if not name.startswith(stem + "_iter_"):
            continue
        match = _SUFFIX.match(name, len(stem))
        if match is None:
            continue
        number, kind, h5, json_ = match.groups()
        key = (int(number), bool(h5))
        entry = sets.setdefault(key, SnapshotSet(int(number), bool(h5)))
        path = os.path.join(folder, name)
        if kind == "caffemodel" and not json_:
            entry.weights = path
        elif kind == "solverstate":
            if json_:
                entry.extra = path
            else:
                entry.state = path
    return sorted(sets.values(), key=lambda s: (s.iter, s.hdf5), reverse=True)


def check_complete(entry: SnapshotSet) -> str | None:
    """None when every file of the set is present and parses; else what is wrong."""
    from ..io.solverstate import read_extra, read_solverstate  # noqa: PLC0415
    from ..io.weights import load_weights  # noqa: PLC0415

    if entry.state is None:
        return "no solver state"
    try:
        state = read_solverstate(entry.state)
        if state.iter != entry.iter:
            return f"the solver state holds iteration {state.iter}"
        weights = _find_learned_net(state.learned_net, entry.state) if state.learned_net else entry.weights
        if weights is None:
            return "no weights"
        load_weights(weights)
        if entry.extra is not None:
            extra = read_extra(entry.state)
            if extra is None or extra.get("iter") != entry.iter:
                return "the sidecar belongs to another iteration"
    except CaffeliteError as exc:
        return str(exc)
    return None


def latest_snapshot(prefix: str) -> str | None:
    """The solver state of the newest complete snapshot set of ``prefix``, or None."""
    for entry in list_snapshots(prefix):
        problem = check_complete(entry)
        if problem is None:
            return entry.state
        log.warning("skipping the snapshot of iteration %d (%s): %s", entry.iter,
                    entry.state or entry.weights or entry.extra, problem)
    return None


def prune_snapshots(prefix: str, keep: int, current_iter: int) -> list[str]:
    """Delete the sets of ``prefix`` older than the newest ``keep`` (counting the one of
    ``current_iter``). Sets of later iterations (another run's) are left alone."""
    if keep <= 0:
        return []
    older = [s for s in list_snapshots(prefix) if s.iter < current_iter]
    removed = []
    for entry in older[max(keep - 1, 0):]:
        for path in entry.files():
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot delete old snapshot file %s: %s", path, exc)
    if removed:
        log.info("snapshot_keep %d: deleted %d old snapshot file(s)", keep, len(removed))
    return removed


def _find_learned_net(learned: str, state_file: str) -> str:
    """The weights a solver state names: as written, else beside the solver state."""
    folder = os.path.dirname(state_file)
    candidates = [learned]
    if not os.path.isabs(learned):
        candidates.append(os.path.join(folder, learned))
    candidates.append(os.path.join(folder, os.path.basename(learned)))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise DataError(f"the weights snapshot '{learned}' named by the solver state was not found",
                    file=state_file, hint="keep the .caffemodel next to its .solverstate")


__all__ = ["SnapshotSet", "list_snapshots", "check_complete", "latest_snapshot", "prune_snapshots"]
