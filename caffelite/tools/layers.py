"""``caffelite layers``: every registered layer type and the fields of its parameter message.

    caffelite layers                 # all types
    caffelite layers --type Pooling  # one type
    caffelite layers --names         # the type names only

Each field shows its type (an enum with its values, or a message name), and
its default where caffe.proto gives one. Layers registered by plugins
(``--plugin mymodule``) are listed too.
"""
from __future__ import annotations

from ..cli import _flag

COMMAND = "layers"
HELP = "list the registered layer types and their parameters"

_SCALAR_NAMES = {1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64",
                 7: "fixed32", 8: "bool", 9: "string", 12: "bytes", 13: "uint32", 15: "sfixed32",
                 16: "sfixed64", 17: "sint32", 18: "sint64"}


def add_arguments(parser) -> None:
    _flag(parser, "type", default=None, help="show only this layer type")
    _flag(parser, "names", action="store_true", help="print the type names only")
    _flag(parser, "plugin", action="append", default=[], help="import MODULE to register its layers")


def run(args) -> int:
    from ..registry import LAYERS  # noqa: PLC0415

    names = LAYERS.names()
    if args.type is not None:
        LAYERS.get(args.type)  # an unknown type raises with a suggestion
        names = [args.type]
    if args.names:
        print("\n".join(names))
        return 0
    blocks = [describe_layer(name) for name in names]
    print("\n\n".join(blocks))
    if args.type is None:
        print(f"\n{len(names)} layer types. Every layer also takes name, type, bottom, top, "
              "loss_weight, param, propagate_down, include and exclude.")
    return 0


def param_fields(type_name: str) -> list[str]:
    """The LayerParameter fields (``*_param``) a layer type reads."""
    from ..net_spec import layer_param_fields  # noqa: PLC0415
    from ..registry import LAYERS  # noqa: PLC0415

    LAYERS.get(type_name)  # unknown types raise with a suggestion
    return layer_param_fields(type_name)


def describe_layer(type_name: str) -> str:
    """A text block: the type, then each of its parameter messages with their fields."""
    from ..proto import pb  # noqa: PLC0415

    fields = param_fields(type_name)
    if not fields:
        return f"{type_name}\n    (no parameters)"
    lines = [type_name]
    for name in fields:
        field = pb.LayerParameter.DESCRIPTOR.fields_by_name[name]
        lines.append(f"  {name} ({field.message_type.name})")
        rows = [(f.name, field_type(f), field_default(f)) for f in field.message_type.fields]
        width = max((len(r[0]) for r in rows), default=0)
        for fname, ftype, default in rows:
            suffix = f" = {default}" if default is not None else ""
            lines.append(f"    {fname:<{width}}  {ftype}{suffix}")
        if not rows:
            lines.append("    (no fields)")
    return "\n".join(lines)


def field_type(field) -> str:
    """``repeated uint32``, ``PoolMethod {MAX, AVE, STOCHASTIC}``, ``FillerParameter``, ..."""
    if field.message_type is not None:
        text = field.message_type.name
    elif field.enum_type is not None:
        text = f"{field.enum_type.name} {{{', '.join(v.name for v in field.enum_type.values)}}}"
    else:
        text = _SCALAR_NAMES.get(field.type, "?")
    return f"repeated {text}" if field.is_repeated else text


def field_default(field) -> str | None:
    """The default caffe.proto declares for ``field`` (None where it declares none)."""
    if field.is_repeated or field.message_type is not None or not field.has_default_value:
        return None
    value = field.default_value
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        from ..yaml_writer import format_float  # noqa: PLC0415

        return format_float(value, single=field.type == 2)
    if isinstance(value, (bytes, str)):
        return repr(value if isinstance(value, str) else value.decode())
    return str(value)
