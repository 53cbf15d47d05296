"""``caffelite compute_image_mean``: the per-pixel mean image of an LMDB of Datums.

    caffelite compute_image_mean [--backend lmdb] DB [OUT.binaryproto]

As Caffe's tool: every record (raw pixels, float_data, or an encoded image
decoded with its own channels) is summed, the mean is written as a BlobProto of
legacy shape 1 x C x H x W, and the mean of each channel is logged
(``mean_value channel [c]: v``, ready for a transform_param's ``mean_value``).
Sums are kept in float64 (Caffe's float32 sums drift on large databases).
Encoded images are decoded by ``--workers`` processes.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

from ..cli import _flag
from ..errors import ConfigError, DataError

COMMAND = "compute_image_mean"
HELP = "compute the mean image of an LMDB of Datums (a .binaryproto for mean_file)"
SIZE_HINT = "a mean image needs records of one size: convert with --resize_height/--resize_width (and --check_size)"


def add_arguments(parser) -> None:
    parser.add_argument("db", metavar="DB", help="the LMDB to average")
    parser.add_argument("out", metavar="OUT.binaryproto", nargs="?", default=None,
                        help="where to write the mean (optional: without it, only the channel means are logged)")
    _flag(parser, "backend", default="lmdb", help="database backend: lmdb (LevelDB is not supported)")
    _flag(parser, "workers", type=int, default=os.cpu_count() or 1,
          help="processes decoding encoded images (default: all cores)")


def run(args) -> int:
    from ..data.imageset import ordered_map  # noqa: PLC0415
    from ..data.lmdb_source import count_records, iter_records  # noqa: PLC0415
    from ..io.binaryproto import write_binaryproto  # noqa: PLC0415
    from ..log import g, get_logger  # noqa: PLC0415
    from ..tools.convert_imageset import LEVELDB_HINT  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    log = get_logger()
    if args.backend.lower() == "leveldb":
        raise ConfigError("--backend leveldb: LevelDB is not supported", hint=LEVELDB_HINT)
    if args.backend.lower() != "lmdb":
        raise ConfigError(f"unknown --backend '{args.backend}'", hint="use lmdb")
    total = count_records(args.db)
    log.info("Opened lmdb %s", args.db)
    if total == 0:
        raise DataError(f"LMDB '{args.db}' holds no records", hint="convert images into it with convert_imageset")
    log.info("Starting iteration")
    # Raw pixels are summed here: sending them to a worker costs more than adding them.
    workers = max(1, args.workers) if _first_is_encoded(args.db) else 1
    chunks = _chunks(iter_records(args.db), 64)
    sums = ordered_map(functools.partial(sum_records, source=args.db), chunks, workers)
    total_sum, shape, first_key, count = None, None, None, 0
    try:
        for part in sums:
            if total_sum is None:
                total_sum, shape, first_key = part.sum, part.shape, part.first_key
            elif part.shape != shape:
                raise DataError(f"record '{part.first_key}' of '{args.db}' is {_size(part.shape)} but record "
                                f"'{first_key}' is {_size(shape)}", hint=SIZE_HINT)
            else:
                total_sum += part.sum
            before, count = count, count + part.count
            if count // 10000 > before // 10000:
                log.info("Processed %d files.", count // 10000 * 10000)
    finally:
        sums.close()
    if count % 10000:
        log.info("Processed %d files.", count)
    mean = (total_sum / count).astype(np.float32)
    if args.out:
        log.info("Write to %s", args.out)
        write_binaryproto(args.out, mean[None])
    log.info("Number of channels: %d", shape[0])
    for c, value in enumerate(mean.reshape(shape[0], -1).astype(np.float64).mean(axis=1)):
        log.info("mean_value channel [%d]: %s", c, g(value))
    return 0


class _Sum(NamedTuple):
    """The float64 sum of a run of records of one shape."""

    sum: object  # a float64 C x H x W array
    shape: tuple
    first_key: str
    count: int


def sum_records(records: list, source: str) -> _Sum:
    """Sum a chunk of (key, value) records; a record of another shape is a DataError."""
    import numpy as np  # noqa: PLC0415

    from ..data.datum import datum_to_array, parse_datum  # noqa: PLC0415

    total, shape, first_key = None, None, None
    for key, value in records:
        name = key.decode(errors="replace")
        item = datum_to_array(parse_datum(value, key, source), key=key, source=source)
        if total is None:
            shape, first_key = item.shape, name
            total = np.zeros(shape, np.float64)
        elif item.shape != shape:
            raise DataError(f"record '{name}' of '{source}' is {_size(item.shape)} but record "
                            f"'{first_key}' is {_size(shape)}", hint=SIZE_HINT)
        total += item
    return _Sum(total, shape, first_key, len(records))


def _first_is_encoded(path: str) -> bool:
    from ..data.datum import parse_datum  # noqa: PLC0415
    from ..data.lmdb_source import iter_records  # noqa: PLC0415

    records = iter_records(path)
    try:
        key, value = next(records)
    finally:
        records.close()
    return bool(parse_datum(value, key, path).encoded)


def _chunks(records, size: int):
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _size(shape) -> str:
    return "x".join(str(n) for n in shape)
