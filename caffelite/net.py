"""Net: a directed acyclic graph of layers built from a NetParameter and a NetState.

Construction follows Caffe's Net::Init: keep the layers whose include/exclude
rules match the state, insert Split layers where a blob feeds several
consumers, create each layer through the registry, wire bottoms and tops by
name (a top named like its bottom runs in place), set the layers up, collect
loss weights and parameters (with sharing by ``param { name }``), and decide
which layers need backward.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Iterable

import numpy as np

from . import fusion
from .backend import CPU, Device
from .blob import Blob
from .errors import CaffeliteError, ConfigError
from .layers.base import TEST, TRAIN, Layer, LayerContext
from .io.blob_proto import array_to_blob_proto, blob_proto_to_array, shape_matches
from .kernels.mixed import seed_loss_diff
from .net_state import filter_net, insert_splits, make_state
from .proto import pb
from .registry import layer_class

STRICT, PERMISSIVE = 0, 1  # ParamSpec.DimCheckMode


# ---- the Net -----------------------------------------------------------------
class Net:
    """A built network: layers, named blobs and learnable parameters."""

    def __init__(self, param, state=None, *, phase: int | None = None, level: int = 0,
                 stages: Iterable[str] = (), device: Device = CPU, dtype=np.float32,
                 seed: int = -1, net_key: int = 0, rank: int = 0, world_size: int = 1,
                 source: str | None = None):
        from .upgrade import upgrade_net  # noqa: PLC0415 - avoids an import cycle

        self.source = source
        param = upgrade_net(param, source)
        if state is None:
            state = make_state(TEST if phase is None else phase, level, stages, param.state)
        elif phase is not None:
            state = make_state(phase, state.level, state.stage)
        self.state = state
        self.phase = state.phase
        self.name = param.name
        self.ctx = LayerContext(phase=state.phase, device=device, dtype=np.dtype(dtype), seed=seed,
                                net_key=net_key, rank=rank, world_size=world_size)
        try:
            self._build(insert_splits(filter_net(param, state)))
        except CaffeliteError as exc:
            raise _locate(exc, source) from None

    # ---- construction --------------------------------------------------------
    def _build(self, param) -> None:
        self.param = param
        self.layers: list[Layer] = []
        self.layer_names: list[str] = []
        self.blobs: dict[str, Blob] = {}
        self.bottom_vecs: list[list[Blob]] = []
        self.top_vecs: list[list[Blob]] = []
        self.bottom_ids: list[list[str]] = []
        self.top_ids: list[list[str]] = []
        self.bottom_need_backward: list[list[bool]] = []
        self.layer_need_backward: list[bool] = []
        self.blob_loss_weights: dict[str, float] = {}
        self._loss_tops: list[tuple[int, Blob, float]] = []
        #: Mixed precision: the loss-layer top diffs start at loss_weight * loss_scale (a float,
        #: or a one-element device array the GPU reads: solvers/mixed_precision.py).
        self.loss_scale = 1.0
        # Called with the layer index after each layer's forward / backward (debug_info,
        # gradient all-reduce overlapped with backward).
        self.after_forward: list = []
        self.after_backward: list = []
        blob_need_backward: dict[str, bool] = {}
        available: set[str] = set()

        seen_names = Counter(layer.name for layer in param.layer)
        for name, n in seen_names.items():
            if n > 1 and name:
                raise ConfigError(f"layer name '{name}' is used by {n} layers in this phase",
                                  layer=name, hint="give each layer a unique name")

        self._param_state = _ParamTable()
        for layer_id, lp in enumerate(param.layer):
            try:
                self._append_layer(layer_id, lp, available, blob_need_backward)
            except CaffeliteError as exc:
                exc.layer = exc.layer or lp.name
                raise

        self._prune_backward(blob_need_backward)
        if param.force_backward:
            self._force_backward()
        # Caffe keeps the unconsumed blobs in a std::set: outputs come in name order.
        self.output_blob_names = sorted(available)
        self.output_blobs = [self.blobs[n] for n in self.output_blob_names]
        self._param_state.share_weights()
        self.layer_by_name = dict(zip(self.layer_names, self.layers))
        fusion.fuse(self)  # BatchNorm + Scale pairs, on a GPU

    def _append_layer(self, layer_id: int, lp, available: set, blob_need_backward: dict) -> None:
        """Create one layer, wire its bottoms and tops, set it up, register its params."""
        if not lp.type:
            raise ConfigError("has no type", layer=lp.name, hint="add 'type: <LayerType>'")
        layer = layer_class(lp, self.ctx)(lp, self.ctx)
        if lp.propagate_down and len(lp.propagate_down) != len(lp.bottom):
            raise ConfigError(f"has {len(lp.propagate_down)} propagate_down values for "
                              f"{len(lp.bottom)} bottoms", layer=lp.name,
                              hint="give one propagate_down per bottom, or none")
        bottoms, bottom_need = [], []
        need_backward = False
        for j, blob_name in enumerate(lp.bottom):
            if blob_name not in available:
                raise ConfigError(f"unknown bottom blob '{blob_name}' (bottom {j})", layer=lp.name,
                                  hint="a bottom must be the top of an earlier layer in this phase")
            available.discard(blob_name)
            bottoms.append(self.blobs[blob_name])
            need = blob_need_backward[blob_name]
            bottom_need.append(bool(lp.propagate_down[j]) if lp.propagate_down else need)
            need_backward |= need
        tops = []
        for j, blob_name in enumerate(lp.top):
            in_place = j < len(lp.bottom) and lp.bottom[j] == blob_name
            if in_place:
                blob = self.blobs[blob_name]
            elif blob_name in self.blobs:
                raise ConfigError(f"top '{blob_name}' is produced by more than one layer",
                                  layer=lp.name,
                                  hint="rename this top, or write it in place (top == bottom)")
            else:
                blob = Blob((), self.ctx.dtype, self.ctx.device, name=blob_name)
                self.blobs[blob_name] = blob
                blob_need_backward[blob_name] = False
            available.add(blob_name)
            tops.append(blob)
        layer.layer_setup(bottoms, tops)
        for j, blob_name in enumerate(lp.top):
            weight = layer.loss_weights[j]
            self.blob_loss_weights[blob_name] = weight
            if weight:
                self._loss_tops.append((layer_id, tops[j], weight))
        for param_id in range(len(layer.blobs)):
            spec = lp.param[param_id] if param_id < len(lp.param) else None
            need = spec is None or spec.lr_mult != 0
            layer.param_propagate_down[param_id] = need
            need_backward |= need
            self._param_state.append(self, layer_id, layer, param_id, spec)
        if need_backward:
            for blob_name in lp.top:
                blob_need_backward[blob_name] = True
        self.layers.append(layer)
        self.layer_names.append(lp.name)
        self.bottom_vecs.append(bottoms)
        self.top_vecs.append(tops)
        self.bottom_ids.append(list(lp.bottom))
        self.top_ids.append(list(lp.top))
        self.bottom_need_backward.append(bottom_need)
        self.layer_need_backward.append(need_backward)

    def _prune_backward(self, blob_need_backward: dict) -> None:
        """Skip backward for layers that feed no loss (Caffe's Init, second pass)."""
        under_loss: set[str] = set()
        skip_backprop: set[str] = set()
        for i in reversed(range(len(self.layers))):
            contributes, skip = False, True
            for name, weight in zip(self.top_ids[i], self.layers[i].loss_weights):
                if weight or name in under_loss:
                    contributes = True
                if name not in skip_backprop:
                    skip = False
                if contributes and not skip:
                    break
            if self.layer_need_backward[i] and skip:
                self.layer_need_backward[i] = False
                self.bottom_need_backward[i] = [False] * len(self.bottom_ids[i])
            if not contributes:
                self.layer_need_backward[i] = False
                self.bottom_need_backward[i] = [False] * len(self.bottom_ids[i])
            for j, name in enumerate(self.bottom_ids[i]):
                if contributes:
                    under_loss.add(name)
                if not self.bottom_need_backward[i][j]:
                    skip_backprop.add(name)

    def _force_backward(self) -> None:
        for i, layer in enumerate(self.layers):
            self.layer_need_backward[i] = True
            self.bottom_need_backward[i] = [
                need or layer.allow_force_backward(j) for j, need in enumerate(self.bottom_need_backward[i])]
            layer.param_propagate_down = [True] * len(layer.blobs)

    # ---- parameters ----------------------------------------------------------
    @property
    def params(self) -> dict[str, list[Blob]]:
        """Layer name -> its parameter blobs (pycaffe's ``net.params``)."""
        return {name: layer.blobs for name, layer in zip(self.layer_names, self.layers) if layer.blobs}

    @property
    def learnable_params(self) -> list[Blob]:
        return self._param_state.learnable

    @property
    def learnable_param_ids(self) -> list[int]:
        """For each parameter blob (all of them, shared ones too): its index in ``learnable_params``."""
        return self._param_state._learnable_id

    @property
    def params_lr(self) -> list[float]:
        return self._param_state.lr

    @property
    def params_weight_decay(self) -> list[float]:
        return self._param_state.decay

    # ---- running ---------------------------------------------------------------
    def forward(self, start: int = 0, end: int | None = None, *, host_loss: bool = True):
        """Run layers ``start..end`` (inclusive); returns the weighted loss.

        ``host_loss=False`` returns it as a 0-d float32 (float64 for a float64 net) array on the
        net's device instead of a Python float, so a GPU run does not wait for the device here
        (the solver reads the losses in one copy at display time).
        """
        end = len(self.layers) - 1 if end is None else end
        loss = 0.0
        i = start
        try:
            for i in range(start, end + 1):
                layer, bottom, top = self.layers[i], self.bottom_vecs[i], self.top_vecs[i]
                layer.reshape(bottom, top)
                layer.forward(bottom, top)
                for hook in self.after_forward:
                    hook(i)
        except CaffeliteError as exc:
            raise self._named(exc, i) from None
        if not host_loss:
            return self._device_loss(start, end)
        for i, blob, weight in self._loss_tops:
            if start <= i <= end:
                loss += weight * float(blob.data.sum())
        return loss

    def _device_loss(self, start: int, end: int):
        xp = self.ctx.xp
        acc = xp.float64 if self.ctx.dtype == np.float64 else xp.float32
        loss = xp.zeros((), acc)
        for i, blob, weight in self._loss_tops:
            if start <= i <= end:
                loss += blob.data.sum(dtype=acc) * acc(weight)
        return loss

    def backward(self) -> None:
        """Backward through every layer that needs it; ``after_backward`` hooks see each index."""
        scale = self.loss_scale
        for _, blob, weight in self._loss_tops:
            if isinstance(scale, (int, float)):
                blob.diff[...] = weight if scale == 1 else weight * scale
            else:  # mixed precision on a GPU: S is a device scalar (kernels/mixed.py)
                seed_loss_diff(blob.diff, scale, weight)
        i = len(self.layers) - 1
        try:
            for i in reversed(range(len(self.layers))):
                if self.layer_need_backward[i]:
                    self.layers[i].backward(self.top_vecs[i], self.bottom_need_backward[i], self.bottom_vecs[i])
                    for hook in self.after_backward:
                        hook(i)
        except CaffeliteError as exc:
            raise self._named(exc, i) from None

    def _named(self, exc: CaffeliteError, layer_index: int) -> CaffeliteError:
        """An error raised while layer ``layer_index`` ran, with that layer and its file line."""
        exc.layer = exc.layer or self.layer_names[layer_index]
        exc.args = (exc.format(),)
        return _locate(exc, self.source)

    def forward_backward(self, *, host_loss: bool = True, start: int = 0):
        loss = self.forward(start, host_loss=host_loss)
        self.backward()
        return loss

    def reshape(self) -> None:
        for layer, bottom, top in zip(self.layers, self.bottom_vecs, self.top_vecs):
            layer.reshape(bottom, top)

    def clear_param_diffs(self) -> None:
        """Zero every learnable diff (lazily: a layer writing a whole gradient skips the pass)."""
        for blob in self.learnable_params:
            blob.clear_diff()

    def update(self) -> None:
        """W -= diff for every learnable parameter (shared ones are updated once)."""
        for blob in self.learnable_params:
            data = blob.data
            data -= blob.diff

    # ---- weights -----------------------------------------------------------------
    def copy_trained_layers_from(self, source) -> None:
        """Copy parameters from a NetParameter (or a weights file) by layer name.

        Unknown layers are ignored; a shape mismatch stops with a message that
        says to rename the layer to train it from scratch.
        """
        if isinstance(source, (str, os.PathLike)):
            from .io.weights import copy_weights  # noqa: PLC0415 - io depends on net

            copy_weights(self, source)
            return
        for src_layer in source.layer:
            layer = self.layer_by_name.get(src_layer.name)
            if layer is None or not src_layer.blobs:
                continue
            if len(src_layer.blobs) != len(layer.blobs):
                raise ConfigError(f"the weights have {len(src_layer.blobs)} blobs for this layer, "
                                  f"the net has {len(layer.blobs)}", layer=layer.name,
                                  hint="rename the layer to learn it from scratch")
            for j, (proto, blob) in enumerate(zip(src_layer.blobs, layer.blobs)):
                values = blob_proto_to_array(proto)
                if not shape_matches(proto, blob.shape):
                    raise ConfigError(
                        f"cannot copy param {j} weights: shape mismatch; the weights have "
                        f"{tuple(values.shape)}, the net has {blob.shape}", layer=layer.name,
                        hint="to learn this layer's parameters from scratch rather than copying "
                             "them, rename the layer")
                blob.set_data(values.reshape(blob.shape))

    def share_trained_layers_with(self, other: "Net") -> None:
        """Make this net's parameters views of ``other``'s (a test net of a solver)."""
        for name, layer in zip(self.layer_names, self.layers):
            src = other.layer_by_name.get(name)
            if src is None or not layer.blobs:
                continue
            for blob, src_blob in zip(layer.blobs, src.blobs):
                if blob.shape != src_blob.shape:
                    raise ConfigError(f"cannot share weights of shape {src_blob.shape} with "
                                      f"{blob.shape}", layer=name)
                blob.share_data(src_blob)

    def to_proto(self, write_diff: bool = False):
        """The net as a NetParameter with every layer's blobs (a .caffemodel's content)."""
        out = pb.NetParameter(name=self.name)
        for layer in self.layers:
            lp = out.layer.add()
            lp.CopyFrom(layer.layer_param)
            del lp.blobs[:]
            for blob in layer.blobs:
                array_to_blob_proto(blob.cpu_data(), lp.blobs.add(),
                                    diff=blob.cpu_diff() if write_diff else None)
        return out

    def save(self, path: str) -> None:
        from .io.weights import save_weights  # noqa: PLC0415

        save_weights(self, path)

    def state_dict(self) -> dict:
        """Non-parameter running state (data cursors, RNG streams) by layer name."""
        return {name: s for name, layer in zip(self.layer_names, self.layers) if (s := layer.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        for name, layer_state in state.items():
            if name in self.layer_by_name:
                self.layer_by_name[name].load_state_dict(layer_state)

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    def __repr__(self) -> str:
        return f"Net('{self.name}', {len(self.layers)} layers, phase {'TRAIN' if self.phase == TRAIN else 'TEST'})"


class _ParamTable:
    """Parameter bookkeeping: owners, sharing by name, lr and decay multipliers."""

    def __init__(self):
        self.all: list[Blob] = []
        self.owners: list[int] = []
        self.learnable: list[Blob] = []
        self.lr: list[float] = []
        self.decay: list[float] = []
        self._has_lr: list[bool] = []
        self._has_decay: list[bool] = []
        self._learnable_id: list[int] = []
        self._by_name: dict[str, int] = {}
        self._where: list[tuple[str, int]] = []

    def append(self, net: Net, layer_id: int, layer: Layer, param_id: int, spec) -> None:
        blob = layer.blobs[param_id]
        name = spec.name if spec is not None else ""
        net_param_id = len(self.all)
        self.all.append(blob)
        self._where.append((layer.name, param_id))
        if not name or name not in self._by_name:
            if name:
                self._by_name[name] = net_param_id
            self.owners.append(-1)
            self._learnable_id.append(len(self.learnable))
            self.learnable.append(blob)
            self._has_lr.append(spec is not None and spec.HasField("lr_mult"))
            self._has_decay.append(spec is not None and spec.HasField("decay_mult"))
            self.lr.append(spec.lr_mult if spec is not None else 1.0)
            self.decay.append(spec.decay_mult if spec is not None else 1.0)
            return
        owner_id = self._by_name[name]
        owner = self.all[owner_id]
        owner_layer = self._where[owner_id][0]
        if spec.share_mode == PERMISSIVE:
            if owner.count != blob.count:
                raise ConfigError(f"cannot share param '{name}' owned by layer '{owner_layer}': "
                                  f"count mismatch, {owner.count} vs {blob.count}", layer=layer.name)
        elif owner.shape != blob.shape:
            raise ConfigError(f"cannot share param '{name}' owned by layer '{owner_layer}': shape "
                              f"mismatch, the owner has {owner.shape}, this layer {blob.shape}",
                              layer=layer.name,
                              hint="use share_mode: PERMISSIVE to share blobs of equal count")
        self.owners.append(owner_id)
        lid = self._learnable_id[owner_id]
        self._learnable_id.append(lid)
        for field, has, values in (("lr_mult", self._has_lr, self.lr),
                                   ("decay_mult", self._has_decay, self.decay)):
            if spec.HasField(field):
                value = getattr(spec, field)
                if has[lid] and values[lid] != value:
                    raise ConfigError(f"shared param '{name}' has {field} {value} here but "
                                      f"{values[lid]} in layer '{owner_layer}'", layer=layer.name,
                                      hint=f"give every sharer the same {field}")
                has[lid], values[lid] = True, value

    def share_weights(self) -> None:
        for blob, owner in zip(self.all, self.owners):
            if owner >= 0:
                blob.share_data(self.all[owner])
                blob.share_diff(self.all[owner])


def _locate(exc: CaffeliteError, source: str | None) -> CaffeliteError:
    """Fill in the file and line of the layer an error names."""
    if source and not exc.file:
        from .config import layer_line  # noqa: PLC0415

        exc.file = source
        exc.line = exc.line or (layer_line(source, exc.layer) if exc.layer else None)
        exc.args = (exc.format(),)
    return exc


__all__ = ["Net"]
