"""``caffelite extract_features``: blobs of a trained net, item by item, into LMDBs of Datums.

    caffelite extract_features WEIGHTS NET blob1,blob2 db1,db2 NUM_BATCHES lmdb [CPU|GPU] [DEVICE_ID]

As Caffe's tool: the net of NET is built in the TEST phase (its data layers
supply the inputs), WEIGHTS are copied into it, and NUM_BATCHES forward passes
are run. Every item of every named blob becomes one Datum with ``float_data``
and Caffe's legacy shape fields: a blob (N, C, H, W) gives records C x H x W,
(N, D) gives D x 1 x 1, a scalar (a loss) one record of one value per batch.
Keys are ``%010d``, counting the blob's items over all batches. Each database
appears only when complete; an existing one is replaced only with ``--force``.
"""
from __future__ import annotations

import os

from ..cli import _flag
from ..errors import ConfigError, did_you_mean

COMMAND = "extract_features"
HELP = "write the values of a trained net's blobs, item by item, to LMDBs"


def add_arguments(parser) -> None:
    parser.add_argument("weights", metavar="WEIGHTS", help="trained weights (.caffemodel or .caffemodel.h5)")
    parser.add_argument("net", metavar="NET", help="the net (.yaml or .prototxt); its TEST phase is run")
    parser.add_argument("blobs", metavar="BLOBS", help="comma-separated blob names")
    parser.add_argument("dbs", metavar="DBS", help="comma-separated output LMDBs, one per blob")
    parser.add_argument("num_batches", metavar="NUM_BATCHES", help="forward passes to run")
    parser.add_argument("backend", metavar="BACKEND", help="lmdb (LevelDB is not supported)")
    parser.add_argument("mode", metavar="CPU|GPU", nargs="?", default="CPU", help="device (default CPU)")
    parser.add_argument("device_id", metavar="DEVICE_ID", nargs="?", default="0", help="GPU id (default 0)")
    _flag(parser, "force", action="store_true", help="replace output databases that exist")


def run(args) -> int:
    from .. import config  # noqa: PLC0415
    from ..data.lmdb_source import LMDBWriter  # noqa: PLC0415
    from ..io.weights import copy_weights  # noqa: PLC0415
    from ..layers.base import TEST  # noqa: PLC0415
    from ..log import get_logger  # noqa: PLC0415
    from ..net import Net  # noqa: PLC0415
    from ..proto import pb  # noqa: PLC0415
    from .convert_imageset import LEVELDB_HINT  # noqa: PLC0415

    log = get_logger()
    num_batches, device = _check_args(args, LEVELDB_HINT)
    blob_names = [b.strip() for b in args.blobs.split(",")]
    db_names = [d.strip() for d in args.dbs.split(",")]
    if "" in blob_names or "" in db_names:
        raise ConfigError("empty name in the blob or database list", hint="separate names by commas, no spaces")
    if len(blob_names) != len(db_names):
        raise ConfigError(f"{len(blob_names)} blob names but {len(db_names)} databases",
                          hint="give one output database per blob, in the same order")
    for db in db_names:
        if os.path.exists(db) and not args.force:
            raise ConfigError(f"'{db}' already exists", hint="pass --force to replace it, or choose another path")
    log.info("Using %s", "GPU" if device.is_gpu else "CPU")
    net = Net(config.load_net(args.net), phase=TEST, device=device, source=args.net)
    writers: list = []
    try:
        copy_weights(net, args.weights)
        for name in blob_names:
            if name not in net.blobs:
                hint = did_you_mean(name, net.blobs) or f"the net's blobs are: {', '.join(net.blobs)}"
                raise ConfigError(f"unknown feature blob name '{name}' in the network", file=args.net, hint=hint)
        for db in db_names:
            log.info("Opening dataset %s", db)
            writers.append(LMDBWriter(db, append=True))
        log.info("Extracting Features")
        for _ in range(num_batches):
            net.forward()
            for name, writer in zip(blob_names, writers):
                for values, shape in _items(net.blobs[name]):
                    datum = pb.Datum(channels=shape[0], height=shape[1], width=shape[2])
                    datum.float_data.extend(values)
                    writer.put(b"%010d" % len(writer), datum.SerializeToString())
                    if len(writer) % 1000 == 0:
                        log.info("Extracted features of %d query images for feature blob %s", len(writer), name)
        for name, writer in zip(blob_names, writers):
            if len(writer) % 1000:
                log.info("Extracted features of %d query images for feature blob %s", len(writer), name)
        while writers:
            writers[0].finish()
            writers.pop(0)
    finally:
        for writer in writers:
            writer.abort()
        net.close()
    log.info("Successfully extracted the features!")
    return 0


def legacy_shape(shape: tuple) -> tuple[int, int, int, int]:
    """Caffe's (num, channels, height, width) of a blob: missing axes are 1, extra ones fold into width."""
    import numpy as np  # noqa: PLC0415

    dims = list(shape) + [1] * (4 - len(shape))
    return dims[0], dims[1], dims[2], int(np.prod(dims[3:]))


def _items(blob):
    """(float_data values, (C, H, W)) of each item of the blob along its first axis."""
    import numpy as np  # noqa: PLC0415

    num, c, h, w = legacy_shape(blob.shape)
    values = np.asarray(blob.cpu_data(), dtype=np.float32).reshape(num, -1)
    for row in values:
        yield row, (c, h, w)


def _check_args(args, leveldb_hint: str):
    from ..backend import CPU, Device, gpu_available  # noqa: PLC0415

    try:
        num_batches = int(args.num_batches)
    except ValueError:
        raise ConfigError(f"NUM_BATCHES '{args.num_batches}' is not a number", hint="for example 10") from None
    if num_batches < 1:
        raise ConfigError("NUM_BATCHES must be at least 1")
    backend = args.backend.lower()
    if backend == "leveldb":
        raise ConfigError("LevelDB is not supported", hint=leveldb_hint)
    if backend != "lmdb":
        raise ConfigError(f"unknown database backend '{args.backend}'", hint="use lmdb")
    mode = args.mode.upper()
    if mode not in ("CPU", "GPU"):
        raise ConfigError(f"unknown mode '{args.mode}'", hint="use CPU or GPU")
    if mode == "CPU":
        return num_batches, CPU
    try:
        device_id = int(args.device_id)
    except ValueError:
        raise ConfigError(f"DEVICE_ID '{args.device_id}' is not a number", hint="for example 0") from None
    if not gpu_available():
        raise ConfigError("GPU mode: no GPU found (CuPy is not installed or no CUDA device is visible)",
                          hint="use CPU")
    return num_batches, Device.gpu(device_id)
