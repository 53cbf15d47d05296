"""Data layers: Data (LMDB), HDF5Data, MemoryData, DummyData, Input.

They have no bottoms and nothing to propagate. Their tops are
data (N x C x H x W, or N x ... for HDF5) and an optional label (N).

Every random choice a batch needs (crop offsets, mirror flags) comes from a
Generator derived from (seed, net, layer, rank, batch index), and every
reader seeks by batch index, so batch k is the same whatever the prefetch
timing or the number of decode workers; ``state_dict()`` keeps the number of
batches consumed by ``forward`` and ``load_state_dict`` restarts there
(exact resume).

Layers that decode images (Data here, ImageData, WindowData) derive from
``PrefetchingDataLayer``: a pool of worker threads (``$CAFFELITE_DATA_WORKERS``,
default one per CPU) loads whole batches ahead, and ``forward`` hands the
ready buffer to the top without copying, as Caffe 1.0 does.
"""
from __future__ import annotations

import io
import os
import threading
import weakref
import zlib

import numpy as np
from PIL import Image

from ..backend import seed_from_clock
from ..data.datum import datum_shape, datum_to_array, decode_image, parse_datum, where
from ..data.hdf5_source import HDF5Source
from ..data.lmdb_source import LMDBReader
from ..data.prefetch import Prefetcher, default_workers
from ..data.transform import DataTransformer, check_item_shape, merged_transform_param
from ..errors import CaffeliteError
from ..fillers import fill
from ..proto import pb
from ..registry import register_layer
from .base import TRAIN, DataLayer, blob_shape_list

LEVELDB = pb.DataParameter.LEVELDB


class _StreamLayer(DataLayer):
    """Shared by the batch-producing layers: batch counter, per-batch RNG, sharding."""

    def reshape(self, bottom, top):
        pass  # tops take each batch's shape in forward

    def _init_stream(self) -> None:
        self.consumed = 0
        self._seed = self.ctx.seed if self.ctx.seed >= 0 else seed_from_clock()
        self._key = zlib.crc32(self.name.encode())
        # Caffe shards only training data: test nets run on rank 0 alone.
        sharded = self.phase == TRAIN and self.ctx.world_size > 1
        self._world, self._rank = (self.ctx.world_size, self.ctx.rank) if sharded else (1, 0)

    def batch_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self._seed, self.ctx.net_key & 0xFFFFFFFF, self._key,
                                      self._rank, index])

    def _check_batch_size(self, batch_size: int, field: str) -> int:
        if batch_size <= 0:
            raise self.error(f"{field} must be positive", hint=f"set {field}")
        return int(batch_size)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "batches": self.consumed, "seed": self._seed}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.consumed = int(state.get("batches", 0))
        self._seed = int(state.get("seed", self._seed))


class PrefetchingDataLayer(_StreamLayer):
    """Batches loaded ahead by a pool of workers; subclasses define ``load_batch(index, batch)``.

    ``load_batch`` runs in a worker thread and fills ``batch.data`` (and
    ``batch.label``) with ``batch.array(...)``; ``batch.worker`` names the
    worker, for per-worker readers. Errors it raises reach ``forward``.
    """

    def _init_prefetch(self, prefetch: int) -> None:
        self.workers = default_workers()
        # One buffer more than workers: forward keeps the batch it gave the top.
        self.depth = max(1, int(prefetch), self.workers + 1)
        self._prefetcher = None
        self._current = None
        self._start()

    def _start(self) -> None:
        if getattr(self, "_prefetcher", None) is not None:
            self._prefetcher.close()
        self._current = None
        self.reset_workers()
        self._prefetcher = Prefetcher(self.load_batch, self.depth, start=self.consumed,
                                      name=self.name, workers=self.workers)

    def reset_workers(self) -> None:
        """Called when the workers are (re)started, after the old ones have stopped."""

    def load_batch(self, index: int, batch) -> None:
        raise NotImplementedError

    def forward(self, bottom, top):
        if self._prefetcher is None:
            raise self.error("is closed", hint="build the net again to read more data")
        if self._current is not None:  # the top stops using it now
            self._prefetcher.release(self._current)
            self._current = None
        batch = self._prefetcher.next()
        if batch.index != self.consumed:  # the workers must deliver batches in order
            raise CaffeliteError(f"layer '{self.name}': got batch {batch.index}, expected {self.consumed}")
        # Caffe 1.0's hand-off: on the CPU the top uses the batch buffer itself until the next
        # forward; on a GPU the assignment copies it to the device, and the buffer is free at once.
        top[0].reshape(batch.data.shape)
        top[0].data = batch.data
        if len(top) > 1:
            top[1].reshape(batch.label.shape)
            top[1].data = batch.label
        if self.device.is_gpu:
            self._prefetcher.release(batch)
        else:
            self._current = batch
        self.consumed += 1

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._start()  # drop what was prefetched; continue from the restored batch

    def close(self) -> None:
        # Safe to call twice, and after a failed setup.
        if getattr(self, "_prefetcher", None) is not None:
            self._prefetcher.close()
            self._prefetcher = None
        self._current = None


def decode_planar(data: bytes, force_color: bool = False, force_gray: bool = False,
                  key=None, source=None, out: np.ndarray | None = None) -> np.ndarray:
    """Encoded image bytes -> C x H x W uint8 BGR (or grey), exactly as ``decode_image`` gives.

    Colour images take ``decode_rgb_planes`` (into ``out`` when it fits);
    anything else (grey, palette, 16-bit, CMYK, corrupt) takes ``decode_image``.
    """
    if not force_gray:
        planes = decode_rgb_planes(data, out)
        if planes is not None:
            return planes
    return decode_image(data, force_color, force_gray, key=key, source=source)


def decode_rgb_planes(data: bytes, out: np.ndarray | None = None,
                      mirror: bool = False) -> np.ndarray | None:
    """A colour (RGB) image as 3 x H x W uint8 BGR planes, mirrored left-right if asked;
    None when the bytes are not a readable RGB image.

    Pillow unpacks one band at a time (B, G, R), so each plane arrives
    contiguous and the transform reads whole rows instead of every third byte;
    Pillow mirrors 4-byte pixels in C. Measured on 256x256 JPEGs: ~100 µs less
    per image than transposing Pillow's H x W x RGB array, and ~100 µs less per
    mirrored image than a reversed NumPy copy. ``out`` (3 x H x W) is filled
    and returned when the image fits it.
    """
    try:
        image = Image.open(io.BytesIO(data))
        if image.mode != "RGB":
            return None
        h, w = image.height, image.width
        if out is None or out.shape != (3, h, w):
            out = np.empty((3, h, w), np.uint8)
        image.load()
        if mirror:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for plane, band in zip(out, "BGR"):
            plane[...] = np.frombuffer(image.tobytes("raw", band), np.uint8).reshape(h, w)
        return out
    except Exception:  # noqa: BLE001 - the caller's fallback raises the proper DataError
        return None


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


@register_layer("HDF5Data")
class HDF5DataLayer(_StreamLayer):
    """Rows of the datasets named like the tops, from the .h5 files of a list file.

    Tops: one per dataset, (batch_size, *dataset.shape[1:]). No transform.
    """

    param_name = "hdf5_data_param"
    num_top = (1, None)

    def setup(self, bottom, top):
        p = self.param
        if not p.source:
            raise self.error("hdf5_data_param.source is not set",
                             hint="give a text file listing the .h5 files")
        self.batch_size = self._check_batch_size(p.batch_size, "hdf5_data_param.batch_size")
        self._init_stream()
        names = list(self.layer_param.top) or [f"top{i}" for i in range(len(top))]
        # No rank in the key: every rank must see the same permutation to split it (the solver
        # seeds rank r with seed + r, so the shuffle uses the rank-0 seed).
        self.hdf5 = HDF5Source(p.source, names, p.shuffle,
                               seed_key=(self._seed - self.ctx.rank, self.ctx.net_key & 0xFFFFFFFF,
                                         self._key))
        self.names = names
        for blob, name in zip(top, names):
            blob.reshape((self.batch_size,) + self.hdf5.item_shapes[name])

    def forward(self, bottom, top):
        positions = (self.consumed * self.batch_size + np.arange(self.batch_size)) * self._world + self._rank
        rows = self.hdf5.read(positions)
        for blob, name in zip(top, self.names):
            blob.reshape(rows[name].shape)
            blob.set_data(rows[name])
        self.consumed += 1

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.hdf5.reseed((self._seed - self.ctx.rank, *self.hdf5.seed_key[1:]))


@register_layer("MemoryData")
class MemoryDataLayer(_StreamLayer):
    """Batches from NumPy arrays given with ``reset(data, labels)``, wrapping around.

    data: (n, channels, height, width), labels: (n,). The transform_param applies.
    """

    param_name = "memory_data_param"
    num_top = (1, 2)

    def setup(self, bottom, top):
        p = self.param
        self.batch_size = self._check_batch_size(p.batch_size, "memory_data_param.batch_size")
        self.item_shape = (int(p.channels), int(p.height), int(p.width))
        if min(self.item_shape) <= 0:
            raise self.error("memory_data_param needs positive channels, height and width",
                             hint="set the shape of one item")
        self.transformer = DataTransformer(self.layer_param.transform_param, self.phase,
                                           self.dtype, layer=self.name)
        out_shape = self.transformer.output_shape(self.item_shape)
        top[0].reshape((self.batch_size,) + out_shape)
        if len(top) > 1:
            top[1].reshape((self.batch_size,))
        self._init_stream()
        self._data = self._labels = None
        self.pos = 0
        self._out = None

    def reset(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Serve ``data`` (n x C x H x W) and ``labels`` (n) from the start."""
        data = np.asarray(data)
        labels = np.asarray(labels).reshape(-1)
        if data.ndim != 4 or data.shape[1:] != self.item_shape or data.shape[0] == 0:
            raise self.error(f"reset() got data of shape {data.shape}; expected (n, "
                             f"{', '.join(map(str, self.item_shape))}) with n >= 1",
                             hint="match memory_data_param's channels/height/width")
        if labels.shape[0] != data.shape[0]:
            raise self.error(f"reset() got {labels.shape[0]} labels for {data.shape[0]} items",
                             hint="give one label per item")
        self._data, self._labels, self.pos = data, labels, 0

    def forward(self, bottom, top):
        if self._data is None:
            raise self.error("has no data", hint="call reset(data, labels) before forward")
        n, b = self._data.shape[0], self.batch_size
        if self.pos + b <= n:
            items, labels = self._data[self.pos:self.pos + b], self._labels[self.pos:self.pos + b]
        else:
            index = (self.pos + np.arange(b)) % n
            items, labels = self._data[index], self._labels[index]
        rng = self.batch_rng(self.consumed) if self.transformer.is_random else None
        self._out = self.transformer(items, rng, self._out)
        top[0].reshape(self._out.shape)
        top[0].set_data(self._out)
        if len(top) > 1:
            top[1].reshape((b,))
            top[1].set_data(labels.astype(self.dtype))
        self.pos = (self.pos + b) % n
        self.consumed += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pos = int(state.get("pos", 0))


@register_layer("DummyData")
class DummyDataLayer(DataLayer):
    """Tops of given shapes filled by fillers (default constant 0).

    Constant fillers fill once at set-up; others refill every forward, as in Caffe.
    """

    param_name = "dummy_data_param"
    num_top = (1, None)

    def setup(self, bottom, top):
        p, n = self.param, len(top)
        legacy = [list(p.num), list(p.channels), list(p.height), list(p.width)]
        if len(p.shape) and any(legacy):
            raise self.error("has both shape and num/channels/height/width", hint="use shape")
        if len(p.shape):
            shapes = [blob_shape_list(s) for s in self._pick(p.shape, n, "shape")]
        elif any(legacy):
            columns = [self._pick(values, n, field) for values, field in
                       zip(legacy, ("num", "channels", "height", "width"))]
            shapes = [list(dims) for dims in zip(*columns)]
        else:
            raise self.error("needs a shape", hint="add dummy_data_param.shape (one, or one per top)")
        if len(p.data_filler):
            self.fillers = self._pick(p.data_filler, n, "data_filler")
        else:
            self.fillers = [pb.FillerParameter(type="constant", value=0)] * n
        self.refill = [f.type != "constant" for f in self.fillers]
        for blob, shape, filler, refill in zip(top, shapes, self.fillers, self.refill):
            blob.reshape(shape)
            if not refill:
                fill(blob, filler, self.rng)

    def _pick(self, values, n: int, field: str) -> list:
        if len(values) == 1:
            return [values[0]] * n
        if len(values) != n:
            raise self.error(f"has {len(values)} {field} entries for {n} tops",
                             hint=f"give one {field}, or one per top")
        return list(values)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        for blob, filler, refill in zip(top, self.fillers, self.refill):
            if refill:
                fill(blob, filler, self.rng)


@register_layer("Input")
class InputLayer(DataLayer):
    """Declares tops of given shapes (one shape for all tops, or one per top); the caller fills them."""

    param_name = "input_param"
    num_top = (1, None)

    def setup(self, bottom, top):
        shapes = list(self.param.shape)
        if len(shapes) not in (0, 1, len(top)):
            raise self.error(f"has {len(shapes)} shapes for {len(top)} tops",
                             hint="give one shape, or one per top")
        for i, blob in enumerate(top):
            if shapes:
                blob.reshape(blob_shape_list(shapes[0 if len(shapes) == 1 else i]))

    def reshape(self, bottom, top):
        pass  # the shapes stay as set up or as the user reshaped them

    def forward(self, bottom, top):
        pass
