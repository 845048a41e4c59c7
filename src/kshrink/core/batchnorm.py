"""BatchNorm folding and no-op removal: the inference form of a model, with fewer layers.

A BatchNormalization that directly follows a Conv/Dense/Depthwise/Separable/transposed layer
(with no activation in between, and nothing else reading that layer's output) computes, at
inference, `gamma * (z - mean) / sqrt(var + eps) + beta` of `z = x @ W + b`: the same affine map
can be written into W and b (for a SeparableConv, into its pointwise kernel; which kernel takes
it is the layer's `LayerSpec.fold_into`). The BN layer then disappears from the graph.
Dropout, Identity and linear Activation layers do nothing at inference and disappear too, as
does a ReLU applied to what is already a ReLU's output (e.g. after a residual block went).

The graph is rebuilt through public Keras API only (`core.graph.rewrite`), so it works on
every backend without tracing.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import keras
import numpy as np

from kshrink.core.graph import graph_calls, is_functional, is_plain, rewrite
from kshrink.layers.batchnorm import channel_axis, inference, is_batchnorm
from kshrink.layers.quantized import quantization
from kshrink.layers.specs import (
    is_identity,
    is_relu,
    outputs_relu,
    rewritable_spec,
    scale_output_channels,
    spec_for,
)


@dataclasses.dataclass
class FoldPlan:
    """What `fold` will do: BN layer name -> producer name, removals, and refusals."""

    folds: dict[str, str] = dataclasses.field(default_factory=dict)
    removed: list[str] = dataclasses.field(default_factory=list)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)


def plan_folds(model: keras.Model, batchnorm: bool = True, noops: bool = True) -> FoldPlan:
    """Which BN layers fold into which producer and which no-op layers go, for the top level
    of `model` (layers inside nested models are refused with the reason)."""
    plan = FoldPlan()
    if not (isinstance(model, keras.Sequential) or is_functional(model)):
        return plan
    if not is_plain(model):
        # A model subclass (a keras-hub Backbone) builds its graph in its constructor: a
        # rewritten graph would lose the class. Its BatchNorms stay.
        for layer in model.layers:
            if is_batchnorm(layer):
                plan.refused[layer.name] = (f"part of {type(model).__name__}, whose "
                                            "constructor builds its layers")
        return plan
    calls, _, outputs = graph_calls(model)
    producer = {id(t): layer for layer, _, outs in calls for t in outs}
    readers = Counter(id(t) for _, ins, _ in calls for t in ins)
    readers.update(id(t) for t in outputs)
    times_called = Counter(id(layer) for layer, _, _ in calls)
    for layer, ins, _ in calls:
        if isinstance(layer, keras.Model):
            for inner in layer.layers:
                if is_batchnorm(inner) or (noops and is_identity(inner)):
                    plan.refused[inner.name] = f"inside nested model {layer.name!r}"
            continue
        before = producer.get(id(ins[0])) if len(ins) == 1 else None
        repeated_relu = (is_relu(layer) and outputs_relu(before)
                         and times_called[id(layer)] == 1)
        if noops and (is_identity(layer) or repeated_relu):
            plan.removed.append(layer.name)
        elif batchnorm and is_batchnorm(layer):
            reason = _refusal(layer, before, ins[0], readers[id(ins[0])])
            if times_called[id(layer)] > 1 or (before and times_called[id(before)] > 1):
                reason = "a layer called more than once (shared) is not folded"
            if reason:
                plan.refused[layer.name] = reason
            else:
                plan.folds[layer.name] = before.name
    return plan


def _refusal(bn, producer, tensor, readers: int) -> str | None:
    """Why `bn` cannot fold into `producer`, whose output `tensor` has `readers` readers."""
    if producer is None:
        return "no single layer with weights directly before it"
    spec = rewritable_spec(producer)
    if spec is None:
        return (f"follows the custom layer {producer.name!r} (register a LayerSpec for its "
                "class, with fold_into, to fold into it)")
    if spec.fold_into is None or quantization(producer):
        kind = type(producer).__name__
        return f"follows {kind} {producer.name!r}, which kshrink cannot fold into"
    if producer.get_config().get("activation") not in ("linear", None):
        return f"{producer.name!r} applies an activation before it"
    axis = channel_axis(bn)
    rank = len(tensor.shape)
    if axis is None or axis % rank != rank - 1:
        return "normalizes over an axis other than the last (channels_last) one"
    if getattr(producer, "data_format", "channels_last") != "channels_last":
        return "channels_first layouts are not folded"
    if readers != 1:
        return f"{producer.name!r}'s output is also read elsewhere"
    if "use_bias" not in producer.get_config() and not any(
            v.name == spec.bias for v in producer.weights):
        return f"{producer.name!r} has no {spec.bias!r} weight to take the shift"
    return None


def folded_weights(producer, bn) -> dict[str, np.ndarray]:
    """The producer's weights by name, with `bn`'s inference transform written into the
    kernel its spec names (`fold_into`) and into the bias."""
    numpy = keras.ops.convert_to_numpy
    affine = inference(bn)
    scale = affine.scale
    weights = {v.name: numpy(v.value) for v in producer.weights}
    name = spec_for(producer).fold_into
    kernel = weights[name].astype("float64")
    weights[name] = scale_output_channels(kernel, scale, spec_for(producer).weight(name)
                                          .output_axes).astype("float32")
    bias_name = spec_for(producer).bias
    bias = weights.get(bias_name, np.zeros(scale.shape)).astype("float64")
    weights[bias_name] = np.broadcast_to((bias - affine.mean) * scale + affine.beta,
                                         scale.shape).astype("float32")
    return weights


def fold(model: keras.Model, plan: FoldPlan) -> keras.Model:
    """A new model with `plan` carried out; weights of untouched layers are shared."""
    bn_by_producer = {producer: bn for bn, producer in plan.folds.items()}
    layers = {layer.name: layer for layer in model.layers}
    removed = set(plan.folds) | set(plan.removed)

    def replace(layer):
        if layer.name in removed:
            return []
        if layer.name not in bn_by_producer:
            return layer
        weights = folded_weights(layer, layers[bn_by_producer[layer.name]])
        config = layer.get_config()
        new = type(layer).from_config({**config, "use_bias": True} if "use_bias" in config
                                      else config)
        new.build_from_config(layer.get_build_config())
        for variable in new.weights:
            variable.assign(weights[variable.name])
        return new

    return rewrite(model, replace)
