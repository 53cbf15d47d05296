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
"""
from __future__ import annotations

import logging

from .errors import ConfigError
from .proto import pb

log = logging.getLogger("caffelite")

_HINT = "save the upgraded file with `caffelite convert`"

# ---- V0 (flat V0LayerParameter) -> V1 ------------------------------------------
# V0 type string -> V1 LayerType enum name.
V0_TYPES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION",
    "data": "DATA", "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN", "hdf5_data": "HDF5_DATA", "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL", "images": "IMAGE_DATA", "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT", "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS", "pool": "POOLING",
    "relu": "RELU", "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT", "tanh": "TANH", "window_data": "WINDOW_DATA",
}

# V0 field -> {V0 type: "sub_param.field"}; a trailing "[]" appends to a repeated field.
_V0_FIELDS = {
    "num_output": {"conv": "convolution_param.num_output",
                   "innerproduct": "inner_product_param.num_output"},
    "biasterm": {"conv": "convolution_param.bias_term",
                 "innerproduct": "inner_product_param.bias_term"},
    "weight_filler": {"conv": "convolution_param.weight_filler",
                      "innerproduct": "inner_product_param.weight_filler"},
    "bias_filler": {"conv": "convolution_param.bias_filler",
                    "innerproduct": "inner_product_param.bias_filler"},
    "pad": {"conv": "convolution_param.pad[]", "pool": "pooling_param.pad"},
    "kernelsize": {"conv": "convolution_param.kernel_size[]", "pool": "pooling_param.kernel_size"},
    "group": {"conv": "convolution_param.group"},
    "stride": {"conv": "convolution_param.stride[]", "pool": "pooling_param.stride"},
    "pool": {"pool": "pooling_param.pool"},  # same enum values (MAX, AVE, STOCHASTIC)
    "dropout_ratio": {"dropout": "dropout_param.dropout_ratio"},
    "local_size": {"lrn": "lrn_param.local_size"},
    "alpha": {"lrn": "lrn_param.alpha"},
    "beta": {"lrn": "lrn_param.beta"},
    "k": {"lrn": "lrn_param.k"},
    "source": {"data": "data_param.source", "hdf5_data": "hdf5_data_param.source",
               "images": "image_data_param.source", "window_data": "window_data_param.source",
               "infogain_loss": "infogain_loss_param.source"},
    "batchsize": {"data": "data_param.batch_size", "hdf5_data": "hdf5_data_param.batch_size",
                  "images": "image_data_param.batch_size",
                  "window_data": "window_data_param.batch_size"},
    "rand_skip": {"data": "data_param.rand_skip", "images": "image_data_param.rand_skip"},
    "shuffle_images": {"images": "image_data_param.shuffle"},
    "new_height": {"images": "image_data_param.new_height"},
    "new_width": {"images": "image_data_param.new_width"},
    "concat_dim": {"concat": "concat_param.concat_dim"},
    "det_fg_threshold": {"window_data": "window_data_param.fg_threshold"},
    "det_bg_threshold": {"window_data": "window_data_param.bg_threshold"},
    "det_fg_fraction": {"window_data": "window_data_param.fg_fraction"},
    "det_context_pad": {"window_data": "window_data_param.context_pad"},
    "det_crop_mode": {"window_data": "window_data_param.crop_mode"},
    "hdf5_output_param": {"hdf5_output": "hdf5_output_param."},
}
# V0 fields Caffe moves to transform_param whatever the layer type.
_V0_TRANSFORM = {"scale": "scale", "meanfile": "mean_file", "cropsize": "crop_size",
                 "mirror": "mirror"}
# Fields of the V0 padding layer only (their pad is folded into the next layer).
_V0_IGNORED = {"new_num", "new_channels"}

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


# ---- helpers ------------------------------------------------------------------
def _copy_field(dst, name, fd, value) -> None:
    """Copy one set field (by name) of another message into ``dst``."""
    if fd.is_repeated:
        target = getattr(dst, name)
        if fd.message_type is not None:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif fd.message_type is not None:
        getattr(dst, name).CopyFrom(value)
    else:
        setattr(dst, name, value)


def _assign(msg, path: str, value) -> None:
    """Set ``sub_param.field`` (``[]`` appends; empty field copies the whole sub-message)."""
    sub, field = path.split(".")
    parent = getattr(msg, sub)
    if not field:
        parent.CopyFrom(value)
    elif field.endswith("[]"):
        getattr(parent, field[:-2]).append(value)
    elif hasattr(value, "CopyFrom"):
        getattr(parent, field).CopyFrom(value)
    else:
        setattr(parent, field, value)


# ---- V0 -> V1 -----------------------------------------------------------------
def _fold_v0_padding(param, source):
    """Drop V0 ``padding`` layers, moving their pad into the conv/pool layer they feed."""
    out = []  # V1LayerParameter copies, padding layers left out
    producer: dict[str, int] = {name: -1 for name in param.input}
    for i, conn in enumerate(param.layers):
        v0 = conn.layer
        if v0.type != "padding":
            out.append(pb.V1LayerParameter())
            out[-1].CopyFrom(conn)
        for j, blob in enumerate(conn.bottom):
            if blob not in producer:
                raise ConfigError(f"bottom '{blob}' is produced by no earlier layer",
                                  file=source, layer=v0.name or None)
            src = producer[blob]
            if src < 0 or param.layers[src].layer.type != "padding":
                continue
            pad_layer = param.layers[src]
            if v0.type not in ("conv", "pool"):
                raise ConfigError(f"a V0 padding layer ('{pad_layer.layer.name}') feeds a layer of "
                                  f"type '{v0.type}'", file=source, layer=v0.name or None,
                                  hint="only conv and pool layers can absorb a padding layer")
            if len(conn.bottom) != 1 or len(pad_layer.bottom) != 1 or len(pad_layer.top) != 1:
                raise ConfigError("a V0 padding layer and the layer it feeds must each have "
                                  "exactly one bottom (and the padding layer one top)",
                                  file=source, layer=v0.name or None)
            out[-1].layer.pad = pad_layer.layer.pad
            out[-1].bottom[j] = pad_layer.bottom[0]
        for blob in conn.top:
            producer[blob] = i
    return out


def _v0_to_v1(conn, source):
    """One V0 layer (inside a V1 ``layers`` entry) -> a V1LayerParameter."""
    v0 = conn.layer
    name = v0.name or None
    kind = v0.type
    if kind not in V0_TYPES:
        raise ConfigError(f"unsupported V0 layer type '{kind}'", file=source, layer=name,
                          hint=f"known V0 types: {', '.join(sorted(V0_TYPES))}")
    out = pb.V1LayerParameter()
    out.bottom.extend(conn.bottom)
    out.top.extend(conn.top)
    if v0.HasField("name"):
        out.name = v0.name
    out.type = pb.V1LayerParameter.LayerType.Value(V0_TYPES[kind])
    for fd, value in v0.ListFields():
        field = fd.name
        if field in ("name", "type") or field in _V0_IGNORED:
            continue
        if field in ("blobs", "blobs_lr", "weight_decay"):
            _copy_field(out, field, fd, value)
        elif field in _V0_TRANSFORM:
            setattr(out.transform_param, _V0_TRANSFORM[field], value)
        elif kind in _V0_FIELDS.get(field, {}):
            _assign(out, _V0_FIELDS[field][kind], value)
        else:
            # Caffe logs this and goes on without the field; so do we.
            log.warning("%slayer '%s': V0 field '%s' does not apply to type '%s'; ignored",
                        f"{source}: " if source else "", v0.name, field, kind)
    return out


def _upgrade_v0_layers(param, source):
    for conn in param.layers:
        if not conn.HasField("layer"):
            raise ConfigError("the net mixes V0 layers (layers { layer { ... } }) with V1 layers",
                              file=source, layer=conn.name or None,
                              hint="write every layer in one format")
    return [_v0_to_v1(conn, source) for conn in _fold_v0_padding(param, source)]


# ---- V1 -> current ------------------------------------------------------------
def _v1_to_layer(v1, out, source) -> bool:
    """Fill LayerParameter ``out`` from V1 layer ``v1``; True if data fields were moved."""
    name = v1.name or None
    type_name = pb.V1LayerParameter.LayerType.Name(v1.type) if v1.HasField("type") else "NONE"
    if type_name not in V1_TYPES:
        raise ConfigError(f"V1 layer has no supported type (got {type_name})", file=source,
                          layer=name, hint="set `type:` to a V1 layer type such as CONVOLUTION")
    if v1.HasField("layer"):
        raise ConfigError("the net mixes V0 layers (layers { layer { ... } }) with V1 layers",
                          file=source, layer=name, hint="write every layer in one format")
    fields = pb.LayerParameter.DESCRIPTOR.fields_by_name
    for fd, value in v1.ListFields():
        if fd.name in _V1_SPECIAL:
            continue
        if fd.name not in fields:  # the schema keeps every V1 field in LayerParameter
            raise ConfigError(f"V1 field '{fd.name}' has no current equivalent", file=source,
                              layer=name)
        _copy_field(out, fd.name, fd, value)
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
        v1_layers = _upgrade_v0_layers(param, source)
        applied.append("V0 layers")
    elif param.layers:
        applied.append("V1 layers")
    out = pb.NetParameter()
    for fd, value in param.ListFields():
        if fd.name not in ("layer", "layers", "input", "input_shape", "input_dim"):
            _copy_field(out, fd.name, fd, value)
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
