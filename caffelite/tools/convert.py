"""``caffelite convert IN OUT``: nets, solvers and weights between Caffe's formats.

    caffelite convert lenet.prototxt lenet.yaml           # net or solver, decided by content
    caffelite convert lenet.yaml lenet.prototxt
    caffelite convert old_v1.prototxt new.prototxt        # legacy V0/V1 nets are upgraded
    caffelite convert old.caffemodel new.caffemodel       # a V1 caffemodel upgraded
    caffelite convert w.caffemodel w.caffemodel.h5
    caffelite convert w.caffemodel.h5 w.caffemodel [--model net.prototxt]

The formats follow the file names: ``.prototxt``/``.pbtxt`` (protobuf text),
``.yaml``/``.yml``, ``.caffemodel`` (binary NetParameter) and ``.h5`` (Caffe's
HDF5 weights). Text conversions are lossless: reading OUT gives the message
read from IN (after the legacy upgrade). Relative paths inside a file are
copied as written, not resolved.

HDF5 weights hold only layer names and blobs (a blob shared through
``param { name }`` is stored once, by its owner). Caffe needs nothing more to
load weights (``CopyTrainedLayersFrom`` matches layers by name and checks blob
counts and shapes), so a ``.caffemodel`` made from an ``.h5`` alone has layers
with names and blobs only. ``--model NET`` adds the layer definitions and
restores the shared blobs. An ``.h5`` written by this command also keeps the
whole original NetParameter (without values) in a ``caffelite_net`` dataset,
which Caffe ignores, so caffemodel -> h5 -> caffemodel is exact.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..cli import _flag
from ..errors import ConfigError, DataError

COMMAND = "convert"
HELP = "convert nets/solvers (.prototxt <-> .yaml, legacy upgraded) and weights (.caffemodel <-> .h5)"

TEXT_SUFFIXES = {".prototxt": "prototxt", ".pbtxt": "prototxt", ".yaml": "yaml", ".yml": "yaml"}
SUPPORTED = ".prototxt, .pbtxt, .yaml, .yml (nets and solvers); .caffemodel, .h5 (weights)"
#: Dataset of an HDF5 weights file that keeps the NetParameter (values stripped).
NET_DATASET = "caffelite_net"

log = logging.getLogger("caffelite")


def add_arguments(parser) -> None:
    parser.add_argument("input", metavar="IN", help="file to read")
    parser.add_argument("output", metavar="OUT", help="file to write (its extension picks the format)")
    _flag(parser, "kind", choices=("net", "solver"), default=None,
          help="for text files: read IN as a net or a solver (default: decided by content)")
    _flag(parser, "model", default=None,
          help="for .h5 -> .caffemodel: a net file whose layer definitions go with the weights")


def run(args) -> int:
    what = convert(args.input, args.output, kind=args.kind, model=args.model)
    log.info("Wrote %s (%s)", args.output, what)
    return 0


# ---- dispatch -------------------------------------------------------------------------
def file_format(path: str | os.PathLike) -> str:
    """'prototxt', 'yaml', 'caffemodel' or 'h5', from the file name."""
    name = os.fspath(path).lower()
    if name.endswith(".h5"):
        return "h5"
    if name.endswith(".caffemodel"):
        return "caffemodel"
    suffix = Path(name).suffix
    if suffix in TEXT_SUFFIXES:
        return TEXT_SUFFIXES[suffix]
    raise ConfigError(f"unknown file type '{suffix or Path(name).name}'", file=os.fspath(path),
                      hint=f"supported: {SUPPORTED}")


def convert(src: str | os.PathLike, dst: str | os.PathLike, kind: str | None = None,
            model: str | os.PathLike | None = None) -> str:
    """Convert ``src`` to ``dst``; returns a short description (``"net"``, ``"weights"``, ...)."""
    src, dst = os.fspath(src), os.fspath(dst)
    src_fmt, dst_fmt = file_format(src), file_format(dst)
    weights = {"caffemodel", "h5"}
    if (src_fmt in weights) != (dst_fmt in weights):
        raise ConfigError(f"cannot convert {src_fmt} to {dst_fmt}: "
                          f"{'weights' if src_fmt in weights else 'a net or solver'} in, "
                          f"{'weights' if dst_fmt in weights else 'a net or solver'} out",
                          hint="convert text files to text files and weights to weights")
    if os.path.abspath(src) == os.path.abspath(dst):
        # Writing is atomic, so this would work; it is still most likely a typo.
        log.info("Converting %s in place", src)
    if src_fmt in weights:
        if model is not None and not (src_fmt == "h5" and dst_fmt == "caffemodel"):
            raise ConfigError("--model is only used for .h5 -> .caffemodel")
        param = read_weights(src, model=model)
        write_weights(param, dst)
        return "weights"
    if model is not None:
        raise ConfigError("--model is only used for .h5 -> .caffemodel")
    msg, what = read_text(src, kind)
    write_text(msg, dst)
    return what


# ---- nets and solvers -----------------------------------------------------------------
def read_text(path: str, kind: str | None = None):
    """(message, 'net' | 'solver') from a text file, legacy formats upgraded, paths as written."""
    from .. import config  # noqa: PLC0415
    from ..upgrade import upgrade_net, upgrade_solver  # noqa: PLC0415

    if not os.path.isfile(path):
        raise ConfigError("file not found", file=path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file ({exc})", file=path) from None
    fmt = file_format(path)
    parsers = {"net": config.parse_net, "solver": config.parse_solver}
    if kind is not None:
        msg = parsers[kind](text, fmt, path)
    else:
        kind, msg = _guess_kind(text, fmt, path, parsers)
    if kind == "net":
        return upgrade_net(msg, path), "net"
    return upgrade_solver(msg, path), "solver"


def _guess_kind(text: str, fmt: str, path: str, parsers):
    """Try a net first, then a solver; when both fail, report the one that read further."""
    errors = {}
    for kind, parse in parsers.items():
        try:
            return kind, parse(text, fmt, path)
        except ConfigError as exc:
            errors[kind] = exc
    net_err, solver_err = errors["net"], errors["solver"]
    best = solver_err if (solver_err.line or 0) > (net_err.line or 0) else net_err
    if best.hint is None:
        best.hint = "pass --kind net or --kind solver if the content is ambiguous"
        best.args = (best.format(),)
    raise best


def write_text(msg, path: str) -> None:
    from google.protobuf import text_format  # noqa: PLC0415

    from ..io.atomic import write_text as atomic_write_text  # noqa: PLC0415
    from ..yaml_writer import message_to_yaml  # noqa: PLC0415

    if file_format(path) == "yaml":
        atomic_write_text(path, message_to_yaml(msg))
    else:
        atomic_write_text(path, text_format.MessageToString(msg))


# ---- weights -------------------------------------------------------------------------
def read_weights(path: str, model: str | os.PathLike | None = None):
    """A weights file as a NetParameter with blobs (V1 caffemodels upgraded)."""
    from ..io.weights import is_hdf5, load_weights  # noqa: PLC0415

    if not os.path.isfile(path):
        raise DataError("weights file not found", file=path)
    if not is_hdf5(path):
        return load_weights(path)
    return _read_h5(path, model)


def write_weights(param, path: str) -> None:
    from ..io.atomic import write_bytes  # noqa: PLC0415

    if file_format(path) == "h5":
        _write_h5(param, path)
    else:
        write_bytes(path, param.SerializeToString())


def _owners(layers) -> dict[tuple[int, int], tuple[int, int]]:
    """(layer index, blob index) of a blob shared by ``param { name }`` -> its owner's."""
    first: dict[str, tuple[int, int]] = {}
    shared = {}
    for i, layer in enumerate(layers):
        for j, spec in enumerate(layer.param):
            if not spec.name:
                continue
            if spec.name in first:
                shared[(i, j)] = first[spec.name]
            else:
                first[spec.name] = (i, j)
    return shared


def _has_diff(proto) -> bool:
    return bool(len(proto.diff) or len(proto.double_diff))


def _write_h5(param, path: str) -> None:
    """Caffe's HDF5 layout (/data/<layer>/<i> for owned blobs, /diff when any blob has one),
    plus the value-less NetParameter for an exact way back."""
    import h5py  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from ..io.atomic import atomic_path  # noqa: PLC0415
    from ..io.blob_proto import blob_proto_to_array  # noqa: PLC0415
    from ..proto import pb  # noqa: PLC0415

    shared = _owners(param.layer)
    write_diff = any(_has_diff(b) for layer in param.layer for b in layer.blobs)
    skeleton = pb.NetParameter()
    skeleton.CopyFrom(param)
    for layer in skeleton.layer:
        for blob in layer.blobs:
            for name in ("data", "diff", "double_data", "double_diff"):
                blob.ClearField(name)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            data = h5.create_group("data")
            diff = h5.create_group("diff") if write_diff else None
            for i, layer in enumerate(param.layer):
                layer_data = data.require_group(layer.name)
                layer_diff = diff.require_group(layer.name) if diff is not None else None
                for j, blob in enumerate(layer.blobs):
                    if (i, j) not in shared:
                        layer_data.create_dataset(str(j), data=blob_proto_to_array(blob))
                    if layer_diff is not None and _has_diff(blob):
                        layer_diff.create_dataset(str(j), data=blob_proto_to_array(blob, diff=True))
            h5.create_dataset(NET_DATASET, data=np.frombuffer(skeleton.SerializeToString(), np.uint8))


def _read_h5(path: str, model):
    import h5py  # noqa: PLC0415

    from ..io.weights import read_h5_params  # noqa: PLC0415
    from ..proto import pb  # noqa: PLC0415

    data = read_h5_params(path)
    diffs = read_h5_params(path, "diff")
    skeleton = None
    with h5py.File(path, "r") as h5:
        if NET_DATASET in h5 and model is None:
            skeleton = pb.NetParameter.FromString(h5[NET_DATASET][()].tobytes())
    if skeleton is not None:
        return _fill_skeleton(skeleton, data, diffs, path)
    param = pb.NetParameter()
    if model is not None:
        model = os.fspath(model)
        if file_format(model) not in ("prototxt", "yaml"):
            raise ConfigError("--model must be a net file (.prototxt or .yaml)", file=model)
        net_param, _ = read_text(model, "net")
        param.name = net_param.name
        seen = set()
        for layer in net_param.layer:
            if layer.name not in seen:  # one definition per name, as in a built net
                seen.add(layer.name)
                copy = param.layer.add()
                copy.CopyFrom(layer)
                del copy.blobs[:]
    known = {layer.name for layer in param.layer}
    for name, blobs in data.items():
        # A group without datasets is a layer without parameters, or one whose blobs are all
        # shared: Caffe's net shares them again on loading, so it needs no entry.
        if name not in known and blobs:
            param.layer.add(name=name)
    return _fill_layers(param, data, diffs, path)


def _fill_layers(param, data, diffs, path: str):
    """Attach the HDF5 arrays to ``param``'s layers by name; shared blobs from their owners."""
    from ..io.blob_proto import array_to_blob_proto  # noqa: PLC0415

    shared = _owners(param.layer)
    arrays: dict[tuple[int, int], object] = {}
    for i, layer in enumerate(param.layer):
        blobs = data.get(layer.name, {})
        count = 1 + max([*blobs, *(j for (li, j) in shared if li == i)], default=-1)
        for j in range(count):
            if j in blobs:
                arrays[(i, j)] = blobs[j]
            elif shared.get((i, j)) in arrays:
                arrays[(i, j)] = arrays[shared[(i, j)]]
            else:
                log.warning("%s: layer '%s' has no blob %d but has later ones (a blob shared with "
                            "another layer is stored once, by its owner); pass --model NET to "
                            "restore it", path, layer.name, j)
                break
            array_to_blob_proto(arrays[(i, j)], layer.blobs.add(),
                                diff=diffs.get(layer.name, {}).get(j))
    return param


def _fill_skeleton(skeleton, data, diffs, path: str):
    """The exact NetParameter an .h5 written by this command came from."""
    import numpy as np  # noqa: PLC0415

    shared = _owners(skeleton.layer)
    for i, layer in enumerate(skeleton.layer):
        for j, blob in enumerate(layer.blobs):
            owner = shared.get((i, j), (i, j))
            source = data.get(skeleton.layer[owner[0]].name, {}).get(owner[1])
            if source is None:
                raise DataError(f"no data for blob {j} of layer '{layer.name}'", file=path)
            _set_values(blob, np.asarray(source), "data")
            diff = diffs.get(layer.name, {}).get(j)
            if diff is not None:
                _set_values(blob, np.asarray(diff), "diff")
    return skeleton


def _set_values(blob, array, which: str) -> None:
    import numpy as np  # noqa: PLC0415

    field = f"double_{which}" if array.dtype == np.float64 else which
    getattr(blob, field).extend(array.astype(np.float64 if field.startswith("double") else np.float32,
                                             copy=False).ravel().tolist())


__all__ = ["convert", "read_text", "write_text", "read_weights", "write_weights", "file_format"]
