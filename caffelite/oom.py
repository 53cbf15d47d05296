"""Out of GPU memory: one message that says which net, at which batch size, how much memory
the failed allocation wanted, and what to do (a smaller batch with ``iter_size`` keeps the
effective batch, so the training is the same).

The solver and the command line catch ``backend.out_of_memory_types()`` (CuPy's
``OutOfMemoryError``) around building the nets and around the training step and raise the
``TrainingError`` made here (exit code 4).
"""
from __future__ import annotations

from .backend import format_bytes, oom_bytes
from .errors import TrainingError

#: *_param messages whose ``batch_size`` sets a data layer's batch.
_BATCH_PARAMS = ("data_param", "image_data_param", "hdf5_data_param", "memory_data_param",
                 "window_data_param")


def batch_size_of(net) -> int | None:
    """The batch size of a built Net (its first data layer's first top) or of a NetParameter."""
    layers = getattr(net, "layers", None)
    if layers is not None and hasattr(net, "top_vecs"):
        for i, layer in enumerate(layers):
            if not net.bottom_vecs[i] and net.top_vecs[i] and net.top_vecs[i][0].shape:
                return int(net.top_vecs[i][0].shape[0])
        net = getattr(net, "param", None)
        if net is None:
            return None
    for lp in getattr(net, "layer", ()):
        for name in _BATCH_PARAMS:
            if lp.HasField(name) and getattr(lp, name).batch_size:
                return int(getattr(lp, name).batch_size)
        for name in ("input_param", "dummy_data_param"):
            if lp.HasField(name) and getattr(lp, name).shape and getattr(lp, name).shape[0].dim:
                return int(getattr(lp, name).shape[0].dim[0])
    for shape in getattr(net, "input_shape", ()):
        if shape.dim:
            return int(shape.dim[0])
    return None


def out_of_memory_error(exc: BaseException, *, net_name: str, source: str | None, batch_size: int | None,
                        iter_size: int = 1, when: str = "", device=None) -> TrainingError:
    """The TrainingError for an out-of-GPU-memory exception ``exc``."""
    asked, held = oom_bytes(exc)
    where = f" on {device}" if device is not None else ""
    what = f"out of GPU memory{where} while {when}" if when else f"out of GPU memory{where}"
    batch = f"batch size {batch_size}" if batch_size else "its batch size"
    need = f"an allocation of {format_bytes(asked)} failed"
    if held is not None:
        need += f" with {format_bytes(held)} already in use by caffelite"
    if batch_size and batch_size > 1:
        hint = (f"halve batch_size (to {batch_size // 2}) and set iter_size: {iter_size * 2} for the same "
                f"effective batch of {batch_size * iter_size}")
    else:
        hint = "use a smaller net or input, or a GPU with more memory"
    hint += "; compute_dtype: float16 also halves the activations' memory"
    return TrainingError(f"{what}: net '{net_name}' at {batch}: {need}", file=source, hint=hint)


__all__ = ["batch_size_of", "out_of_memory_error"]
