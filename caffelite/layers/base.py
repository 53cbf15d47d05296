"""The layer life cycle shared by every layer type.

A layer reads ``bottom`` blobs and writes ``top`` blobs::

    layer.layer_setup(bottom, top)   # counts checked -> setup -> reshape -> loss weights
    layer.forward(bottom, top)
    layer.backward(top, propagate_down, bottom)

``backward`` OVERWRITES bottom diffs and ADDS into parameter diffs (the solver
zeroes those once per iteration), which is what makes ``iter_size`` and
parameter sharing work. Layer bodies use ``self.xp`` (numpy or cupy) so one
body serves both devices.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..backend import CPU, Device, make_rng
from ..blob import Blob
from ..errors import ConfigError

TRAIN, TEST = 0, 1  # caffe.Phase values


@dataclass
class LayerContext:
    """What every layer of one net shares: phase, device, dtype and seed."""

    phase: int = TEST
    device: Device = CPU
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    seed: int = -1
    # Distinguishes the RNG streams of a training net and its test nets.
    net_key: int = 0
    # Multi-process data parallelism: this process's rank and the world size.
    rank: int = 0
    world_size: int = 1

    @property
    def xp(self):
        return self.device.xp


class Layer:
    """Base class: subclasses set the class attributes and override the four steps."""

    #: Number of bottoms: an int, a (min, max) pair (max None = unbounded), or None (any).
    num_bottom: int | tuple | None = None
    #: Number of tops, same forms as ``num_bottom``.
    num_top: int | tuple | None = None
    #: Name of the LayerParameter field holding this layer's settings.
    param_name: str | None = None

    def __init__(self, layer_param, ctx: LayerContext | None = None):
        self.layer_param = layer_param
        self.ctx = ctx or LayerContext()
        self.name = layer_param.name
        self.type = layer_param.type
        self.phase = layer_param.phase if layer_param.HasField("phase") else self.ctx.phase
        self.param = getattr(layer_param, self.param_name) if self.param_name else None
        self.blobs: list[Blob] = []
        self.param_propagate_down: list[bool] = []
        self.loss_weights: list[float] = []
        self._rng = None

    # ---- conveniences ------------------------------------------------------
    @property
    def xp(self):
        return self.ctx.xp

    @property
    def dtype(self) -> np.dtype:
        return self.ctx.dtype

    @property
    def device(self) -> Device:
        return self.ctx.device

    @property
    def rng(self) -> np.random.Generator:
        """This layer's own random stream, derived from the solver seed and its name."""
        if self._rng is None:
            key = zlib.crc32(self.name.encode())
            self._rng = make_rng(self.ctx.seed, self.ctx.net_key, key)
        return self._rng

    def refresh_device_inputs(self) -> None:
        """Put this iteration's host-drawn values (random seeds) into the device scalars that
        forward reads. Forward does it itself; a CUDA graph replay (solvers/cuda_graph.py)
        calls it before each replay, since the replay runs no Python."""

    def make_blob(self, shape: Sequence[int], name: str = "") -> Blob:
        return Blob(shape, self.dtype, self.device, name=name or self.name)

    def error(self, message: str, hint: str | None = None) -> ConfigError:
        """A ConfigError that names this layer (raise the result)."""
        return ConfigError(f"({self.type}) {message}", layer=self.name, hint=hint)

    # ---- life cycle --------------------------------------------------------
    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.check_blob_counts(bottom, top)
        self.setup(bottom, top)
        if not self.param_propagate_down:
            self.param_propagate_down = [True] * len(self.blobs)
        self.reshape(bottom, top)
        self.set_loss_weights(top)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        """One-time set-up: read ``self.param``, create ``self.blobs``."""

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        raise NotImplementedError

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        raise NotImplementedError

    def backward(self, top: list[Blob], propagate_down: list[bool], bottom: list[Blob]) -> None:
        """Default: a layer with nothing to propagate."""

    def allow_force_backward(self, bottom_index: int) -> bool:
        return True

    def check_blob_counts(self, bottom: list[Blob], top: list[Blob]) -> None:
        for what, rule, n in (("bottom", self.num_bottom, len(bottom)), ("top", self.num_top, len(top))):
            if rule is None:
                continue
            lo, hi = (rule, rule) if isinstance(rule, int) else rule
            if n < lo or (hi is not None and n > hi):
                want = str(lo) if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
                raise self.error(f"takes {want} {what} blob(s), got {n}",
                                 hint=f"fix the layer's '{what}:' list")

    def set_loss_weights(self, top: list[Blob]) -> None:
        """Store one loss weight per top; a top with a weight gets it in its diff."""
        given = list(self.layer_param.loss_weight)
        if given and len(given) != len(top):
            raise self.error(f"has {len(given)} loss_weight values for {len(top)} tops",
                             hint="give one loss_weight per top")
        self.loss_weights = given or [self.default_loss_weight(i) for i in range(len(top))]
        for blob, weight in zip(top, self.loss_weights):
            if weight:
                blob.diff[...] = weight

    def default_loss_weight(self, top_index: int) -> float:
        return 0.0

    # ---- running state that is not a parameter (data cursors, RNG) ---------
    def state_dict(self) -> dict:
        """JSON-safe state a snapshot must keep for an exact resume."""
        return {"rng": self._rng.bit_generator.state} if self._rng is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]

    def close(self) -> None:
        """Release threads and files (data layers)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.name}')"


class NeuronLayer(Layer):
    """One bottom, one top of the same shape; may run in place."""

    num_bottom = 1
    num_top = 1

    def reshape(self, bottom, top):
        top[0].reshape_like(bottom[0])


class LossLayer(Layer):
    """Predictions and labels (or targets) in, a scalar loss out.

    Top 0 is the loss (shape ``()``) and defaults to loss weight 1. Its diff
    holds that weight when ``backward`` runs, so the body multiplies by
    ``top[0].diff``.
    """

    num_bottom = 2
    num_top = 1

    def reshape(self, bottom, top):
        if bottom[0].shape[:1] != bottom[1].shape[:1]:
            raise self.error(f"bottoms must have the same number of items: "
                             f"{bottom[0].shape} vs {bottom[1].shape}",
                             hint="check the bottoms' batch sizes")
        top[0].reshape(())

    def default_loss_weight(self, top_index: int) -> float:
        return 1.0 if top_index == 0 else 0.0

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1


class DataLayer(Layer):
    """No bottoms; produces batches from a source."""

    num_bottom = 0

    def backward(self, top, propagate_down, bottom):
        pass


def blob_shape_list(shape_msg) -> list[int]:
    """A BlobShape message as a list of ints."""
    return [int(d) for d in shape_msg.dim]


def check_not_in_place(layer: Layer, bottom: list[Blob], top: list[Blob]) -> None:
    """Raise if ``layer`` was wired to write its top over a bottom."""
    for t in top:
        if any(t is b for b in bottom):
            raise layer.error("cannot run in place", hint="give the top its own name")

