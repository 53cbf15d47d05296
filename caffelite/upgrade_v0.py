"""V0 Caffe nets -> V1, the first step of ``caffelite.upgrade`` (Caffe's UpgradeV0Net).

A V0 net wraps one flat V0LayerParameter per layer in a V1 ``layers`` entry::

    layers { layer { name: "conv1" type: "conv" num_output: 96 kernelsize: 11 }
             bottom: "data" top: "conv1" }

Separate ``padding`` layers are folded into the conv or pool layer they feed; every other
field goes to the V1 sub-message the tables below name (data transformation fields to
``transform_param``).
"""
from __future__ import annotations

import logging

from .errors import ConfigError
from .proto import pb

log = logging.getLogger("caffelite")

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


# ---- helpers ------------------------------------------------------------------
def copy_field(dst, name, fd, value) -> None:
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


def mixed_formats_error(source, layer: str | None) -> ConfigError:
    """V0 and V1 layers in one net (V1 -> current meets it too)."""
    return ConfigError("the net mixes V0 layers (layers { layer { ... } }) with V1 layers",
                       file=source, layer=layer or None, hint="write every layer in one format")


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
            copy_field(out, field, fd, value)
        elif field in _V0_TRANSFORM:
            setattr(out.transform_param, _V0_TRANSFORM[field], value)
        elif kind in _V0_FIELDS.get(field, {}):
            _assign(out, _V0_FIELDS[field][kind], value)
        else:
            # Caffe logs this and goes on without the field; so do we.
            log.warning("%slayer '%s': V0 field '%s' does not apply to type '%s'; ignored",
                        f"{source}: " if source else "", v0.name, field, kind)
    return out


def upgrade_v0_layers(param, source):
    """The V1 layers of V0 net ``param``: padding layers folded, fields moved to their sub-messages."""
    for conn in param.layers:
        if not conn.HasField("layer"):
            raise mixed_formats_error(source, conn.name)
    return [_v0_to_v1(conn, source) for conn in _fold_v0_padding(param, source)]
