"""NetSpec: write nets in Python, pycaffe-style, and emit a NetParameter or YAML::

    from caffelite.net_spec import NetSpec, layers as L, params as P

    n = NetSpec()
    n.data, n.label = L.Data(source="mnist_train_lmdb", backend=P.Data.LMDB, batch_size=64,
                             ntop=2, transform_param=dict(scale=1 / 256))
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool1, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.loss = L.SoftmaxWithLoss(n.ip1, n.label)
    print(n.to_yaml(name="LeNet"))

``L.<Type>(*bottoms, **kwargs)`` makes one layer. A keyword that is a field of
LayerParameter (``param``, ``loss_weight``, ``include``, ``transform_param``,
``propagate_down``, ...) goes there; any other goes into the layer's own
``*_param`` message (the one its registered class reads, else the one named
after the type, else the only ``*_param`` message that has such a field).
Values: scalars, lists for repeated fields (a single value is fine too), dicts
for messages, enum values by name (``"MAX"``) or number (``P.Pooling.MAX``).
Special keywords: ``ntop`` (number of tops, default 1; 0 returns the layer),
``in_place=True`` (tops named like the bottoms) and ``name`` (the layer name).

Tops are named by attribute assignment (``n.conv1 = ...``); a layer takes the
name of its first top, unless ``name=`` says otherwise. Unnamed tops and
layers get ``<Type><k>`` names. Layers come out in the order their tops were
assigned, each after the layers it depends on.
"""
from __future__ import annotations

import re
from collections import Counter

from .errors import ConfigError, did_you_mean
from .proto import pb

_LAYER_FIELDS = pb.LayerParameter.DESCRIPTOR.fields_by_name
_PARAM_FIELDS = [f for f in pb.LayerParameter.DESCRIPTOR.fields
                 if f.name.endswith("_param") and f.message_type is not None]


class Top:
    """One output of a layer call; becomes a blob name in the proto."""

    def __init__(self, fn: "Function", index: int):
        self.fn = fn
        self.index = index
        self.name: str | None = None  # set when assigned to a NetSpec attribute

    def to_proto(self) -> "pb.NetParameter":
        return to_proto(self)

    def __repr__(self) -> str:
        return f"<Top {self.name or '?'} of {self.fn.type_name}>"


class Function:
    """A layer call: type, bottoms (Tops) and keyword parameters."""

    def __init__(self, type_name: str, inputs, params: dict):
        for i, bottom in enumerate(inputs):
            if not isinstance(bottom, Top):
                raise ConfigError(f"L.{type_name}: bottom {i} is a {type(bottom).__name__}, not a top",
                                  hint="pass the tops of earlier layers, e.g. L.ReLU(n.conv1)")
        self.type_name = type_name
        self.inputs = list(inputs)
        params = dict(params)
        self.ntop = int(params.pop("ntop", 1))
        self.in_place = bool(params.pop("in_place", False))
        self.name = params.pop("name", None)
        self.params = params
        if self.in_place and self.ntop > len(self.inputs):
            raise ConfigError(f"L.{type_name}: in_place needs a bottom for each of the {self.ntop} tops")
        self.tops = tuple(Top(self, i) for i in range(self.ntop))

    def _layer_name(self, autoname) -> str:
        if self.name:
            return self.name
        if self.tops and self.tops[0].name:
            return self.tops[0].name
        return autoname(self)

    def to_layer(self, blob_name, autoname) -> "pb.LayerParameter":
        layer = pb.LayerParameter(name=self._layer_name(autoname), type=self.type_name)
        layer.bottom.extend(blob_name(b) for b in self.inputs)
        if self.in_place:
            layer.top.extend(layer.bottom[:self.ntop])
        else:
            layer.top.extend(blob_name(t) for t in self.tops)
        for key, value in self.params.items():
            target = layer if key in _LAYER_FIELDS else _param_message(self.type_name, layer, key)
            assign(target, key, value, where=layer.name)
        return layer


def _snake(type_name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", type_name).lower()


#: Data layers that also read transform_param (Caffe's BaseDataLayer family).
TRANSFORM_TYPES = {"Data", "ImageData", "WindowData", "MemoryData"}


def layer_param_fields(type_name: str) -> list[str]:
    """The ``*_param`` fields of LayerParameter a layer type reads: its registered class's
    ``param_name`` (else the one named after the type), ``transform_param`` for data layers
    that transform, ``loss_param`` for loss layers."""
    from .layers.base import LossLayer  # noqa: PLC0415
    from .registry import LAYERS  # noqa: PLC0415

    cls = LAYERS.get(type_name) if type_name in LAYERS else None
    name = getattr(cls, "param_name", None) or f"{_snake(type_name)}_param"
    fields = [name] if name in _LAYER_FIELDS else []
    if type_name in TRANSFORM_TYPES:
        fields.append("transform_param")
    is_loss = isinstance(cls, type) and issubclass(cls, LossLayer)
    if (is_loss or (cls is None and type_name.endswith("Loss"))) and "loss_param" not in fields:
        fields.append("loss_param")
    return fields


def _param_message(type_name: str, layer, key: str):
    """The ``*_param`` sub-message of ``layer`` that holds ``key``."""
    candidates = layer_param_fields(type_name)
    for name in candidates:
        if key in _LAYER_FIELDS[name].message_type.fields_by_name:
            return getattr(layer, name)
    holders = [f.name for f in _PARAM_FIELDS if key in f.message_type.fields_by_name]
    if len(holders) == 1 and not candidates:
        return getattr(layer, holders[0])  # a type caffelite does not know: the only home
    if holders:
        hint = f"'{key}' is a field of {', '.join(holders)}: pass it as e.g. {holders[0]}=dict({key}=...)"
    else:
        known = set(_LAYER_FIELDS)
        for name in candidates:
            known |= set(_LAYER_FIELDS[name].message_type.fields_by_name)
        hint = did_you_mean(key, known)
    raise ConfigError(f"L.{type_name}: unknown parameter '{key}'", layer=layer.name, hint=hint)


def assign(msg, key: str, value, where: str | None = None) -> None:
    """Set field ``key`` of ``msg`` from a Python value (dicts for messages, lists for repeated)."""
    field = msg.DESCRIPTOR.fields_by_name.get(key)
    if field is None:
        raise ConfigError(f"unknown field '{key}' in {msg.DESCRIPTOR.name}", layer=where,
                          hint=did_you_mean(key, msg.DESCRIPTOR.fields_by_name))
    try:
        if field.is_repeated:
            values = value if isinstance(value, (list, tuple)) else [value]
            target = getattr(msg, key)
            for item in values:
                if field.message_type is not None:
                    _fill(target.add(), item, where)
                else:
                    target.append(_scalar(field, item, where))
        elif field.message_type is not None:
            sub = getattr(msg, key)
            sub.SetInParent()
            _fill(sub, value, where)
        else:
            setattr(msg, key, _scalar(field, value, where))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad value {value!r} for '{key}' in {msg.DESCRIPTOR.name} ({exc})",
                          layer=where) from None


def _fill(msg, value, where) -> None:
    if isinstance(value, type(msg)):
        msg.CopyFrom(value)
        return
    if not isinstance(value, dict):
        raise ConfigError(f"{msg.DESCRIPTOR.name} needs a dict of fields, got {value!r}", layer=where)
    msg.SetInParent()
    for key, item in value.items():
        assign(msg, key, item, where)


def _scalar(field, value, where):
    if field.enum_type is not None and isinstance(value, str):
        number = field.enum_type.values_by_name.get(value)
        if number is None:
            raise ConfigError(f"bad value '{value}' for '{field.name}'", layer=where,
                              hint=did_you_mean(value, field.enum_type.values_by_name)
                              or f"use one of {', '.join(field.enum_type.values_by_name)}")
        return number.number
    if field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE) and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    if field.type == field.TYPE_BYTES and isinstance(value, str):
        return value.encode()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    return value


def to_proto(*tops: Top, name: str | None = None) -> "pb.NetParameter":
    """The NetParameter of the layers that ``tops`` depend on (pycaffe's ``caffe.to_proto``)."""
    return _Builder().build([t for t in tops], name)


class _Builder:
    def __init__(self):
        self.fn_names: dict[int, str] = {}
        self.top_names: dict[int, str] = {}
        self.counts: Counter = Counter()

    def autoname(self, fn: Function) -> str:
        if id(fn) not in self.fn_names:
            self.counts[fn.type_name] += 1
            self.fn_names[id(fn)] = f"{fn.type_name}{self.counts[fn.type_name]}"
        return self.fn_names[id(fn)]

    def blob_name(self, top: Top) -> str:
        if top.fn.in_place:  # named like its bottom, whatever attribute it was assigned to
            return self.blob_name(top.fn.inputs[top.index])
        if top.name:
            return top.name
        if id(top) not in self.top_names:
            base = top.fn._layer_name(self.autoname)
            self.top_names[id(top)] = base if top.index == 0 else f"{base}_{top.index}"
        return self.top_names[id(top)]

    def build(self, tops, name) -> "pb.NetParameter":
        net = pb.NetParameter()
        if name:
            net.name = name
        done: set[int] = set()
        order: list[Function] = []

        def visit(fn: Function) -> None:
            stack = [(fn, False)]
            while stack:  # iterative DFS: deep nets (ResNets) exceed Python's recursion limit
                current, expanded = stack.pop()
                if id(current) in done:
                    continue
                if expanded:
                    done.add(id(current))
                    order.append(current)
                    continue
                stack.append((current, True))
                for bottom in reversed(current.inputs):
                    if id(bottom.fn) not in done:
                        stack.append((bottom.fn, False))

        for item in tops:
            visit(item.fn if isinstance(item, Top) else item)
        for fn in order:
            try:
                net.layer.add().CopyFrom(fn.to_layer(self.blob_name, self.autoname))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"L.{fn.type_name}: {exc}", layer=fn._layer_name(self.autoname)) from None
        return net


class NetSpec:
    """Collects named tops by attribute assignment; ``to_proto()`` / ``to_yaml()`` emit the net."""

    def __init__(self, name: str | None = None):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_tops", {})     # name -> latest Top of that name
        object.__setattr__(self, "_assigned", [])  # every assigned Top or Function, in order

    def __setattr__(self, name: str, value) -> None:
        if not isinstance(value, (Top, Function)):
            raise ConfigError(f"NetSpec.{name}: expected a layer's top, got {type(value).__name__}",
                              hint="assign the result of an L.<Type>(...) call")
        if isinstance(value, Top):
            if value.name is None:
                value.name = name
            self._tops[name] = value
        elif value.name is None:
            value.name = name  # a layer without tops (ntop=0) named by assignment
        self._assigned.append(value)

    def __getattr__(self, name: str):
        tops = object.__getattribute__(self, "_tops")
        if name in tops:
            return tops[name]
        raise AttributeError(f"NetSpec has no top '{name}'")

    def __setitem__(self, name: str, value) -> None:
        self.__setattr__(name, value)

    def __getitem__(self, name: str):
        return self.__getattr__(name)

    @property
    def tops(self) -> dict:
        return dict(self._tops)

    def to_proto(self, name: str | None = None) -> "pb.NetParameter":
        return _Builder().build(list(self._assigned), name or self._name)

    def to_yaml(self, name: str | None = None) -> str:
        from .yaml_writer import message_to_yaml  # noqa: PLC0415

        return message_to_yaml(self.to_proto(name))

    def to_prototxt(self, name: str | None = None) -> str:
        from google.protobuf import text_format  # noqa: PLC0415

        return text_format.MessageToString(self.to_proto(name))


class _Layers:
    """``L.<Type>(*bottoms, **params)`` for any layer type name."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("_"):
            raise AttributeError(type_name)

        def layer(*bottoms, **params):
            fn = Function(type_name, bottoms, params)
            if fn.ntop == 0:
                return fn
            return fn.tops[0] if fn.ntop == 1 else fn.tops
        layer.__name__ = type_name
        return layer


class _EnumValues:
    def __init__(self, message):
        self._message = message
        for enum in message.DESCRIPTOR.enum_types:
            for value in enum.values:
                setattr(self, value.name, value.number)

    def __getattr__(self, name):
        raise AttributeError(f"{self._message.DESCRIPTOR.name} has no enum value '{name}'")


class _Params:
    """``P.<Type>.<ENUM_VALUE>``: enum values of a layer type's parameter message
    (``P.Pooling.MAX``, ``P.Eltwise.SUM``, ``P.Data.LMDB``, ``P.Loss.VALID``)."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("_"):
            raise AttributeError(type_name)
        message = getattr(pb, f"{type_name}Parameter", None)
        if message is None:
            field = _LAYER_FIELDS.get(f"{_snake(type_name)}_param")
            message = getattr(pb, field.message_type.name) if field is not None else None
        if message is None:
            raise AttributeError(f"no parameter message for '{type_name}'")
        return _EnumValues(message)


layers = _Layers()
params = _Params()

__all__ = ["NetSpec", "layers", "params", "to_proto", "Top", "Function", "assign"]
