"""Building a solver: checks of the SolverParameter, the train and test nets, the snapshot prefix.

``SolverSetup`` is a base of ``Solver`` (base.py): ``Solver.__init__`` runs the
checks (``_check_param``, the per-type ``check_param``, ``_check_prefix``) and
builds the nets (``_init_train_net``, ``_init_test_nets``). ``default_device``
and ``resolve_snapshot_prefix`` are Caffe's rules for the device and the
snapshot prefix.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..backend import CPU, Device, gpu_available
from ..errors import ConfigError
from ..layers.base import TEST, TRAIN
from ..net import Net
from ..net_state import make_state
from ..proto import pb

log = logging.getLogger(__name__)


def default_device(param) -> Device:
    """Caffe's rule: the GPU only when the solver file says ``solver_mode: GPU``; the CPU (with a
    warning) when it says so but no GPU can be used. The command line passes its own device."""
    if param.HasField("solver_mode") and param.solver_mode == pb.SolverParameter.GPU:
        if gpu_available():
            return Device.gpu(param.device_id)
        log.warning("the solver asks for solver_mode: GPU but no GPU is available (CuPy missing or "
                    "no CUDA device); training on the CPU")
    return CPU


def resolve_snapshot_prefix(param, source: str | None, fallback_name: str = "") -> str | None:
    """Caffe's prefix rule: unset = the solver file path without its extension;
    a folder (an existing one, or a name ending in '/') = ``folder/<solver file stem>``."""
    prefix = param.snapshot_prefix if param.HasField("snapshot_prefix") else ""
    if not prefix:
        return os.path.splitext(source)[0] if source else None
    if prefix.endswith(("/", os.sep)) or os.path.isdir(prefix):
        stem = Path(source).stem if source else (fallback_name or "snapshot")
        return os.path.join(prefix, stem)
    return prefix


class SolverSetup:
    """Checks of the SolverParameter and the nets a ``Solver`` trains and tests."""

    # ---- checks -------------------------------------------------------------------------
    def _error(self, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(message, file=self.source, hint=hint)

    def _check_param(self) -> None:
        p = self.param
        train = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if len(train) != 1:
            raise self._error(
                "the solver names no train net" if not train else
                f"the solver names more than one train net ({', '.join(train)})",
                hint="give exactly one of net, net_param, train_net, train_net_param")
        generic = p.HasField("net") or p.HasField("net_param")
        n_specific = len(p.test_net) + len(p.test_net_param)
        if (generic and len(p.test_iter) < n_specific) or (not generic and len(p.test_iter) != n_specific):
            raise self._error(f"{len(p.test_iter)} test_iter value(s) for {n_specific} test net(s)",
                              hint="give one test_iter per test net")
        n_test = max(len(p.test_iter), n_specific) if generic else n_specific
        if len(p.test_state) and len(p.test_state) != n_test:
            raise self._error(f"{len(p.test_state)} test_state value(s) for {n_test} test net(s)",
                              hint="give test_state once per test net, or not at all")
        for name, low in (("average_loss", 1), ("iter_size", 1), ("display", 0), ("snapshot", 0),
                          ("max_iter", 0)):
            if getattr(p, name) < low:
                raise self._error(f"{name} must be at least {low}, got {getattr(p, name)}")
        if p.weight_decay and p.regularization_type not in ("L1", "L2"):
            raise self._error(f"unknown regularization_type '{p.regularization_type}'",
                              hint="use L2 (the default) or L1")

    @classmethod
    def check_param(cls, param) -> None:
        """Per-type checks of the SolverParameter (raise ConfigError)."""

    def _check_prefix(self) -> None:
        needs = self.param.snapshot > 0 or self.param.snapshot_after_train
        if self.prefix is None:
            if needs:
                raise self._error("snapshot_prefix is not set and there is no solver file to name "
                                  "the snapshots after",
                                  hint="set snapshot_prefix, or snapshot_after_train: false")
            return
        folder = os.path.dirname(self.prefix) or "."
        if needs and os.path.isdir(folder) and not os.access(folder, os.W_OK):
            raise self._error(f"cannot write snapshots to '{folder}'",
                              hint="choose a writable snapshot_prefix")

    # ---- nets ----------------------------------------------------------------------------
    def _read_net(self, path: str) -> "pb.NetParameter":
        from ..config import load_net  # noqa: PLC0415 - config is only needed for net files

        return load_net(path)

    def _make_net(self, net_param, state, net_key: int, source: str | None) -> Net:
        return Net(net_param, state, device=self.device, dtype=self.compute_dtype, seed=self.seed,
                   net_key=net_key, rank=self.rank, world_size=self.world_size, source=source)

    def _init_train_net(self) -> Net:
        p = self.param
        source = None
        if p.HasField("train_net_param"):
            log.info("Creating training net specified in train_net_param.")
            net_param = p.train_net_param
        elif p.HasField("train_net"):
            log.info("Creating training net from train_net file: %s", p.train_net)
            net_param, source = self._read_net(p.train_net), p.train_net
        elif p.HasField("net_param"):
            log.info("Creating training net specified in net_param.")
            net_param = p.net_param
        else:
            log.info("Creating training net from net file: %s", p.net)
            net_param, source = self._read_net(p.net), p.net
            self._generic_net = net_param
        state = make_state(TRAIN, 0, (), net_param.state, p.train_state)
        return self._make_net(net_param, state, 0, source)

    def _init_test_nets(self) -> list[Net]:
        p = self.param
        specs: list[tuple[str, object, str | None]] = []
        for net_param in p.test_net_param:
            specs.append(("test_net_param", net_param, None))
        for path in p.test_net:
            specs.append((f"test_net file: {path}", self._read_net(path), path))
        remaining = len(p.test_iter) - len(specs)
        if p.HasField("net_param"):
            specs += [("net_param", p.net_param, None)] * remaining
        elif p.HasField("net"):
            generic = getattr(self, "_generic_net", None) or self._read_net(p.net)
            specs += [(f"net file: {p.net}", generic, p.net)] * remaining
        nets = []
        for i, (what, net_param, source) in enumerate(specs):
            state = make_state(TEST, 0, (), net_param.state,
                               p.test_state[i] if len(p.test_state) else None)
            log.info("Creating test net (#%d) specified by %s", i, what)
            nets.append(self._make_net(net_param, state, i + 1, source))
        return nets


__all__ = ["SolverSetup", "default_device", "resolve_snapshot_prefix"]
