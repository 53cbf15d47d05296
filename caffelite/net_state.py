"""Preparing a NetParameter for a phase: NetState rules, then Caffe's automatic Split layers.

A layer is kept when its include rules (any of them) or else its exclude rules
(none of them) match the NetState; a top consumed by several layers then gets
a Split layer, named as Caffe names it, so each consumer has its own diff.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

from .errors import ConfigError
from .layers.base import TEST
from .proto import pb


# ---- NetState filtering ------------------------------------------------------
def make_state(phase: int = TEST, level: int = 0, stages: Iterable[str] = (), *merge) -> "pb.NetState":
    """A NetState with ``phase``, ``level`` and ``stages``, then each of ``merge`` merged in."""
    state = pb.NetState(phase=phase, level=level, stage=[s for s in stages if s])
    for extra in merge:
        if extra is not None:
            state.MergeFrom(extra)
    return state


def state_meets_rule(state, rule) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    return not any(s in stages for s in rule.not_stage)


def filter_net(param, state):
    """A copy of ``param`` holding only the layers the state includes."""
    out = pb.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    for layer in param.layer:
        if layer.include and layer.exclude:
            raise ConfigError("has both include and exclude rules", layer=layer.name,
                              hint="use either include or exclude, not both")
        if layer.include:
            keep = any(state_meets_rule(state, r) for r in layer.include)
        else:
            keep = not any(state_meets_rule(state, r) for r in layer.exclude)
        if keep:
            out.layer.add().CopyFrom(layer)
    return out


# ---- automatic Split layers --------------------------------------------------
def split_layer_name(layer: str, blob: str, top_index: int) -> str:
    return f"{blob}_{layer}_{top_index}_split"


def split_blob_name(layer: str, blob: str, top_index: int, k: int) -> str:
    return f"{blob}_{layer}_{top_index}_split_{k}"


def insert_splits(param):
    """Caffe's InsertSplits: a Split layer after every top consumed more than once.

    An explicit nonzero loss_weight counts as one consumer; the weight moves to
    split top 0.
    """
    last_top: dict[str, tuple[int, int]] = {}
    source_of: dict[tuple[int, int], tuple[int, int]] = {}
    consumers: Counter = Counter()
    loss_weight: dict[tuple[int, int], float] = {}
    for i, layer in enumerate(param.layer):
        for j, blob in enumerate(layer.bottom):
            if blob not in last_top:
                later = [l.name for l in param.layer[i:] if blob in l.top]
                if later:
                    raise ConfigError(f"bottom '{blob}' is produced only by the later layer '{later[0]}'",
                                      layer=layer.name,
                                      hint="layers run in file order and read only tops of layers above "
                                           "them (a net has no cycles): move this layer below it")
                raise ConfigError(f"bottom '{blob}' is not produced by any earlier layer",
                                  layer=layer.name,
                                  hint="check the spelling and the include/exclude "
                                       "rules of the layer that should produce it")
            source_of[(i, j)] = last_top[blob]
            consumers[last_top[blob]] += 1
        for j, blob in enumerate(layer.top):
            last_top[blob] = (i, j)
        for j in range(min(len(layer.loss_weight), len(layer.top))):
            key = last_top[layer.top[j]]
            loss_weight[key] = layer.loss_weight[j]
            if loss_weight[key]:
                consumers[key] += 1

    if all(n <= 1 for n in consumers.values()):
        return param
    out = pb.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    next_split: Counter = Counter()
    for i, layer in enumerate(param.layer):
        copy = out.layer.add()
        copy.CopyFrom(layer)
        for j, blob in enumerate(layer.bottom):
            src = source_of[(i, j)]
            if consumers[src] > 1:
                src_layer = param.layer[src[0]]
                copy.bottom[j] = split_blob_name(src_layer.name, blob, src[1], next_split[src])
                next_split[src] += 1
        for j, blob in enumerate(layer.top):
            n = consumers[(i, j)]
            if n <= 1:
                continue
            weight = loss_weight.get((i, j), 0.0)
            split = out.layer.add(name=split_layer_name(layer.name, blob, j), type="Split")
            split.bottom.append(blob)
            split.top.extend(split_blob_name(layer.name, blob, j, k) for k in range(n))
            if weight:
                split.loss_weight.extend([weight] + [0.0] * (n - 1))
                copy.ClearField("loss_weight")
                next_split[(i, j)] += 1
    return out
