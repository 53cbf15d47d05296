"""Data: Datum records from an LMDB, decoded and transformed by the prefetch workers.

The top is data (N x C x H x W) and an optional label (N). LevelDB is not
supported; a LevelDB folder is reported with a hint to convert it.
"""
from __future__ import annotations

import os
import threading
import weakref

import numpy as np

from ..data.datum import datum_shape, datum_to_array, decode_image, parse_datum, where
from ..data.lmdb_source import LMDBReader
from ..data.transform import DataTransformer, check_item_shape, merged_transform_param
from ..proto import pb
from ..registry import register_layer
from .prefetching_layer import PrefetchingDataLayer, decode_planar, decode_rgb_planes

LEVELDB = pb.DataParameter.LEVELDB


@register_layer("Data")
class LMDBDataLayer(PrefetchingDataLayer):
    """Datum records from an LMDB, decoded and transformed by a pool of workers.

    Tops: data (batch_size, C, H, W) with H, W after cropping; label (batch_size,).
    Each batch is shaped from its first record. Each worker reads with its own
    cursor; rank r of N reads records r, r + N, ... (TRAIN).
    """

    param_name = "data_param"
    num_top = (1, 2)

    def setup(self, bottom, top):
        p = self.param
        if not p.source:
            raise self.error("data_param.source is not set", hint="give the LMDB folder")
        self.batch_size = self._check_batch_size(p.batch_size, "data_param.batch_size")
        self._check_backend(p)
        self.transformer = DataTransformer(merged_transform_param(self.layer_param, "data_param"),
                                           self.phase, self.dtype, layer=self.name)
        self.force_color = self.transformer.force_color or p.force_encoded_color
        self.force_gray = self.transformer.force_gray
        if self.force_color and self.force_gray:
            raise self.error("force_encoded_color and force_gray cannot both be set",
                             hint="keep one of them")
        self.source = p.source
        self._prefetcher = None
        # One reader (cursor) per worker, made by the worker; closed when the workers restart,
        # at close(), or when an abandoned layer is collected.
        self._readers: dict[int, LMDBReader] = {}
        self._readers_lock = threading.Lock()
        self._closer = weakref.finalize(self, _close_readers, self._readers, self._readers_lock)
        reader = LMDBReader(p.source)
        try:
            key, value = reader.first()
            shape = datum_shape(parse_datum(value, key, p.source), self.force_color,
                                self.force_gray, key, p.source)
            out_shape = self.transformer.output_shape(shape)
        finally:
            reader.close()
        top[0].reshape((self.batch_size,) + out_shape)
        if len(top) > 1:
            top[1].reshape((self.batch_size,))
        self._init_stream()
        # Caffe's rand_skip: start a random number of records into the database.
        self._skip = int(self.rng.integers(p.rand_skip)) if p.rand_skip else 0
        self._init_prefetch(p.prefetch)

    def _check_backend(self, p) -> None:
        asked = p.HasField("backend") and p.backend == LEVELDB
        # Caffe's default backend is LEVELDB: an unset backend is read as an LMDB unless the
        # folder is plainly a LevelDB.
        looks_leveldb = (os.path.isdir(p.source) and os.path.exists(os.path.join(p.source, "CURRENT"))
                         and not os.path.exists(os.path.join(p.source, "data.mdb")))
        if asked or (not p.HasField("backend") and looks_leveldb):
            raise self.error("LEVELDB is not supported; convert the database to LMDB",
                             hint="e.g. with caffelite convert_imageset, or re-create it with backend: LMDB")

    def reset_workers(self) -> None:
        # Fresh cursors for the new threads (a read transaction belongs to one thread).
        _close_readers(self._readers, self._readers_lock)

    def _worker_reader(self, worker: int) -> LMDBReader:
        reader = self._readers.get(worker)
        if reader is None:
            reader = LMDBReader(self.source)
            with self._readers_lock:
                self._readers[worker] = reader
        return reader

    def load_batch(self, index: int, batch) -> None:
        """Read, decode and transform batch ``index`` into ``batch`` (runs in a worker thread)."""
        n = self.batch_size
        start = self._skip + index * n * self._world + self._rank
        records = self._worker_reader(batch.worker).read(start, n, self._world)
        datums = [parse_datum(value, key, self.source) for key, value in records]
        first = datums[0]
        c, h, w = first.channels, first.height, first.width
        size = c * h * w
        rng = self.batch_rng(index) if self.transformer.is_random else None
        flipped = None
        if not first.encoded and size and all(
                not d.encoded and d.channels == c and d.height == h and d.width == w
                and len(d.data) == size for d in datums):
            # Raw uint8 records: one buffer for the whole batch, no per-item arrays.
            items = np.frombuffer(b"".join(d.data for d in datums), np.uint8).reshape(n, c, h, w)
            draw = self.transformer.draw(n, items.shape[1:], rng)
        elif all(d.encoded for d in datums):
            items, draw, flipped = self._decode_all(datums, records, batch, rng)
        else:
            items = []
            for d, (key, _) in zip(datums, records):
                if d.encoded:
                    item = decode_planar(d.data, self.force_color, self.force_gray, key, self.source)
                else:
                    item = datum_to_array(d, self.force_color, self.force_gray, key, self.source)
                if items:
                    check_item_shape(item.shape, items[0].shape, where(key, self.source))
                items.append(item)
            draw = self.transformer.draw(n, items[0].shape, rng)
        out = batch.array("data", (n,) + self.transformer.output_shape(items[0].shape), self.dtype)
        self.transformer.apply(items, draw, out, flipped)
        batch.array("label", (n,), self.dtype)[...] = [d.label for d in datums]

    def _decode_all(self, datums, records, batch, rng):
        """Encoded images decoded straight into the batch's reusable N x C x H x W uint8 buffer.

        The first image gives the shape the random choices need; the others are
        mirrored by the decoder when drawn so. Returns (items, draw, flipped).
        """
        fc, fg, source = self.force_color, self.force_gray, self.source
        first = decode_planar(datums[0].data, fc, fg, records[0][0], source)
        n = len(datums)
        draw = self.transformer.draw(n, first.shape, rng)
        items = batch.array("items", (n,) + first.shape, np.uint8)
        items[0] = first
        flipped = np.zeros(n, bool)
        for i in range(1, n):
            key = records[i][0]
            mirror = draw.flip is not None and bool(draw.flip[i])
            target = items[i]
            planes = None if fg else decode_rgb_planes(datums[i].data, target, mirror)
            if planes is target:  # decoded in place (and mirrored, if drawn so)
                flipped[i] = mirror
                continue
            # Not a colour image, or one of another size (which the check below reports).
            item = planes if planes is not None else decode_image(datums[i].data, fc, fg, key, source)
            check_item_shape(item.shape, items.shape[1:], where(key, source))
            target[...] = item
        return items, draw, flipped

    def state_dict(self) -> dict:
        return {**super().state_dict(), "skip": self._skip}

    def load_state_dict(self, state: dict) -> None:
        self._skip = int(state.get("skip", self._skip))
        super().load_state_dict(state)

    def close(self) -> None:
        super().close()
        if getattr(self, "_closer", None) is not None:
            self._closer()  # closes the readers, once


def _close_readers(readers: dict, lock: threading.Lock) -> None:
    with lock:
        closing = list(readers.values())
        readers.clear()
    for reader in closing:
        reader.close()
