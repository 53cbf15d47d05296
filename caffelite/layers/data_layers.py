"""Data layers: Data (LMDB), HDF5Data, MemoryData, DummyData, Input.

They have no bottoms and nothing to propagate. Their tops are
data (N x C x H x W, or N x ... for HDF5) and an optional label (N).

Every random choice a batch needs (crop offsets, mirror flags) comes from a
Generator derived from (seed, net, layer, rank, batch index), and every
reader seeks by batch index, so batch k is the same whatever the prefetch
timing; ``state_dict()`` keeps the number of batches consumed by ``forward``
and ``load_state_dict`` restarts there (exact resume).
"""
from __future__ import annotations

import os
import zlib

import numpy as np

from ..backend import seed_from_clock
from ..data.datum import datum_shape, datum_to_array, parse_datum, where
from ..data.hdf5_source import HDF5Source
from ..data.lmdb_source import LMDBReader
from ..data.prefetch import Prefetcher
from ..data.transform import DataTransformer, check_item_shape
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


def _transform_param(layer_param):
    """transform_param, plus the deprecated data_param copies of its fields when it lacks them."""
    tp = pb.TransformationParameter()
    tp.CopyFrom(layer_param.transform_param)
    dp = layer_param.data_param
    for field in ("scale", "mean_file", "crop_size", "mirror"):
        if dp.HasField(field) and not tp.HasField(field):
            setattr(tp, field, getattr(dp, field))
    return tp


@register_layer("Data")
class LMDBDataLayer(_StreamLayer):
    """Datum records from an LMDB, transformed, prefetched in a background thread.

    Tops: data (batch_size, C, H, W) with H, W after cropping; label (batch_size,).
    Each batch is shaped from its first record.
    """

    param_name = "data_param"
    num_top = (1, 2)

    def setup(self, bottom, top):
        p = self.param
        if not p.source:
            raise self.error("data_param.source is not set", hint="give the LMDB folder")
        self.batch_size = self._check_batch_size(p.batch_size, "data_param.batch_size")
        self._check_backend(p)
        self.transformer = DataTransformer(_transform_param(self.layer_param), self.phase,
                                           self.dtype, layer=self.name)
        self.force_color = self.transformer.force_color or p.force_encoded_color
        self.force_gray = self.transformer.force_gray
        if self.force_color and self.force_gray:
            raise self.error("force_encoded_color and force_gray cannot both be set",
                             hint="keep one of them")
        self.source = p.source
        self._prefetcher = None
        self.reader = LMDBReader(p.source)
        try:
            key, value = self.reader.first()
            shape = datum_shape(parse_datum(value, key, p.source), self.force_color,
                                self.force_gray, key, p.source)
            out_shape = self.transformer.output_shape(shape)
        except BaseException:
            self.close()
            raise
        top[0].reshape((self.batch_size,) + out_shape)
        if len(top) > 1:
            top[1].reshape((self.batch_size,))
        self._init_stream()
        # Caffe's rand_skip: start a random number of records into the database.
        self._skip = int(self.rng.integers(p.rand_skip)) if p.rand_skip else 0
        self.depth = max(1, int(p.prefetch))
        self._start()

    def _check_backend(self, p) -> None:
        asked = p.HasField("backend") and p.backend == LEVELDB
        # Caffe's default backend is LEVELDB: an unset backend is read as an LMDB unless the
        # folder is plainly a LevelDB.
        looks_leveldb = (os.path.isdir(p.source) and os.path.exists(os.path.join(p.source, "CURRENT"))
                         and not os.path.exists(os.path.join(p.source, "data.mdb")))
        if asked or (not p.HasField("backend") and looks_leveldb):
            raise self.error("LEVELDB is not supported; convert the database to LMDB",
                             hint="e.g. with caffelite convert_imageset, or re-create it with backend: LMDB")

    def _start(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._prefetcher = Prefetcher(self._load_batch, self.depth, start=self.consumed, name=self.name)

    def _load_batch(self, index: int, batch) -> None:
        """Read, decode and transform batch ``index`` into ``batch`` (runs in the worker thread)."""
        n = self.batch_size
        start = self._skip + index * n * self._world + self._rank
        records = self.reader.read(start, n, self._world)
        datums = [parse_datum(value, key, self.source) for key, value in records]
        first = datums[0]
        c, h, w = first.channels, first.height, first.width
        size = c * h * w
        if not first.encoded and size and all(
                not d.encoded and d.channels == c and d.height == h and d.width == w
                and len(d.data) == size for d in datums):
            # Raw uint8 records: one buffer for the whole batch, no per-item arrays.
            items = np.frombuffer(b"".join(d.data for d in datums), np.uint8).reshape(n, c, h, w)
        else:
            arrays = [datum_to_array(d, self.force_color, self.force_gray, key, self.source)
                      for d, (key, _) in zip(datums, records)]
            for array, (key, _) in zip(arrays[1:], records[1:]):
                check_item_shape(array.shape, arrays[0].shape, where(key, self.source))
            items = np.stack(arrays)
        out = batch.array("data", (n,) + self.transformer.output_shape(items.shape[1:]), self.dtype)
        rng = self.batch_rng(index) if self.transformer.is_random else None
        self.transformer(items, rng, out)
        batch.array("label", (n,), self.dtype)[...] = [d.label for d in datums]

    def forward(self, bottom, top):
        if self._prefetcher is None:
            raise self.error("is closed", hint="build the net again to read more data")
        batch = self._prefetcher.next()
        if batch.index != self.consumed:  # the worker must deliver batches in order
            raise CaffeliteError(f"layer '{self.name}': got batch {batch.index}, expected {self.consumed}")
        top[0].reshape(batch.data.shape)
        top[0].set_data(batch.data)
        if len(top) > 1:
            top[1].reshape(batch.label.shape)
            top[1].set_data(batch.label)
        self._prefetcher.release(batch)
        self.consumed += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "skip": self._skip}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._skip = int(state.get("skip", self._skip))
        self._start()  # drop what was prefetched; continue from the restored batch

    def close(self) -> None:
        # Safe to call twice, and after a failed setup.
        if getattr(self, "_prefetcher", None) is not None:
            self._prefetcher.close()
            self._prefetcher = None
        if getattr(self, "reader", None) is not None:
            self.reader.close()
            self.reader = None


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
        # No rank in the key: every rank must see the same permutation to split it.
        self.hdf5 = HDF5Source(p.source, names, p.shuffle,
                               seed_key=(self._seed, self.ctx.net_key & 0xFFFFFFFF, self._key))
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
        self.hdf5.reseed((self._seed, *self.hdf5.seed_key[1:]))


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
