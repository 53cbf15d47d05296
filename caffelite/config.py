"""Net and solver files (YAML or prototxt) to protobuf messages, with file:line errors.

YAML keys are exactly Caffe's field names; ``layer:`` is a list; a single
value is accepted where a repeated field is expected. Errors name the file,
the line, the layer and the field, and suggest the closest valid name.

Relative paths inside a file (data sources, mean files, the solver's ``net``,
``snapshot_prefix``, ...) are taken relative to the folder of the file that
names them. When nothing is there but the path exists relative to the current
directory, the current directory is used instead, so Caffe's root-relative
configs keep working. Paths given on the command line (``--set``) are
relative to the current directory.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

import yaml
from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor

from .errors import ConfigError, did_you_mean
from .proto import pb

YAML_SUFFIXES = (".yaml", ".yml")

# (sub-message field, path field) pairs in a LayerParameter that hold file paths.
LAYER_PATH_FIELDS = (
    ("data_param", "source"), ("transform_param", "mean_file"), ("hdf5_data_param", "source"),
    ("image_data_param", "source"), ("image_data_param", "root_folder"),
    ("window_data_param", "source"), ("window_data_param", "root_folder"),
    ("hdf5_output_param", "file_name"),
)
SOLVER_PATH_FIELDS = ("net", "train_net", "test_net", "snapshot_prefix", "weights")

_layer_lines: dict[str, dict[str, int]] = {}


# ---- public API ---------------------------------------------------------------
def load_net(path: str | os.PathLike) -> "pb.NetParameter":
    """Read a net from a .yaml/.yml or .prototxt file, paths resolved."""
    path = _existing(path, "net")
    param = _load(path, pb.NetParameter())
    resolve_net_paths(param, path.parent)
    return param


def load_solver(path: str | os.PathLike, overrides: Iterable[str] = ()) -> "pb.SolverParameter":
    """Read a solver file, resolve its paths, then apply ``key=value`` overrides."""
    path = _existing(path, "solver")
    param = _load(path, pb.SolverParameter())
    base = path.parent
    for name in SOLVER_PATH_FIELDS:
        field = param.DESCRIPTOR.fields_by_name[name]
        if _is_repeated(field):
            values = [resolve_path(v, base) for v in getattr(param, name)]
            del getattr(param, name)[:]
            getattr(param, name).extend(values)
        elif param.HasField(name):
            setattr(param, name, resolve_path(getattr(param, name), base))
    for net_field in ("net_param", "train_net_param"):
        if param.HasField(net_field):
            resolve_net_paths(getattr(param, net_field), base)
    for net_param in param.test_net_param:
        resolve_net_paths(net_param, base)
    apply_overrides(param, overrides)
    return param


def apply_overrides(msg, overrides: Iterable[str]) -> None:
    """Apply ``key=value`` settings (value in YAML syntax) to a message's fields."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set '{item}' is not of the form key=value",
                              hint="for example --set max_iter=2000")
        try:
            node = yaml.compose(f"{key}: {text}" if text.strip() else f"{key}: ''", Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set '{item}': cannot read the value ({exc})") from None
        field = msg.DESCRIPTOR.fields_by_name.get(key)
        if field is not None:
            msg.ClearField(key)
        _YamlReader("--set").fill(msg, node, layer=None)


def parse_net(text: str, fmt: str = "yaml", source: str = "<string>") -> "pb.NetParameter":
    """A net from a string in YAML or prototxt form (no path resolution)."""
    return _parse(text, fmt, source, pb.NetParameter())


def parse_solver(text: str, fmt: str = "yaml", source: str = "<string>") -> "pb.SolverParameter":
    return _parse(text, fmt, source, pb.SolverParameter())


def layer_line(source: str | os.PathLike, layer: str) -> int | None:
    """The line where ``layer`` is defined in ``source`` (a file read by this module)."""
    return _layer_lines.get(str(Path(source)), {}).get(layer)


def resolve_path(value: str, base: Path) -> str:
    """Apply the relative-path rule of this module's docstring."""
    if not value or os.path.isabs(value) or "://" in value or value.startswith("zoo:"):
        return value
    beside = Path(os.path.normpath(base / value))
    here = Path(value)
    if beside.exists() or (beside.parent.exists() and not here.exists()):
        return str(beside)
    if here.exists() or here.parent.exists():
        return value
    return str(beside)


def resolve_net_paths(param, base: Path) -> None:
    for layer in list(param.layer) + list(param.layers):
        for sub, name in LAYER_PATH_FIELDS:
            if layer.HasField(sub):
                msg = getattr(layer, sub)
                if msg.HasField(name):
                    setattr(msg, name, resolve_path(getattr(msg, name), base))


# ---- loading -------------------------------------------------------------------
def _existing(path, what: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"is a folder, not a {what} file", file=str(path),
                          hint=f"pass the {what} file itself (.yaml or .prototxt)")
    if not path.is_file():
        raise ConfigError(f"{what} file not found", file=str(path),
                          hint="check the path; relative paths are taken from the current directory")
    return path


def _load(path: Path, msg):
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file ({exc})", file=str(path)) from None
    fmt = "yaml" if path.suffix.lower() in YAML_SUFFIXES else "prototxt"
    msg = _parse(text, fmt, str(path), msg)
    _layer_lines[str(path)] = _find_layer_lines(text, fmt, msg)
    return msg


def _parse(text: str, fmt: str, source: str, msg):
    if fmt == "yaml":
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            raise ConfigError(f"malformed YAML: {exc.problem or exc}", file=source,
                              line=mark.line + 1 if mark else None,
                              hint="check the indentation and the brackets near this line") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"malformed YAML: {exc}", file=source) from None
        except RecursionError:
            raise ConfigError("malformed YAML: nested too deeply", file=source) from None
        if root is None:
            raise ConfigError("the file is empty", file=source)
        try:
            _YamlReader(source).fill(msg, root, layer=None)
        except RecursionError:  # an alias that contains itself (&a [*a]) or absurd nesting
            raise ConfigError("the YAML nests too deeply (an alias that refers to itself?)",
                              file=source) from None
        return msg
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        raise _prototxt_error(exc, source, text) from None
    return msg


def _prototxt_error(exc: text_format.ParseError, source: str, text: str) -> ConfigError:
    message = str(exc)
    line = exc.GetLine() if hasattr(exc, "GetLine") else None
    message = re.sub(r"^\d+:\d+\s*:\s*", "", message)
    hint = None
    unknown = re.search(r'Message type "caffelite\.(\w+)" has no field named "(\w+)"', message)
    if unknown:
        cls = getattr(pb, unknown.group(1), None)
        if cls is not None:
            hint = did_you_mean(unknown.group(2), cls.DESCRIPTOR.fields_by_name)
        message = f"unknown field '{unknown.group(2)}' in {unknown.group(1)}"
    layer = None
    if line:
        layer = _enclosing_layer(text, line)
    return ConfigError(message, file=source, line=line, layer=layer, hint=hint)


def _enclosing_layer(text: str, line: int) -> str | None:
    """The name of the layer block that contains ``line`` of a prototxt, if any."""
    rows = text.splitlines()
    starts = [i for i, row in enumerate(rows[:line]) if re.search(r"\blayers?\s*\{", row)]
    if not starts:
        return None
    found = re.search(r'\bname\s*:\s*"([^"]*)"', "\n".join(rows[starts[-1]:]))
    return found.group(1) if found else None


def _find_layer_lines(text: str, fmt: str, msg) -> dict[str, int]:
    if not isinstance(msg, pb.NetParameter):
        return {}
    lines: dict[str, int] = {}
    if fmt == "yaml":
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        for key, value in root.value if isinstance(root, yaml.MappingNode) else ():
            if key.value in ("layer", "layers") and isinstance(value, yaml.SequenceNode):
                for item in value.value:
                    name = _mapping_get(item, "name")
                    if name is not None:
                        lines.setdefault(name, item.start_mark.line + 1)
        return lines
    for number, row in enumerate(text.splitlines(), 1):
        for name in re.findall(r'\bname\s*:\s*"([^"]*)"', row):
            lines.setdefault(name, number)
    return lines


def _mapping_get(node, key: str):
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.value == key and isinstance(v, yaml.ScalarNode):
                return v.value
    return None


def _is_repeated(field) -> bool:
    return field.is_repeated


_INT_TYPES = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
              FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
              FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64,
              FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SFIXED64}
_FLOAT_TYPES = {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE}
_INT32 = (-(1 << 31), (1 << 31) - 1)
_INT_RANGES = {FieldDescriptor.TYPE_INT32: _INT32, FieldDescriptor.TYPE_SINT32: _INT32,
               FieldDescriptor.TYPE_SFIXED32: _INT32, FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
               FieldDescriptor.TYPE_FIXED32: (0, (1 << 32) - 1), FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
               FieldDescriptor.TYPE_FIXED64: (0, (1 << 64) - 1)}


class _YamlReader:
    """Fills a message from a YAML node tree, checking every key and value."""

    def __init__(self, source: str):
        self.source = source
        self._constructor = yaml.constructor.SafeConstructor()

    def error(self, node, message: str, layer: str | None, hint: str | None = None) -> ConfigError:
        return ConfigError(message, file=self.source, line=node.start_mark.line + 1, layer=layer, hint=hint)

    def fill(self, msg, node, layer: str | None) -> None:
        type_name = msg.DESCRIPTOR.name
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"expected a mapping of {type_name} fields, got '{_show(node)}'", layer,
                             hint="write 'field: value' pairs")
        if isinstance(msg, pb.LayerParameter) and layer is None:
            layer = _mapping_get(node, "name")
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(key_node, f"a key of {type_name} must be a field name, got "
                                           f"'{_show(key_node)}'", layer)
            key = key_node.value
            if key in seen:
                raise self.error(key_node, f"key '{key}' appears twice in {type_name}", layer,
                                 hint="give each field once; use a list for repeated fields")
            seen.add(key)
            field = msg.DESCRIPTOR.fields_by_name.get(key)
            if field is None:
                raise self.error(key_node, f"unknown key '{key}' in {type_name}", layer,
                                 hint=did_you_mean(key, msg.DESCRIPTOR.fields_by_name))
            if _is_repeated(field):
                items = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                target = getattr(msg, key)
                for item in items:
                    if field.type == FieldDescriptor.TYPE_MESSAGE:
                        self.fill(target.add(), item, layer if not isinstance(msg, pb.NetParameter) else None)
                    else:
                        target.append(self.scalar(field, item, layer))
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                sub = getattr(msg, key)
                sub.SetInParent()  # an empty mapping still sets the field, as in prototxt
                self.fill(sub, value_node, layer)
            else:
                setattr(msg, key, self.scalar(field, value_node, layer))

    def scalar(self, field, node, layer):
        where = f"'{field.name}'"
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, f"{where} takes a single value, got '{_show(node)}'", layer)
        if field.type == FieldDescriptor.TYPE_STRING:
            return node.value
        if field.type == FieldDescriptor.TYPE_BYTES:
            return node.value.encode()
        try:
            value = self._constructor.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            problem = getattr(exc, "problem", None) or exc
            raise self.error(node, f"{where}: cannot read '{node.value}' ({problem})", layer) from None
        if field.type == FieldDescriptor.TYPE_ENUM:
            names = field.enum_type.values_by_name
            if isinstance(value, str) and value in names:
                return names[value].number
            if isinstance(value, int) and not isinstance(value, bool) and value in field.enum_type.values_by_number:
                return value
            raise self.error(node, f"bad value '{node.value}' for {where}", layer,
                             hint=did_you_mean(str(node.value), names) or f"use one of {', '.join(names)}")
        if field.type == FieldDescriptor.TYPE_BOOL:
            if isinstance(value, bool):
                return value
            raise self.error(node, f"{where} takes true or false, got '{node.value}'", layer)
        if field.type in _INT_TYPES:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, int) and not isinstance(value, bool):
                if field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64) and value < 0:
                    raise self.error(node, f"{where} cannot be negative, got {value}", layer)
                low, high = _INT_RANGES.get(field.type, (-(1 << 63), (1 << 63) - 1))
                if not low <= value <= high:
                    raise self.error(node, f"{where} is out of range: {value} (the field holds "
                                           f"{low} to {high})", layer)
                return value
            raise self.error(node, f"{where} takes an integer, got '{node.value}'", layer)
        if field.type in _FLOAT_TYPES:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            raise self.error(node, f"{where} takes a number, got '{node.value}'", layer)
        raise self.error(node, f"{where} has an unsupported type", layer)


def _show(node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return node.value
    return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"
