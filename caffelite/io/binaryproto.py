"""BlobProto files (``mean.binaryproto``) as NumPy arrays.

Caffe's ``compute_image_mean`` writes a BlobProto with the legacy 4-d shape
fields ``num x channels x height x width`` = 1 x C x H x W; newer writers use
``shape { dim ... }``. Both are read; legacy fields are written for 1- to 4-d
arrays (what Caffe itself writes and reads back), ``shape`` beyond that.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from ..errors import ConfigError, DataError
from ..proto import pb


def blob_proto_shape(proto) -> tuple:
    if proto.HasField("shape"):
        return tuple(int(d) for d in proto.shape.dim)
    return (proto.num, proto.channels, proto.height, proto.width)


def blob_proto_to_array(proto, where: str = "BlobProto") -> np.ndarray:
    """The blob's data (float32, or float64 when stored as double_data) in its shape."""
    shape = blob_proto_shape(proto)
    if len(proto.double_data):
        array = np.asarray(proto.double_data, dtype=np.float64)
    else:
        array = np.asarray(proto.data, dtype=np.float32)
    count = int(np.prod(shape)) if shape else 1
    if array.size != count:
        raise DataError(f"{where}: shape {shape} needs {count} values, the file holds {array.size}",
                        hint="the file is truncated or not a binaryproto")
    return array.reshape(shape)


def array_to_blob_proto(array: np.ndarray, legacy: bool | None = None):
    """A BlobProto of ``array``; ``legacy`` (default: ndim <= 4) writes num/channels/height/width."""
    array = np.asarray(array)
    proto = pb.BlobProto()
    if legacy is None:
        legacy = array.ndim <= 4
    if legacy:
        if array.ndim > 4:
            raise ConfigError(f"a {array.ndim}-d array cannot use the legacy 4-d BlobProto shape")
        proto.num, proto.channels, proto.height, proto.width = (1,) * (4 - array.ndim) + array.shape
    else:
        proto.shape.dim.extend(array.shape)
    if array.dtype == np.float64:
        proto.double_data.extend(array.ravel().tolist())
    else:
        proto.data.extend(array.astype(np.float32, copy=False).ravel().tolist())
    return proto


def read_binaryproto(path: str) -> np.ndarray:
    """The array stored in a BlobProto file (legacy files come back 4-d: 1 x C x H x W)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"binaryproto file '{path}' does not exist",
                        hint="create a mean file with caffelite compute_image_mean") from None
    except OSError as exc:
        raise DataError(f"cannot read binaryproto file '{path}': {exc.strerror}") from None
    proto = pb.BlobProto()
    try:
        proto.ParseFromString(raw)
    except Exception:  # protobuf's DecodeError
        raise DataError(f"'{path}' is not a BlobProto (binaryproto) file") from None
    return blob_proto_to_array(proto, where=f"'{path}'")


def read_mean(path: str) -> np.ndarray:
    """A mean image file as a C x H x W array (the leading num must be 1)."""
    mean = read_binaryproto(path)
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3:
        raise DataError(f"mean file '{path}' holds a blob of shape {mean.shape}; "
                        "expected 1 x C x H x W", hint="create it with caffelite compute_image_mean")
    return mean


def write_binaryproto(path: str, array: np.ndarray, legacy: bool | None = None) -> None:
    """Write ``array`` as a BlobProto, atomically (a crash leaves the previous file)."""
    atomic_write_bytes(path, array_to_blob_proto(array, legacy).SerializeToString())


def atomic_write_bytes(path: str, payload: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        # mkstemp makes the file 0600; keep the old file's mode, or the usual 0644.
        os.fchmod(fd, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    # Makes the rename itself durable; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
