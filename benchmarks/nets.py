"""The benchmark nets, each defined twice: as a caffelite net (with an Input
layer, so no data files are needed) and as the same PyTorch model.

Both frameworks get identical starting weights (drawn here with NumPy from
Caffe's fillers) and identical inputs, so they compute the same numbers: the
runner checks that the first losses agree. FLOPs are counted for the
convolution and inner-product layers (2 per multiply-add; backward = 2x
forward: the data and weight gradients), the other layers are ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Conv:
    name: str
    out: int
    kernel: int
    stride: int = 1
    pad: int = 0
    group: int = 1
    std: float = 0.01
    bias: float = 0.0


@dataclass
class Pool:
    name: str
    method: str  # MAX or AVE
    kernel: int
    stride: int


@dataclass
class IP:
    name: str
    out: int
    std: float = 0.01
    bias: float = 0.0


@dataclass
class ReLU:
    name: str


@dataclass
class LRN:
    name: str
    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75


@dataclass
class Dropout:
    name: str
    ratio: float = 0.5


@dataclass
class Spec:
    """A chain of layers from an Input (N, C, H, W) to a SoftmaxWithLoss over ``classes``."""

    name: str
    batch: int
    input_shape: tuple  # (C, H, W)
    layers: list = field(default_factory=list)
    classes: int = 10


CIFAR10_QUICK = Spec("CIFAR10_quick", 100, (3, 32, 32), [
    Conv("conv1", 32, 5, pad=2, std=0.0001), Pool("pool1", "MAX", 3, 2), ReLU("relu1"),
    Conv("conv2", 32, 5, pad=2), ReLU("relu2"), Pool("pool2", "AVE", 3, 2),
    Conv("conv3", 64, 5, pad=2), ReLU("relu3"), Pool("pool3", "AVE", 3, 2),
    IP("ip1", 64, std=0.1), IP("ip2", 10, std=0.1)])

ALEXNET = Spec("AlexNet", 10, (3, 227, 227), [
    Conv("conv1", 96, 11, stride=4), ReLU("relu1"), LRN("norm1"), Pool("pool1", "MAX", 3, 2),
    Conv("conv2", 256, 5, pad=2, group=2, bias=0.1), ReLU("relu2"), LRN("norm2"),
    Pool("pool2", "MAX", 3, 2),
    Conv("conv3", 384, 3, pad=1), ReLU("relu3"),
    Conv("conv4", 384, 3, pad=1, group=2, bias=0.1), ReLU("relu4"),
    Conv("conv5", 256, 3, pad=1, group=2, bias=0.1), ReLU("relu5"), Pool("pool5", "MAX", 3, 2),
    IP("fc6", 4096, std=0.005, bias=0.1), ReLU("relu6"), Dropout("drop6"),
    IP("fc7", 4096, std=0.005, bias=0.1), ReLU("relu7"), Dropout("drop7"),
    IP("fc8", 1000)], classes=1000)

SPECS = {"cifar10_quick": CIFAR10_QUICK, "alexnet": ALEXNET}


# ---- shapes, parameters and FLOPs -------------------------------------------------------------
def _pooled(size: int, kernel: int, stride: int) -> int:
    return -(-(size - kernel) // stride) + 1  # Caffe's CEIL rounding (no pad here)


def walk(spec: Spec):
    """(layer, input shape (C, H, W) or (K,), output shape) for every layer."""
    shape = spec.input_shape
    for layer in spec.layers:
        if isinstance(layer, Conv):
            c, h, w = shape
            o = lambda s: (s + 2 * layer.pad - layer.kernel) // layer.stride + 1  # noqa: E731
            out = (layer.out, o(h), o(w))
        elif isinstance(layer, Pool):
            c, h, w = shape
            out = (c, _pooled(h, layer.kernel, layer.stride), _pooled(w, layer.kernel, layer.stride))
        elif isinstance(layer, IP):
            out = (layer.out,)
        else:
            out = shape
        yield layer, shape, out
        shape = out


def param_shapes(spec: Spec) -> list[tuple[str, tuple, float, float]]:
    """(layer name, weight shape, weight std, bias value) of every Conv / IP, in order."""
    out = []
    for layer, shape_in, _ in walk(spec):
        if isinstance(layer, Conv):
            out.append((layer.name, (layer.out, shape_in[0] // layer.group, layer.kernel, layer.kernel),
                        layer.std, layer.bias))
        elif isinstance(layer, IP):
            out.append((layer.name, (layer.out, math.prod(shape_in)), layer.std, layer.bias))
    return out


def initial_weights(spec: Spec, seed: int = 1701) -> list[tuple[np.ndarray, np.ndarray]]:
    """Caffe's gaussian weight and constant bias fillers, drawn once for both frameworks."""
    rng = np.random.default_rng(seed)
    return [((rng.standard_normal(shape) * std).astype(np.float32),
             np.full(shape[0], bias, np.float32)) for _, shape, std, bias in param_shapes(spec)]


def inputs(spec: Spec, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((spec.batch,) + spec.input_shape).astype(np.float32)
    labels = rng.integers(0, spec.classes, spec.batch)
    return data, labels


def forward_flops(spec: Spec) -> float:
    """Multiply-adds x 2 of the convolutions and inner products, per batch."""
    total = 0
    for layer, shape_in, shape_out in walk(spec):
        if isinstance(layer, Conv):
            total += 2 * math.prod(shape_out) * (shape_in[0] // layer.group) * layer.kernel ** 2
        elif isinstance(layer, IP):
            total += 2 * math.prod(shape_in) * layer.out
    return float(total * spec.batch)


def train_flops(spec: Spec) -> float:
    """Forward + backward (data and weight gradients) = 3x forward."""
    return 3 * forward_flops(spec)


# ---- caffelite -------------------------------------------------------------------------------
def caffelite_yaml(spec: Spec) -> str:
    c, h, w = spec.input_shape
    lines = [f"name: {spec.name}", "layer:",
             f"  - {{name: input, type: Input, top: [data, label], input_param: {{shape: "
             f"[{{dim: [{spec.batch}, {c}, {h}, {w}]}}, {{dim: [{spec.batch}]}}]}}}}"]
    bottom = "data"
    for layer in spec.layers:
        n = layer.name
        if isinstance(layer, Conv):
            lines.append(f"  - {{name: {n}, type: Convolution, bottom: {bottom}, top: {n}, convolution_param: "
                         f"{{num_output: {layer.out}, kernel_size: {layer.kernel}, stride: {layer.stride}, "
                         f"pad: {layer.pad}, group: {layer.group}}}}}")
            bottom = n
        elif isinstance(layer, Pool):
            lines.append(f"  - {{name: {n}, type: Pooling, bottom: {bottom}, top: {n}, pooling_param: "
                         f"{{pool: {layer.method}, kernel_size: {layer.kernel}, stride: {layer.stride}}}}}")
            bottom = n
        elif isinstance(layer, IP):
            lines.append(f"  - {{name: {n}, type: InnerProduct, bottom: {bottom}, top: {n}, "
                         f"inner_product_param: {{num_output: {layer.out}}}}}")
            bottom = n
        elif isinstance(layer, ReLU):
            lines.append(f"  - {{name: {n}, type: ReLU, bottom: {bottom}, top: {bottom}}}")
        elif isinstance(layer, LRN):
            lines.append(f"  - {{name: {n}, type: LRN, bottom: {bottom}, top: {n}, lrn_param: "
                         f"{{local_size: {layer.size}, alpha: {layer.alpha}, beta: {layer.beta}}}}}")
            bottom = n
        elif isinstance(layer, Dropout):
            lines.append(f"  - {{name: {n}, type: Dropout, bottom: {bottom}, top: {bottom}, "
                         f"dropout_param: {{dropout_ratio: {layer.ratio}}}}}")
    lines.append(f"  - {{name: loss, type: SoftmaxWithLoss, bottom: [{bottom}, label], top: loss}}")
    return "\n".join(lines) + "\n"


def caffelite_net(spec: Spec):
    """A TRAIN-phase caffelite Net with the shared weights and inputs in place."""
    from caffelite.config import parse_net
    from caffelite.layers.base import TRAIN
    from caffelite.net import Net

    net = Net(parse_net(caffelite_yaml(spec)), phase=TRAIN, seed=1701)
    for (name, *_), (w, b) in zip(param_shapes(spec), initial_weights(spec)):
        layer = net.layer_by_name[name]
        layer.blobs[0].set_data(w.reshape(layer.blobs[0].shape))
        layer.blobs[1].set_data(b)
    data, labels = inputs(spec)
    net.blobs["data"].set_data(data)
    net.blobs["label"].set_data(labels.astype(np.float32))
    return net


# ---- PyTorch ---------------------------------------------------------------------------------
def torch_model(spec: Spec):
    """The same chain as an nn.Sequential (CEIL pooling: ceil_mode=True), same weights."""
    import torch
    from torch import nn

    modules = []
    for layer, shape_in, _ in walk(spec):
        if isinstance(layer, Conv):
            modules.append(nn.Conv2d(shape_in[0], layer.out, layer.kernel, layer.stride, layer.pad,
                                     groups=layer.group))
        elif isinstance(layer, Pool):
            cls = nn.MaxPool2d if layer.method == "MAX" else nn.AvgPool2d
            modules.append(cls(layer.kernel, layer.stride, ceil_mode=True))
        elif isinstance(layer, IP):
            if len(shape_in) > 1:
                modules.append(nn.Flatten())
            modules.append(nn.Linear(math.prod(shape_in), layer.out))
        elif isinstance(layer, ReLU):
            modules.append(nn.ReLU(inplace=True))
        elif isinstance(layer, LRN):
            # Caffe's ACROSS_CHANNELS LRN: x / (k + alpha/n sum x^2)^beta, as PyTorch's.
            modules.append(nn.LocalResponseNorm(layer.size, layer.alpha, layer.beta, 1.0))
        elif isinstance(layer, Dropout):
            modules.append(nn.Dropout(layer.ratio))
    model = nn.Sequential(*modules)
    params = [m for m in modules if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for module, (w, b) in zip(params, initial_weights(spec)):
            module.weight.copy_(torch.from_numpy(w).reshape(module.weight.shape))
            module.bias.copy_(torch.from_numpy(b))
    model.train()
    data, labels = inputs(spec)
    return model, torch.from_numpy(data), torch.from_numpy(labels)
