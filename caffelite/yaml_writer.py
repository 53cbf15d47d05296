"""Messages to YAML text in the house style (the inverse of config.py's reader).

- Keys are Caffe's field names, in the order caffe.proto declares them; only
  fields that are set are written (proto2 presence), so defaults stay implicit
  exactly as in the source file.
- Enums are written by name, floats of ``float`` fields in their shortest
  float32 form (``0.1``, ``5.0e-05``), so parsing the text gives the same bits.
- A repeated field with one value is written as that value (``top: conv1``);
  with several as a flow list (``top: [data, label]``). ``layer:`` is always a
  block list.
- A layer that fits in a few lines is one flow mapping, wrapped under its
  opening brace; a longer one is a block mapping whose values are flow::

      layer:
        - {name: conv1, type: Convolution, bottom: data, top: conv1,
           param: [{lr_mult: 1}, {lr_mult: 2}],
           convolution_param: {num_output: 20, kernel_size: 5, weight_filler: {type: xavier}}}

Strings that YAML would read as something else (``"1"``, ``"true"``,
``"a: b"``, ``""``) are double-quoted.
"""
from __future__ import annotations

import math
import re

import numpy as np
import yaml
from google.protobuf.descriptor import FieldDescriptor

WIDTH = 100
#: A layer whose flow form needs more lines than this is written as a block mapping.
MAX_FLOW_LINES = 4

_PLAIN = re.compile(r"^[A-Za-z0-9_./][A-Za-z0-9_./+\-]*$")
_STR_TAG = "tag:yaml.org,2002:str"
_BLOCK_LISTS = {"layer", "layers"}
_F = FieldDescriptor


# ---- scalars --------------------------------------------------------------------------
def format_float(value: float, single: bool = True) -> str:
    """The shortest text that reads back to the same float32 (or float64) as a YAML float."""
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    if value == 0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0"
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    number = np.float32(value) if single else np.float64(value)
    positional = np.format_float_positional(number, unique=True, trim="-")
    text = np.format_float_scientific(number, unique=True, trim="-", exp_digits=2)
    mantissa, _, exponent = text.partition("e")
    if "." not in mantissa:
        mantissa += ".0"  # YAML 1.1 floats need a dot ("1e-05" would be a string)
    if exponent[0] not in "+-":
        exponent = "+" + exponent
    scientific = f"{mantissa}e{exponent}"
    return positional if len(positional) <= len(scientific) else scientific


def format_string(text: str) -> str:
    """``text`` plain when YAML reads it back as the same string, else double-quoted."""
    if _PLAIN.match(text) and yaml.SafeLoader.resolve(yaml.SafeLoader, yaml.ScalarNode, text,
                                                      (True, False)) == _STR_TAG:
        return text
    return _double_quoted(text)


def _double_quoted(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F or (0xA0 <= code <= 0xD7FF) or (0xE000 <= code <= 0xFFFD) \
                or code >= 0x10000:
            out.append(ch)  # printable in a YAML stream
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}")
    out.append('"')
    return "".join(out)


def _scalar(field, value) -> str:
    if field.type == _F.TYPE_ENUM:
        number = field.enum_type.values_by_number.get(value)
        return number.name if number is not None else str(value)
    if field.type == _F.TYPE_BOOL:
        return "true" if value else "false"
    if field.type == _F.TYPE_FLOAT:
        return format_float(float(value), single=True)
    if field.type == _F.TYPE_DOUBLE:
        return format_float(float(value), single=False)
    if field.type == _F.TYPE_STRING:
        return format_string(value)
    if field.type == _F.TYPE_BYTES:
        return format_string(value.decode("utf-8", errors="surrogateescape"))
    return str(int(value))


# ---- an intermediate tree: ("map", [(key, node)]), ("list", [node]) or ("scalar", text) ----
def _set_fields(msg):
    """(field, value) for every set field, in declaration order."""
    for field in msg.DESCRIPTOR.fields:
        if field.is_repeated:
            values = getattr(msg, field.name)
            if len(values):
                yield field, values
        elif msg.HasField(field.name):
            yield field, getattr(msg, field.name)


def _tree(msg):
    items = []
    for field, value in _set_fields(msg):
        if field.is_repeated:
            nodes = [_tree(v) if field.type == _F.TYPE_MESSAGE else ("scalar", _scalar(field, v))
                     for v in value]
            items.append((field.name, nodes[0] if len(nodes) == 1 else ("list", nodes)))
        elif field.type == _F.TYPE_MESSAGE:
            items.append((field.name, _tree(value)))
        else:
            items.append((field.name, ("scalar", _scalar(field, value))))
    return ("map", items)


def _one_line(node) -> str:
    kind, body = node
    if kind == "scalar":
        return body
    if kind == "list":
        return "[" + ", ".join(_one_line(n) for n in body) + "]"
    return "{" + ", ".join(f"{k}: {_one_line(v)}" for k, v in body) + "}"


def _flow(node, col: int, width: int) -> list[str]:
    """``node`` in flow style starting at column ``col``: the first line has no indent,
    later lines are indented to align under the opening bracket."""
    text = _one_line(node)
    kind, body = node
    if kind == "scalar" or col + len(text) <= width or not body:
        return [text]
    opening, closing = ("[", "]") if kind == "list" else ("{", "}")
    inner = col + 1
    parts = [(None, n) for n in body] if kind == "list" else list(body)
    lines = [opening]
    for i, (key, child) in enumerate(parts):
        prefix = f"{key}: " if kind == "map" else ""
        tail = ", " if i < len(parts) - 1 else closing
        # The column where this item would start on the current line.
        start = col + len(lines[-1]) if len(lines) == 1 else len(lines[-1])
        single = prefix + _one_line(child) + tail
        if start + len(single.rstrip()) <= width:
            lines[-1] += single
            continue
        if lines[-1].strip() not in ("", opening):  # something on this line already: break
            lines[-1] = lines[-1].rstrip()
            lines.append(" " * inner)
            start = inner
        if start + len(single.rstrip()) <= width:
            lines[-1] += single
            continue
        sub = _flow(child, start + len(prefix), width)
        lines[-1] += prefix + sub[0]
        lines.extend(sub[1:])
        lines[-1] += tail
    lines[-1] = lines[-1].rstrip()
    # Lines after the first carry their own indentation (absolute columns); the first
    # line's indentation is the caller's.
    return lines


def _block(node, indent: int, width: int) -> list[str]:
    """A ("map", ...) node as a block mapping at ``indent``."""
    lines = []
    pad = " " * indent
    for key, child in node[1]:
        lines.extend(_block_item(key, child, pad, width))
    return lines


def _block_item(key: str, child, pad: str, width: int) -> list[str]:
    head = f"{pad}{key}: "
    kind = child[0]
    if key in _BLOCK_LISTS and kind != "scalar":
        entries = child[1] if kind == "list" else [child]
        lines = [f"{pad}{key}:"]
        for entry in entries:
            lines.extend(_sequence_entry(entry, pad + "  ", width))
        return lines
    flow = _flow(child, len(head), width)
    if kind == "map" and child[1] and len(flow) > MAX_FLOW_LINES:
        return [f"{pad}{key}:"] + _block(child, len(pad) + 2, width)
    if kind == "list" and len(flow) > MAX_FLOW_LINES and all(n[0] == "map" for n in child[1]):
        lines = [f"{pad}{key}:"]
        for entry in child[1]:
            lines.extend(_sequence_entry(entry, pad + "  ", width))
        return lines
    return [head + flow[0]] + flow[1:]


def _sequence_entry(entry, pad: str, width: int) -> list[str]:
    """One ``- ...`` item of a block list at indentation ``pad``."""
    head = f"{pad}- "
    flow = _flow(entry, len(head), width)
    if entry[0] != "map" or not entry[1] or len(flow) <= MAX_FLOW_LINES:
        return [head + flow[0]] + flow[1:]
    body = _block(entry, len(head), width)
    return [head + body[0].lstrip()] + body[1:]


# ---- public API -------------------------------------------------------------------------
def message_to_yaml(msg, width: int = WIDTH) -> str:
    """``msg`` (a NetParameter, SolverParameter or any message) as YAML text."""
    lines = _block(_tree(msg), 0, width)
    return "\n".join(lines) + "\n" if lines else "{}\n"


__all__ = ["message_to_yaml", "format_float", "format_string"]
