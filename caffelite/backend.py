"""Devices, the array module (numpy or cupy) and random number generation.

This is the only module that imports cupy, and it does so only when a GPU is
asked for, so CPU-only machines never need it.
"""
from __future__ import annotations

import logging
import os
import re

import numpy as np

from .errors import ConfigError

_cupy = None
#: TF32 for float32 GEMMs on the GPU (see set_tf32); an explicit CUPY_TF32=0 turns it off.
_tf32 = os.environ.get("CUPY_TF32", "1").strip() not in ("0", "")


def cupy_module():
    """Import cupy on first use; a clear ConfigError when it is not installed."""
    global _cupy
    if _cupy is None:
        # TF32 for float32 GEMMs is on by default (CuPy's own default is off); CuPy reads this
        # on its first float32 GEMM. An explicit CUPY_TF32 in the environment wins.
        os.environ.setdefault("CUPY_TF32", "1" if _tf32 else "0")
        try:
            import cupy  # noqa: PLC0415 - deliberately lazy
        except Exception as exc:  # ImportError, or a CUDA driver error at import
            raise ConfigError(
                f"a GPU was requested but CuPy cannot be imported ({exc})",
                hint="install the GPU extra: pip install 'caffelite[gpu]', or run on the CPU",
            ) from None
        _cupy = cupy
    return _cupy


def cupy_loaded():
    """The cupy module when something already imported it, else None (never imports it)."""
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
    """A NumPy view or copy of a NumPy or CuPy array (NumPy scalars pass through)."""
    if isinstance(array, (np.ndarray, np.generic)):
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


# ---- precision ------------------------------------------------------------------------------
#: compute_dtype names a solver accepts, and where each can run.
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


def compute_dtype(name: str, device: Device):
    """The array dtype for a solver's ``compute_dtype`` on ``device``.

    bfloat16 exists only on the GPU: CuPy 14 computes on the ``ml_dtypes.bfloat16`` dtype (an
    experimental CuPy feature; install ml_dtypes). NumPy itself has no bfloat16 arithmetic, so
    the CPU refuses it.
    """
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"unknown compute_dtype '{name}'",
                          hint="use float32 (the default), float16, or bfloat16 (GPU only)")
    if name != "bfloat16":
        return np.dtype(name)
    if not device.is_gpu:
        raise ConfigError("compute_dtype bfloat16 needs a GPU: NumPy has no bfloat16",
                          hint="use compute_dtype: float16 on the CPU, or train with --gpu")
    cp = cupy_module()
    dtype = getattr(cp, "bfloat16", None)
    if dtype is None:
        try:
            import ml_dtypes  # noqa: PLC0415 - only for bfloat16 on an older CuPy
        except ImportError:
            raise ConfigError("compute_dtype bfloat16 needs CuPy >= 14 and the ml_dtypes package",
                              hint="pip install ml_dtypes (and CuPy >= 14), or use compute_dtype: float16") from None
        dtype = ml_dtypes.bfloat16
    return np.dtype(dtype)


_log = logging.getLogger(__name__)


def set_tf32(enabled: bool) -> None:
    """TensorFloat-32 for float32 GEMMs on the GPU (cuBLAS ``CUBLAS_COMPUTE_32F_FAST_TF32``).

    CuPy reads ``CUPY_TF32`` once per dtype, on the first float32 GEMM, and keeps the choice in
    ``cupy._core._routines_linalg``; ``set_compute_type`` changes it afterwards. The cuDNN
    convolution engine reads ``tf32_enabled()`` when it builds a plan. On the CPU nothing
    changes. Ampere (compute capability 8.0) and later use TF32; older GPUs ignore it.
    """
    global _tf32
    _tf32 = bool(enabled)
    os.environ["CUPY_TF32"] = "1" if enabled else "0"  # for a CuPy imported later
    if _cupy is None:
        return
    try:
        from cupy._core import _routines_linalg as linalg  # noqa: PLC0415 - CuPy internals

        kind = linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT
        linalg.set_compute_type(np.float32, kind)
        linalg.set_compute_type(np.complex64, kind)
    except Exception as exc:  # a CuPy without the switch: the environment variable still works
        _log.debug("cannot switch TF32 through cupy._core (%s); CUPY_TF32 is set", exc)


def tf32_enabled() -> bool:
    return _tf32


# ---- out of GPU memory ---------------------------------------------------------------------
def out_of_memory_types() -> tuple:
    """The exception types that mean "the GPU ran out of memory" (none without CuPy loaded).

    Evaluated only when an exception is being matched (``except out_of_memory_types():``), so
    it costs nothing while training runs.
    """
    if _cupy is None:
        return ()
    try:
        return (_cupy.cuda.memory.OutOfMemoryError,)
    except AttributeError:
        return ()


_BYTES = re.compile(r"allocating ([\d,]+) bytes(?: \(allocated so far: ([\d,]+) bytes)?")


def oom_bytes(exc: BaseException) -> tuple[int | None, int | None]:
    """(bytes asked for, bytes already allocated) from CuPy's out-of-memory message, if there."""
    match = _BYTES.search(str(exc))
    if not match:
        return None, None
    asked = int(match.group(1).replace(",", ""))
    held = int(match.group(2).replace(",", "")) if match.group(2) else None
    return asked, held


def format_bytes(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


# ---- checks of device values, read later ------------------------------------------------------
class DeferredChecks:
    """Checks on values that live on the GPU (labels in range, ...), read in one copy later.

    Reading a device flag at once (``bool(bad.any())``) makes the host wait for the GPU every
    iteration. While a GPU solver trains (``active``), a layer records the flag instead and the
    solver reads all of them with the losses at display time (``raise_first``); outside
    training, or on the CPU, layers check at once as before.
    """

    def __init__(self):
        self.active = False
        self._items: list = []

    def add(self, flag, details: tuple, make_error) -> None:
        """Remember device bool ``flag`` (True = a problem); ``make_error(*host details)`` builds
        the exception. ``details`` are small device arrays computed now (no sync)."""
        self._items.append((flag, details, make_error))

    def clear(self) -> None:
        self._items = []

    def raise_first(self) -> None:
        """Read every pending flag in one copy; raise the first problem's error."""
        items, self._items = self._items, []
        if not items:
            return
        xp = array_module(items[0][0])
        flags = to_numpy(xp.stack([xp.asarray(flag).reshape(()) for flag, _, _ in items]))
        for bad, (_, details, make_error) in zip(flags, items):
            if bad:
                raise make_error(*(to_numpy(xp.asarray(d)).item() for d in details))


DEFERRED = DeferredChecks()
