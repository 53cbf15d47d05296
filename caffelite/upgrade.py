"""Upgrade legacy Caffe nets and solvers to the current format (Caffe's upgrade_proto).

Old files still in circulation (the original BVLC zoo, early papers) use:

- V0 nets: ``layers { layer { type: "conv" num_output: 96 kernelsize: 11 } bottom top }``,
  one flat V0LayerParameter per layer, with separate ``padding`` layers;
- V1 nets: ``layers { type: CONVOLUTION blobs_lr: 1 weight_decay: 1 ... }``, an enum type,
  per-blob ``blobs_lr`` / ``weight_decay`` and crop/mirror/mean/scale inside data_param;
- net-level ``input`` + ``input_shape`` / ``input_dim`` instead of an Input layer;
- BatchNorm layers with three ParamSpecs (their statistics must not be learned);
- solvers with the ``solver_type`` enum instead of the ``type`` string.

The steps and their order follow Caffe's ``UpgradeNetAsNeeded``: V0 -> V1 (padding
layers folded into the following conv/pool), data transformation fields -> transform_param,
V1 -> current ``layer``, inputs -> an ``Input`` layer named "input" placed first,
BatchNorm ParamSpecs -> lr_mult = decay_mult = 0. A current net is returned as is.
The V0 -> V1 step lives in ``upgrade_v0``.
"""
from __future__ import annotations

import logging

from .errors import ConfigError
from .proto import pb
from .upgrade_v0 import V0_TYPES, copy_field, mixed_formats_error, upgrade_v0_layers  # noqa: F401 - V0_TYPES re-exported

log = logging.getLogger("caffelite")

_HINT = "save the upgraded file with `caffelite convert`"

# ---- V1 (enum type) -> current ------------------------------------------------
V1_TYPES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}
# V1 fields that do not copy by name into LayerParameter.
_V1_SPECIAL = {"type", "layer", "param", "blob_share_mode", "blobs_lr", "weight_decay"}
# Data layers whose *_param used to hold the transformation fields.
_DATA_TRANSFORM = {"Data": "data_param", "ImageData": "image_data_param",
                   "WindowData": "window_data_param"}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")

SOLVER_TYPES = {"SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad",
                "RMSPROP": "RMSProp", "ADADELTA": "AdaDelta", "ADAM": "Adam"}


# ---- what needs upgrading -----------------------------------------------------
def _needs_v0(param) -> bool:
    return any(v1.HasField("layer") for v1 in param.layers)


def _needs_input(param) -> bool:
    return bool(param.input) or bool(param.input_shape) or bool(param.input_dim)


def _needs_batch_norm(param) -> bool:
    """Caffe resets lr_mult/decay_mult of BatchNorm layers declaring three ParamSpecs;
    it only counts as an upgrade when that changes a value."""
    return any(lp.type == "BatchNorm" and len(lp.param) == 3
               and any(p.lr_mult != 0 or p.decay_mult != 0 for p in lp.param)
               for lp in param.layer)


def net_needs_upgrade(param) -> bool:
    """True when ``param`` uses any legacy construct that ``upgrade_net`` rewrites."""
    return bool(param.layers) or _needs_input(param) or _needs_batch_norm(param)


def solver_needs_upgrade(param) -> bool:
    """True when the solver uses ``solver_type`` or embeds a legacy net."""
    return param.HasField("solver_type") or any(net_needs_upgrade(n) for n in _solver_nets(param))


# ---- V1 -> current ------------------------------------------------------------
def _v1_to_layer(v1, out, source) -> bool:
    """Fill LayerParameter ``out`` from V1 layer ``v1``; True if data fields were moved."""
    name = v1.name or None
    type_name = pb.V1LayerParameter.LayerType.Name(v1.type) if v1.HasField("type") else "NONE"
    if type_name not in V1_TYPES:
        raise ConfigError(f"V1 layer has no supported type (got {type_name})", file=source,
                          layer=name, hint="set `type:` to a V1 layer type such as CONVOLUTION")
    if v1.HasField("layer"):
        raise mixed_formats_error(source, name)
    fields = pb.LayerParameter.DESCRIPTOR.fields_by_name
    for fd, value in v1.ListFields():
        if fd.name in _V1_SPECIAL:
            continue
        if fd.name not in fields:  # the schema keeps every V1 field in LayerParameter
            raise ConfigError(f"V1 field '{fd.name}' has no current equivalent", file=source,
                              layer=name)
        copy_field(out, fd.name, fd, value)
    out.type = V1_TYPES[type_name]
    # One ParamSpec per blob that has any per-blob setting.
    count = max(len(v1.param), len(v1.blob_share_mode), len(v1.blobs_lr), len(v1.weight_decay))
    for _ in range(count):
        out.param.add()
    for i, pname in enumerate(v1.param):
        out.param[i].name = pname
    for i, mode in enumerate(v1.blob_share_mode):
        out.param[i].share_mode = mode  # STRICT = 0, PERMISSIVE = 1 in both enums
    for i, lr in enumerate(v1.blobs_lr):
        out.param[i].lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        out.param[i].decay_mult = decay
    return _move_transform_fields(out)


def _move_transform_fields(layer) -> bool:
    """Move data_param/image_data_param/window_data_param scale, mean_file, crop_size and
    mirror into transform_param (Caffe's UpgradeNetDataTransformation)."""
    sub = _DATA_TRANSFORM.get(layer.type)
    if sub is None or not layer.HasField(sub):
        return False
    old = getattr(layer, sub)
    moved = False
    for field in _TRANSFORM_FIELDS:
        if old.HasField(field):
            setattr(layer.transform_param, field, getattr(old, field))
            old.ClearField(field)
            moved = True
    return moved


# ---- net-level inputs -> Input layer ------------------------------------------
def _input_layer(param, source):
    """The Input layer replacing net-level inputs, or None (names alone: just dropped,
    as in old caffemodels)."""
    inputs, shapes, dims = list(param.input), param.input_shape, list(param.input_dim)
    if not shapes and not dims:
        return None
    if shapes and dims:
        raise ConfigError("the net sets both input_shape and input_dim", file=source,
                          hint="keep one of them, or better, declare an Input layer")
    if shapes and len(shapes) != len(inputs):
        raise ConfigError(f"{len(inputs)} net inputs but {len(shapes)} input_shape entries",
                          file=source, hint="give exactly one input_shape per input")
    if dims and len(dims) != 4 * len(inputs):
        raise ConfigError(f"{len(inputs)} net inputs but {len(dims)} input_dim values",
                          file=source, hint="give exactly 4 input_dim values (N, C, H, W) "
                                            "per input, or use input_shape")
    layer = pb.LayerParameter(name="input", type="Input")
    layer.top.extend(inputs)
    if shapes:
        for shape in shapes:
            layer.input_param.shape.add().CopyFrom(shape)
    else:
        for i in range(len(inputs)):
            layer.input_param.shape.add().dim.extend(dims[4 * i:4 * i + 4])
    return layer


# ---- the upgrades -------------------------------------------------------------
def upgrade_net(param, source: str | None = None):
    """Return ``param`` upgraded to the current format.

    A net with nothing legacy is returned unchanged (the same object); otherwise a new
    NetParameter, and one warning says which upgrades were applied. ``source`` (a file
    path) only labels messages. Raises ConfigError for what cannot be upgraded.
    """
    if not net_needs_upgrade(param):
        return param
    if param.layers and param.layer:
        raise ConfigError("the net has both `layer` (current) and `layers` (legacy V1) entries",
                          file=source, hint="write every layer as `layer { type: \"...\" }`")
    applied = []
    v1_layers = param.layers
    if _needs_v0(param):
        v1_layers = upgrade_v0_layers(param, source)
        applied.append("V0 layers")
    elif param.layers:
        applied.append("V1 layers")
    out = pb.NetParameter()
    for fd, value in param.ListFields():
        if fd.name not in ("layer", "layers", "input", "input_shape", "input_dim"):
            copy_field(out, fd.name, fd, value)
    input_layer = _input_layer(param, source)
    if input_layer is not None:
        out.layer.add().CopyFrom(input_layer)  # first, so the layers after can use it
        applied.append("net-level inputs -> Input layer")
    elif param.input:
        applied.append("net-level input names dropped")
    if v1_layers:
        moved = False
        for v1 in v1_layers:
            moved |= _v1_to_layer(v1, out.layer.add(), source)
        if moved:
            applied.append("data transformation fields -> transform_param")
    else:
        out.layer.extend(param.layer)
    if _needs_batch_norm(out):
        for lp in out.layer:
            if lp.type == "BatchNorm" and len(lp.param) == 3:
                for spec in lp.param:
                    spec.lr_mult = 0.0
                    spec.decay_mult = 0.0
        applied.append("BatchNorm lr_mult/decay_mult -> 0")
    where = f"{source}: " if source else ""
    label = f"net '{param.name}'" if param.name else "net"
    log.warning("%supgraded legacy Caffe %s (%s); %s", where, label, ", ".join(applied), _HINT)
    return out


def _solver_nets(param):
    nets = [param.net_param] if param.HasField("net_param") else []
    if param.HasField("train_net_param"):
        nets.append(param.train_net_param)
    return nets + list(param.test_net_param)


def upgrade_solver(param, source: str | None = None):
    """Return ``param`` with ``solver_type`` replaced by ``type`` (and embedded nets upgraded);
    the same object when nothing is legacy."""
    if not solver_needs_upgrade(param):
        return param
    out = pb.SolverParameter()
    out.CopyFrom(param)
    if out.HasField("solver_type"):
        enum_name = pb.SolverParameter.SolverType.Name(out.solver_type)
        new = SOLVER_TYPES[enum_name]
        if out.HasField("type") and out.type != new:
            raise ConfigError(f"solver_type {enum_name} and type \"{out.type}\" disagree",
                              file=source, hint="drop the deprecated solver_type")
        out.type = new
        out.ClearField("solver_type")
        where = f"{source}: " if source else ""
        log.warning("%supgraded legacy solver_type %s -> type \"%s\"; %s", where, enum_name,
                    new, _HINT)
    for field in ("net_param", "train_net_param"):
        if out.HasField(field):
            getattr(out, field).CopyFrom(upgrade_net(getattr(out, field), source))
    for net in out.test_net_param:
        net.CopyFrom(upgrade_net(net, source))
    return out
