"""Devices, the array module (numpy or cupy) and random number generation.

This is the only module that imports cupy, and it does so only when a GPU is
asked for, so CPU-only machines never need it.
"""
from __future__ import annotations

import numpy as np

from .errors import ConfigError

_cupy = None


def cupy_module():
    """Import cupy on first use; a clear ConfigError when it is not installed."""
    global _cupy
    if _cupy is None:
        try:
            import cupy  # noqa: PLC0415 - deliberately lazy
        except Exception as exc:  # ImportError, or a CUDA driver error at import
            raise ConfigError(
                f"a GPU was requested but CuPy cannot be imported ({exc})",
                hint="install the GPU extra: pip install 'caffelite[gpu]', or run on the CPU",
            ) from None
        _cupy = cupy
    return _cupy


def gpu_available() -> bool:
    try:
        cp = cupy_module()
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


class Device:
    """Where a net's blobs live: ``Device.cpu()`` or ``Device.gpu(id)``."""

    __slots__ = ("kind", "id")

    def __init__(self, kind: str = "cpu", id: int = 0):
        if kind not in ("cpu", "gpu"):
            raise ConfigError(f"unknown device kind '{kind}'", hint="use 'cpu' or 'gpu'")
        self.kind = kind
        self.id = id

    @classmethod
    def cpu(cls) -> "Device":
        return cls("cpu")

    @classmethod
    def gpu(cls, id: int = 0) -> "Device":
        return cls("gpu", id)

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

    @property
    def xp(self):
        """The array module for this device."""
        if self.kind == "cpu":
            return np
        cp = cupy_module()
        cp.cuda.Device(self.id).use()
        return cp

    def __eq__(self, other) -> bool:
        return isinstance(other, Device) and (self.kind, self.id) == (other.kind, other.id)

    def __hash__(self) -> int:
        return hash((self.kind, self.id))

    def __repr__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"gpu:{self.id}"


CPU = Device.cpu()


def to_numpy(array) -> np.ndarray:
    """A NumPy view or copy of a NumPy or CuPy array."""
    if isinstance(array, np.ndarray):
        return array
    return array.get()


def array_module(array):
    """numpy for NumPy arrays, cupy for CuPy arrays."""
    if isinstance(array, np.ndarray) or _cupy is None:
        return np
    return _cupy.get_array_module(array)


def seed_from_clock() -> int:
    """What Caffe does for ``random_seed: -1``: a fresh, unpredictable seed."""
    return int(np.random.SeedSequence().entropy % (2 ** 31))


def make_rng(seed: int | None, *key: int) -> np.random.Generator:
    """A PCG64 generator for ``seed`` and an optional sub-stream ``key``.

    Each layer gets its own stream, so adding a layer does not change the
    random numbers another layer draws.
    """
    if seed is None or seed < 0:
        seed = seed_from_clock()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *key])))


def rng_state(rng: np.random.Generator) -> dict:
    """A JSON-safe snapshot of a generator's state."""
    return rng.bit_generator.state


def set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state
