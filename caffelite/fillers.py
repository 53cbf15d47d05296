"""Weight fillers (Caffe's FillerParameter ``type``), drawn on the CPU in float64.

fan_in = count / shape[0], fan_out = count / shape[1]; ``variance_norm``
picks fan_in (FAN_IN, default), fan_out (FAN_OUT) or their mean (AVERAGE).
"""
from __future__ import annotations

import math

import numpy as np

from .blob import Blob
from .errors import ConfigError
from .registry import FILLERS, register_filler

FAN_IN, FAN_OUT, AVERAGE = 0, 1, 2  # FillerParameter.VarianceNorm


def fill(blob: Blob, filler_param, rng: np.random.Generator) -> None:
    """Fill ``blob.data`` as ``filler_param`` says."""
    draw = FILLERS.get(filler_param.type)
    values = draw(filler_param, blob.shape, rng)
    blob.set_data(np.asarray(values, dtype=blob.dtype).reshape(blob.shape))


def _fans(shape: tuple) -> tuple[float, float]:
    count = int(np.prod(shape))
    if not shape or shape[0] == 0:
        raise ConfigError(f"cannot compute fan-in of a blob shaped {shape}")
    fan_in = count / shape[0]
    fan_out = count / shape[1] if len(shape) > 1 else count
    return fan_in, fan_out


def _scale_n(param, shape: tuple) -> float:
    fan_in, fan_out = _fans(shape)
    return {FAN_IN: fan_in, FAN_OUT: fan_out, AVERAGE: (fan_in + fan_out) / 2}[param.variance_norm]


@register_filler("constant")
def constant(param, shape, rng):
    return np.broadcast_to(np.float32(param.value), shape)


@register_filler("uniform")
def uniform(param, shape, rng):
    return rng.uniform(param.min, param.max, size=shape)


@register_filler("gaussian")
def gaussian(param, shape, rng):
    values = rng.normal(param.mean, param.std, size=shape)
    if param.sparse >= 0:
        # Each output keeps on average ``sparse`` nonzero inputs.
        if len(shape) < 2:
            raise ConfigError("the sparse gaussian filler needs a blob with at least 2 axes")
        keep_prob = param.sparse / shape[0]
        values *= rng.random(size=shape) < keep_prob
    return values


@register_filler("positive_unitball")
def positive_unitball(param, shape, rng):
    values = rng.random(size=shape)
    rows = values.reshape(shape[0], -1)
    rows /= rows.sum(axis=1, keepdims=True)
    return values


@register_filler("xavier")
def xavier(param, shape, rng):
    scale = math.sqrt(3.0 / _scale_n(param, shape))
    return rng.uniform(-scale, scale, size=shape)


@register_filler("msra")
def msra(param, shape, rng):
    return rng.normal(0.0, math.sqrt(2.0 / _scale_n(param, shape)), size=shape)


@register_filler("bilinear")
def bilinear(param, shape, rng):
    """Bilinear upsampling kernels for a Deconvolution weight (N, C, K, K)."""
    if len(shape) != 4 or shape[2] != shape[3]:
        raise ConfigError(f"the bilinear filler needs a 4-D blob with square kernels, got {shape}")
    k = shape[3]
    f = math.ceil(k / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    ramp = 1 - np.abs(np.arange(k) / f - c)
    return np.broadcast_to(np.outer(ramp, ramp), shape).copy()
