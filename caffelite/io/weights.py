"""Weights files: Caffe's binary ``.caffemodel`` and its HDF5 form ``.caffemodel.h5``.

- ``.caffemodel``: a binary NetParameter whose layers carry ``blobs``
  (old V1 ``layers`` files are upgraded on load).
- ``.caffemodel.h5`` (any name ending in ``.h5``, as Caffe decides): dataset
  ``/data/<layer>/<i>`` for parameter ``i`` of each layer, only for blobs the
  layer owns (a blob shared by ``param { name }`` is stored once, by its
  owner), and ``/diff/<layer>/<i>`` for every blob when diffs are written.
  Every layer gets a group, with or without parameters.

Writes are atomic (see io/atomic.py). Wherever a weights path is read,
``zoo:NAME`` stands for model NAME's verified download (see caffelite/zoo.py).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError, DataError
from .blob_proto import array_to_blob_proto
from ..proto import pb
from .atomic import atomic_path, write_bytes

if TYPE_CHECKING:
    from ..net import Net

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_hdf5(path: str) -> bool:
    """Caffe's rule (the name ends in ``.h5``), or an HDF5 signature at the start of the file."""
    if str(path).endswith(".h5"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def _resolve(path: str) -> str:
    """``zoo:NAME`` -> the verified cached weights of zoo model NAME; other paths as given."""
    if "zoo:" not in path:
        return path
    from ..zoo import resolve_weights  # noqa: PLC0415 - only zoo specs need the zoo

    return resolve_weights(path)


def _check_exists(path: str) -> None:
    if not os.path.isfile(path):
        raise DataError("weights file not found", file=path,
                        hint="check the path; relative paths are taken from the current directory")
    if str(path).endswith((".solverstate", ".solverstate.h5")):
        raise ConfigError(f"{path} is a solver state, not a weights file; use --snapshot to resume "
                          f"from it, or pass the matching .caffemodel to --weights")


# ---- reading ------------------------------------------------------------------------
def load_weights(path: str | os.PathLike) -> "pb.NetParameter":
    """A weights file as a NetParameter (layers with their ``blobs``).

    In the HDF5 form a layer whose blob ``i`` is missing (a shared blob kept by
    its owner) gets only blobs ``0..i-1`` here; ``copy_weights`` handles such
    files exactly as Caffe does.
    """
    path = _resolve(os.fspath(path))
    _check_exists(path)
    if is_hdf5(path):
        return _h5_to_net_param(path)
    try:
        with open(path, "rb") as f:
            param = pb.NetParameter.FromString(f.read())
    except Exception as exc:  # DecodeError and friends
        raise DataError(f"cannot read the file as a binary Caffe model ({exc})", file=path,
                        hint="a .caffemodel is a binary NetParameter; HDF5 weights must end in .h5") from None
    if len(param.layers):
        from ..upgrade import upgrade_net  # noqa: PLC0415 - upgrade imports net, which imports us lazily

        param = upgrade_net(param, path)
    return param


def read_h5_params(path: str, group: str = "data") -> dict[str, dict[int, np.ndarray]]:
    """``{layer: {i: array}}`` from the ``/data`` (or ``/diff``) group of an HDF5 weights file.

    A layer name containing '/' becomes nested groups in HDF5; it is read back
    whole here.
    """
    import h5py  # noqa: PLC0415

    out: dict[str, dict[int, np.ndarray]] = {}
    try:
        with h5py.File(path, "r") as h5:
            if group not in h5:
                if group == "data":
                    raise DataError("HDF5 file has no /data group: not a Caffe HDF5 weights file", file=path)
                return out

            def visit(name, obj):
                if isinstance(obj, h5py.Group):
                    out.setdefault(name, {})
                elif isinstance(obj, h5py.Dataset):
                    layer, _, index = name.rpartition("/")
                    if index.isdigit():
                        out.setdefault(layer, {})[int(index)] = obj[()]

            h5[group].visititems(visit)
    except OSError as exc:
        raise DataError(f"cannot read the HDF5 file ({exc})", file=path) from None
    # Groups that only hold other layers' groups (names with '/') are not layers.
    return {name: blobs for name, blobs in out.items() if blobs or not any(
        other.startswith(name + "/") for other in out)}


def _h5_to_net_param(path: str) -> "pb.NetParameter":
    param = pb.NetParameter()
    diffs = read_h5_params(path, "diff")
    for name, blobs in read_h5_params(path).items():
        layer = param.layer.add(name=name)
        layer_diffs = diffs.get(name, {})
        i = 0
        while i in blobs:
            array_to_blob_proto(blobs[i], layer.blobs.add(), diff=layer_diffs.get(i))
            i += 1
    return param


# ---- copying into a net --------------------------------------------------------------
def copy_weights(net: "Net", paths: str | os.PathLike) -> None:
    """Copy one or more comma-separated weights files into ``net`` by layer name, in order."""
    for path in (p.strip() for p in os.fspath(paths).split(",")):
        if not path:
            continue
        path = _resolve(path)
        _check_exists(path)
        if is_hdf5(path):
            _copy_h5(net, path)
        else:
            net.copy_trained_layers_from(load_weights(path))


def _copy_h5(net: "Net", path: str) -> None:
    """Caffe's CopyTrainedLayersFromHDF5: a missing blob is fine only when it is shared."""
    owned = layer_param_owned(net)
    for name, blobs in read_h5_params(path).items():
        layer = net.layer_by_name.get(name)
        if layer is None:
            continue
        if len(blobs) > len(layer.blobs):
            raise ConfigError(f"the weights have {len(blobs)} blobs for this layer, the net has "
                              f"{len(layer.blobs)}", layer=name, file=path,
                              hint="rename the layer to learn it from scratch")
        for j, blob in enumerate(layer.blobs):
            if j not in blobs:
                if owned[name][j]:
                    raise ConfigError(f"the weights have no blob {j} for this layer", layer=name,
                                      file=path, hint="rename the layer to learn it from scratch")
                continue
            values = blobs[j]
            if tuple(values.shape) != blob.shape:
                raise ConfigError(f"cannot copy param {j} weights: shape mismatch; the weights have "
                                  f"{tuple(values.shape)}, the net has {blob.shape}", layer=name,
                                  file=path, hint="to learn this layer's parameters from scratch "
                                                  "rather than copying them, rename the layer")
            blob.set_data(values)


def layer_param_owned(net: "Net") -> dict[str, list[bool]]:
    """Layer name -> for each of its blobs, whether the layer owns it (False = shared from another)."""
    table = getattr(net, "_param_state", None)
    owners = list(getattr(table, "owners", []))
    out, k = {}, 0
    for name, layer in zip(net.layer_names, net.layers):
        n = len(layer.blobs)
        out[name] = [owners[k + j] == -1 if k + j < len(owners) else True for j in range(n)]
        k += n
    return out


# ---- writing ----------------------------------------------------------------------------
def save_weights(net: "Net", path: str | os.PathLike, write_diff: bool = False) -> str:
    """Write ``net``'s parameters to ``path`` (HDF5 when it ends in .h5), atomically."""
    path = os.fspath(path)
    if path.endswith(".h5"):
        _save_h5(net, path, write_diff)
    else:
        write_bytes(path, net.to_proto(write_diff).SerializeToString())
    return path


def _save_h5(net: "Net", path: str, write_diff: bool) -> None:
    import h5py  # noqa: PLC0415

    owned = layer_param_owned(net)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            data = h5.create_group("data")
            diff = h5.create_group("diff") if write_diff else None
            for name, layer in zip(net.layer_names, net.layers):
                layer_data = data.require_group(name)
                layer_diff = diff.require_group(name) if diff is not None else None
                for j, blob in enumerate(layer.blobs):
                    if owned[name][j]:
                        layer_data.create_dataset(str(j), data=blob.cpu_data())
                    if layer_diff is not None:  # Caffe writes diffs regardless of sharing
                        layer_diff.create_dataset(str(j), data=blob.cpu_diff())


__all__ = ["load_weights", "save_weights", "copy_weights", "read_h5_params", "is_hdf5",
           "layer_param_owned"]
