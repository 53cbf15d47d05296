"""Solver states: Caffe's ``.solverstate`` (binary SolverState) and ``.solverstate.h5``.

Both hold ``iter``, ``learned_net`` (the path of the weights snapshot as it
was written), ``current_step`` (the multistep position) and ``history`` (the
solver's per-parameter history blobs, e.g. momentum; two sets for AdaDelta
and Adam: all first-set blobs, then all second-set blobs). The HDF5 form has
datasets ``iter``, ``current_step`` (int32, shape (1,)), ``learned_net`` (a
null-terminated fixed-length string) and a group ``history/<i>``.

caffelite also keeps what an exact resume needs that Caffe's format has no
field for (data cursors, RNG streams, the smoothed-loss window) in a JSON
sidecar ``<state file>.json``, written before the state file so a state file
never exists without it. Without a sidecar (a real Caffe snapshot) a resume
works as Caffe's does. Nothing is pickled.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, DataError
from .blob_proto import array_to_blob_proto, blob_proto_to_array
from ..proto import pb
from .atomic import atomic_path, write_bytes, write_text
from .weights import is_hdf5

EXTRA_SUFFIX = ".json"
EXTRA_FORMAT = "caffelite-solverstate-extra"


@dataclass
class SolverStateData:
    iter: int = 0
    learned_net: str | None = None
    history: list[np.ndarray] = field(default_factory=list)
    current_step: int = 0


def _not_a_state(path: str) -> ConfigError:
    return ConfigError(f"{path} is a weights file, not a solver state; use --weights to start from it, "
                       f"or pass the .solverstate to --snapshot")


# ---- reading -------------------------------------------------------------------------
def read_solverstate(path: str | os.PathLike) -> SolverStateData:
    """Read a binary or HDF5 solver state (chosen like Caffe: a name ending in .h5 is HDF5)."""
    path = os.fspath(path)
    if path.endswith((".caffemodel", ".caffemodel.h5")):
        raise _not_a_state(path)
    if not os.path.isfile(path):
        raise ConfigError("solver state not found", file=path, hint=_nearby_states(path))
    if is_hdf5(path):
        return _read_h5(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        state = pb.SolverState.FromString(raw)
    except Exception:
        state = None
    if state is None or not state.HasField("iter"):
        if _looks_like_weights(raw):
            raise _not_a_state(path)
        raise DataError("not a Caffe solver state (binary SolverState)", file=path,
                        hint="pass the .solverstate (or .solverstate.h5) written by a snapshot")
    return SolverStateData(
        iter=state.iter,
        learned_net=state.learned_net if state.HasField("learned_net") else None,
        history=[blob_proto_to_array(h) for h in state.history],
        current_step=state.current_step,
    )


def _looks_like_weights(raw: bytes) -> bool:
    try:
        net = pb.NetParameter.FromString(raw)
    except Exception:
        return False
    return bool(len(net.layer) or len(net.layers))


def _read_h5(path: str) -> SolverStateData:
    import h5py  # noqa: PLC0415

    try:
        with h5py.File(path, "r") as h5:
            if "iter" not in h5:
                if "data" in h5:
                    raise _not_a_state(path)
                raise DataError("HDF5 file has no 'iter' dataset: not a Caffe solver state", file=path)
            learned = None
            if "learned_net" in h5:
                value = h5["learned_net"][()]
                learned = (value.decode() if isinstance(value, bytes) else str(value)).rstrip("\0")
            history_group = h5.get("history")
            n = len(history_group) if history_group is not None else 0
            history = []
            for i in range(n):
                if str(i) not in history_group:
                    raise DataError(f"history blob {i} is missing", file=path)
                history.append(np.asarray(history_group[str(i)][()]))
            return SolverStateData(
                iter=int(np.asarray(h5["iter"][()]).reshape(-1)[0]),
                learned_net=learned,
                history=history,
                current_step=int(np.asarray(h5["current_step"][()]).reshape(-1)[0])
                if "current_step" in h5 else 0,
            )
    except OSError as exc:
        raise DataError(f"cannot read the HDF5 file ({exc})", file=path) from None


def _nearby_states(path: str) -> str:
    folder = os.path.dirname(path) or "."
    try:
        found = sorted(n for n in os.listdir(folder) if n.endswith((".solverstate", ".solverstate.h5")))
    except OSError:
        found = []
    if not found:
        return "check the path; snapshots are named <prefix>_iter_<N>.solverstate"
    shown = ", ".join(found[-3:])
    return f"solver states in {folder}: {shown}"


# ---- writing ------------------------------------------------------------------------------
def write_solverstate(path: str | os.PathLike, state: SolverStateData) -> str:
    """Write ``state`` atomically, as HDF5 when ``path`` ends in .h5, else as a binary SolverState."""
    path = os.fspath(path)
    if path.endswith(".h5"):
        _write_h5(path, state)
        return path
    msg = pb.SolverState(iter=state.iter, current_step=state.current_step)
    if state.learned_net is not None:
        msg.learned_net = state.learned_net
    for array in state.history:
        array_to_blob_proto(np.asarray(array), msg.history.add())
    write_bytes(path, msg.SerializeToString())
    return path


def _write_h5(path: str, state: SolverStateData) -> None:
    import h5py  # noqa: PLC0415

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("iter", data=np.array([state.iter], dtype=np.int32))
            if state.learned_net is not None:
                _write_c_string(h5, "learned_net", state.learned_net)
            h5.create_dataset("current_step", data=np.array([state.current_step], dtype=np.int32))
            group = h5.create_group("history")
            for i, array in enumerate(state.history):
                group.create_dataset(str(i), data=np.asarray(array))


def _write_c_string(h5, name: str, text: str) -> None:
    """A scalar, null-terminated fixed-length string, as HDF5's H5LTmake_dataset_string writes."""
    import h5py  # noqa: PLC0415

    raw = text.encode()
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(len(raw) + 1)
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    space = h5py.h5s.create(h5py.h5s.SCALAR)
    dset = h5py.h5d.create(h5.id, name.encode(), tid, space)
    dset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(raw + b"\0", dtype=f"S{len(raw) + 1}"), mtype=tid)


# ---- caffelite's sidecar -------------------------------------------------------------------
def extra_path(state_path: str | os.PathLike) -> str:
    return os.fspath(state_path) + EXTRA_SUFFIX


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store a {type(value).__name__} in a solver state sidecar")


def write_extra(state_path: str | os.PathLike, extra: dict) -> str:
    """Write the JSON sidecar of ``state_path`` atomically."""
    path = extra_path(state_path)
    payload = {"format": EXTRA_FORMAT, "version": 1, **extra}
    write_text(path, json.dumps(payload, default=_json_default, separators=(",", ":")))
    return path


def read_extra(state_path: str | os.PathLike) -> dict | None:
    """The sidecar of ``state_path``, or None when there is none (a Caffe snapshot)."""
    path = extra_path(state_path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the solver state sidecar ({exc})", file=path,
                        hint="delete it to resume the way Caffe does (data read from the start)") from None
    if not isinstance(payload, dict) or payload.get("format") != EXTRA_FORMAT:
        raise DataError("not a caffelite solver state sidecar", file=path)
    return payload


__all__ = ["SolverStateData", "read_solverstate", "write_solverstate", "read_extra", "write_extra",
           "extra_path"]
