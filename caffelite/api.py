"""A pycaffe-style Python API over caffelite's Net and Solver::

    import caffelite
    net = caffelite.Net("deploy.prototxt", "weights.caffemodel", caffelite.TEST)
    out = net.forward(data=images)              # {output name: numpy array}
    net.blobs["conv1"].data                     # numpy view of a blob
    net.params["conv1"][0].data[...] = w        # write weights in place
    net.save("tuned.caffemodel")

    solver = caffelite.get_solver("solver.prototxt")
    solver.step(100)
    solver.net.blobs["loss"].data

``Blob.data`` / ``Blob.diff`` are the blob's CPU arrays (as pycaffe's
``mutable_cpu_data``): on a GPU net, reading them copies the device values to
the host and writing them is seen by the next GPU use.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

from .backend import CPU, Device
from .errors import ConfigError
from .layers.base import TEST, TRAIN

_default_gpu: int | None = None


# ---- pycaffe's global mode ----------------------------------------------------------------
def set_mode_cpu() -> None:
    """Nets and solvers created afterwards without ``gpu=`` run on the CPU."""
    global _default_gpu
    _default_gpu = None


def set_mode_gpu() -> None:
    """Nets and solvers created afterwards without ``gpu=`` run on the current GPU (device 0
    unless ``set_device`` chose another)."""
    global _default_gpu
    _default_gpu = _default_gpu if _default_gpu is not None else 0


def set_device(device_id: int) -> None:
    global _default_gpu
    _default_gpu = int(device_id)


def _device(gpu) -> Device:
    if isinstance(gpu, Device):
        return gpu
    if gpu is None:
        gpu = _default_gpu
    if gpu is None:
        return CPU
    return Device.gpu(int(gpu))


def _phase(phase) -> int:
    if isinstance(phase, str) and phase.upper() in ("TRAIN", "TEST"):
        return TRAIN if phase.upper() == "TRAIN" else TEST
    if phase in (TRAIN, TEST) and not isinstance(phase, bool):
        return int(phase)
    raise ConfigError(f"unknown phase {phase!r}", hint="use caffelite.TRAIN or caffelite.TEST")


# ---- blobs ------------------------------------------------------------------------------------
class Blob:
    """A view of one net blob with pycaffe's attributes."""

    __slots__ = ("_blob",)

    def __init__(self, blob):
        self._blob = blob

    @property
    def data(self) -> np.ndarray:
        return self._blob.mutable_cpu_data()

    @data.setter
    def data(self, values) -> None:
        self._blob.mutable_cpu_data()[...] = values

    @property
    def diff(self) -> np.ndarray:
        return self._blob.mutable_cpu_diff()

    @diff.setter
    def diff(self, values) -> None:
        self._blob.mutable_cpu_diff()[...] = values

    @property
    def shape(self) -> tuple:
        return self._blob.shape

    @property
    def count(self) -> int:
        return self._blob.count

    def _legacy(self, axis: int) -> int:
        shape = self._blob.shape
        if len(shape) > 4:
            raise ConfigError(f"blob of shape {shape} has more than 4 axes", hint="use .shape")
        return ((1,) * (4 - len(shape)) + shape)[axis] if axis < 4 else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def reshape(self, *shape) -> None:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        self._blob.reshape(shape)

    def __repr__(self) -> str:
        return f"<caffelite.Blob {self._blob.name!r} {self._blob.shape}>"


# ---- nets ---------------------------------------------------------------------------------------
def _net_param(model):
    """(NetParameter, source path or None) from a path or a message."""
    from . import config  # noqa: PLC0415
    from .proto import pb  # noqa: PLC0415

    if isinstance(model, pb.NetParameter):
        return model, None
    if isinstance(model, (str, os.PathLike)):
        return config.load_net(model), os.fspath(model)
    if hasattr(model, "to_proto"):  # a NetSpec
        return model.to_proto(), None
    raise ConfigError(f"cannot build a net from {type(model).__name__}",
                      hint="pass a .prototxt/.yaml path, a NetParameter or a NetSpec")


class Net:
    """pycaffe's ``caffe.Net``: a built net with ``blobs``, ``params``, ``forward``, ``backward``.

    ``Net(model, weights=None, phase=TEST, level=0, stages=(), gpu=None)``; as in pycaffe the
    phase may also come second: ``Net(model, caffelite.TEST)`` or
    ``Net(model, weights, caffelite.TEST)``. ``weights`` is one or more comma-separated
    .caffemodel / .h5 files. ``force_backward=True`` makes a deploy net (no loss) compute
    input gradients in ``backward``.
    """

    def __init__(self, model, weights=None, phase=TEST, level: int = 0, stages: Iterable[str] = (),
                 gpu=None, *, force_backward: bool = False, dtype=np.float32, seed: int = -1):
        from .net import Net as CoreNet  # noqa: PLC0415
        from .proto import pb  # noqa: PLC0415

        if isinstance(weights, int) or (isinstance(weights, str) and weights.upper() in ("TRAIN", "TEST")):
            weights, phase = None, weights  # Net(model, caffelite.TEST)
        param, source = _net_param(model)
        if force_backward and not param.force_backward:
            param = pb.NetParameter.FromString(param.SerializeToString())
            param.force_backward = True
        core = CoreNet(param, phase=_phase(phase), level=level, stages=list(stages),
                       device=_device(gpu), dtype=dtype, seed=seed, source=source)
        self._init(core)
        if weights:
            self.copy_from(weights)

    @classmethod
    def wrap(cls, core) -> "Net":
        """The API view of an existing ``caffelite.net.Net`` (no copy, no rebuild)."""
        self = cls.__new__(cls)
        self._init(core)
        return self

    def _init(self, core) -> None:
        self._net = core
        self.loss: float | None = None
        self._blobs = {name: Blob(b) for name, b in core.blobs.items()}
        self._params = {name: [Blob(b) for b in blobs] for name, blobs in core.params.items()}

    # ---- what pycaffe exposes --------------------------------------------------------------
    @property
    def core(self):
        """The underlying ``caffelite.net.Net``."""
        return self._net

    @property
    def blobs(self) -> dict[str, Blob]:
        """Blob name -> Blob, in the order the net creates them (split blobs included)."""
        return self._blobs

    @property
    def params(self) -> dict[str, list[Blob]]:
        """Layer name -> its parameter blobs, for layers that have any."""
        return self._params

    @property
    def inputs(self) -> list[str]:
        """Tops of the net's Input layers: the names ``forward`` accepts."""
        return [top for layer, tops in zip(self._net.layers, self._net.top_ids)
                if layer.type == "Input" for top in tops]

    @property
    def outputs(self) -> list[str]:
        return list(self._net.output_blob_names)

    @property
    def layers(self) -> list:
        return self._net.layers

    @property
    def layer_names(self) -> list[str]:
        return list(self._net.layer_names)

    @property
    def layer_dict(self) -> dict:
        return dict(zip(self._net.layer_names, self._net.layers))

    @property
    def top_names(self) -> dict[str, list[str]]:
        return dict(zip(self._net.layer_names, self._net.top_ids))

    @property
    def bottom_names(self) -> dict[str, list[str]]:
        return dict(zip(self._net.layer_names, self._net.bottom_ids))

    def _layer_index(self, name: str | None, default: int) -> int:
        if name is None:
            return default
        try:
            return self._net.layer_names.index(name)
        except ValueError:
            from .errors import did_you_mean  # noqa: PLC0415

            raise ConfigError(f"no layer named '{name}'",
                              hint=did_you_mean(name, self._net.layer_names)) from None

    # ---- running ----------------------------------------------------------------------------
    def forward(self, blobs: Sequence[str] | None = None, start: str | None = None,
                end: str | None = None, **inputs) -> dict[str, np.ndarray]:
        """Set the given input blobs (reshaping them and the net as needed), run layers
        ``start..end`` and return copies of the outputs (and of ``blobs``)."""
        for name, values in inputs.items():
            self._set_input(name, values)
        first = self._layer_index(start, 0)
        last = self._layer_index(end, len(self._net.layers) - 1)
        self.loss = self._net.forward(first, last)
        names = list(self._net.top_ids[last]) if end is not None else self.outputs
        names += [b for b in (blobs or ()) if b not in names]
        return {name: self._blob(name).cpu_data().copy() for name in names}

    def _set_input(self, name: str, values) -> None:
        inputs = self.inputs
        if name not in inputs:
            raise ConfigError(f"'{name}' is not an input of the net",
                              hint=f"inputs are {', '.join(inputs) or 'none (the net has no Input layer)'}")
        blob = self._net.blobs[name]
        array = np.asarray(values)
        if array.shape != blob.shape:
            blob.reshape(array.shape)
        blob.mutable_cpu_data()[...] = array

    def _blob(self, name: str):
        try:
            return self._net.blobs[name]
        except KeyError:
            from .errors import did_you_mean  # noqa: PLC0415

            raise ConfigError(f"no blob named '{name}'", hint=did_you_mean(name, self._net.blobs)) from None

    def backward(self, diffs: Sequence[str] | None = None, start: str | None = None,
                 end: str | None = None, **top_diffs) -> dict[str, np.ndarray]:
        """Set the diffs of the given output blobs, back-propagate from layer ``start`` down to
        ``end`` and return copies of the input diffs (and of ``diffs``).

        Loss outputs not given here get their loss weight as diff, as in ``Net.backward``.
        """
        net = self._net
        for name, values in top_diffs.items():
            if name not in net.output_blob_names:
                raise ConfigError(f"'{name}' is not an output of the net",
                                  hint=f"outputs are {', '.join(net.output_blob_names)}")
            blob = net.blobs[name]
            array = np.asarray(values)
            if array.shape != blob.shape:
                raise ConfigError(f"diff for '{name}' has shape {array.shape}, the blob {blob.shape}")
            blob.mutable_cpu_diff()[...] = array
        if not any(net.layer_need_backward):
            raise ConfigError("no layer of this net needs backward (a net without a loss computes "
                              "no gradients)", hint="build it with force_backward=True, or add "
                                                    "force_backward: true to the net file")
        for name, weight in net.blob_loss_weights.items():
            if weight and name not in top_diffs:
                net.blobs[name].diff[...] = weight
        first = self._layer_index(start, len(net.layers) - 1)
        last = self._layer_index(end, 0)
        hooks = getattr(net, "after_backward", ())
        for i in range(first, last - 1, -1):
            if net.layer_need_backward[i]:
                net.layers[i].backward(net.top_vecs[i], net.bottom_need_backward[i], net.bottom_vecs[i])
                for hook in hooks:
                    hook(i)
        names = self.inputs + [d for d in (diffs or ()) if d not in self.inputs]
        return {name: self._blob(name).cpu_diff().copy() for name in names}

    def reshape(self) -> None:
        self._net.reshape()

    # ---- weights ---------------------------------------------------------------------------
    def copy_from(self, weights: str | os.PathLike) -> None:
        """Copy parameters by layer name from .caffemodel / .h5 files (comma-separated)."""
        from .io.weights import copy_weights  # noqa: PLC0415

        solver = getattr(self, "_solver_core", None)
        if solver is not None:  # a solver's train net: with mixed precision the float32 masters load
            solver._copy_weights(self._net, os.fspath(weights))
            return
        copy_weights(self._net, weights)

    def save(self, path: str | os.PathLike) -> str:
        """Write the parameters to a .caffemodel (binary) or .h5 file, atomically."""
        from .io.weights import save_weights  # noqa: PLC0415

        return save_weights(self._net, os.fspath(path))

    def to_proto(self):
        return self._net.to_proto()

    def close(self) -> None:
        self._net.close()

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_net":
            raise AttributeError(name)
        return getattr(self._net, name)

    def __repr__(self) -> str:
        return f"<caffelite.Net {self._net.name!r}: {len(self._net.layers)} layers, " \
               f"inputs {self.inputs}, outputs {self.outputs}>"


# ---- solvers ---------------------------------------------------------------------------------
class Solver:
    """pycaffe's solver object: ``step``, ``solve``, ``net``, ``test_nets``, ``iter``."""

    def __init__(self, core):
        self._solver = core
        self._net = Net.wrap(core.net)
        # copy_from on the train net goes through the solver (mixed precision: into the float32
        # master weights, which the next update would otherwise write back over the net).
        self._net._solver_core = core
        self._test_nets = [Net.wrap(n) for n in core.test_nets]

    @property
    def core(self):
        """The underlying ``caffelite.solvers.base.Solver``."""
        return self._solver

    @property
    def net(self) -> Net:
        return self._net

    @property
    def test_nets(self) -> list[Net]:
        return self._test_nets

    @property
    def iter(self) -> int:
        return self._solver.iter

    def step(self, iters: int = 1):
        return self._solver.step(iters)

    def solve(self, resume_file: str | None = None) -> None:
        self._solver.solve(resume_file)

    def snapshot(self):
        return self._solver.snapshot()

    def restore(self, state_file: str) -> None:
        self._solver.restore(state_file)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_solver":
            raise AttributeError(name)
        return getattr(self._solver, name)

    def __repr__(self) -> str:
        return f"<caffelite.Solver {self._solver.type} at iteration {self.iter}>"


def get_solver(solver, overrides: Iterable[str] = (), weights: str | None = None, gpu=None) -> Solver:
    """The solver a file (or SolverParameter) describes, with ``key=value`` overrides applied;
    ``weights`` (comma-separated files) initialise the nets as ``caffelite train --weights``."""
    from . import config  # noqa: PLC0415
    from .proto import pb  # noqa: PLC0415
    from .solvers.base import create_solver  # noqa: PLC0415

    if isinstance(solver, pb.SolverParameter):
        param, source = pb.SolverParameter.FromString(solver.SerializeToString()), None
        config.apply_overrides(param, overrides)
    else:
        param, source = config.load_solver(solver, overrides), os.fspath(solver)
    if weights:
        del param.weights[:]
        param.weights.extend(w for w in os.fspath(weights).split(",") if w)
    device = _device(gpu) if (gpu is not None or _default_gpu is not None) else None
    return Solver(create_solver(param, source=source, device=device))


__all__ = ["Net", "Blob", "Solver", "get_solver", "set_mode_cpu", "set_mode_gpu", "set_device",
           "TRAIN", "TEST"]
