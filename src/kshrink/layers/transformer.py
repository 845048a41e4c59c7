"""Facts about keras-hub's transformer blocks: which layer is one, and the stock Keras layers
it is made of (keras-hub 0.32)."""

from __future__ import annotations

import keras
import numpy as np

ENCODER_PARTS = ("_self_attention_layer", "_self_attention_layer_norm",
                 "_self_attention_dropout", "_feedforward_layer_norm",
                 "_feedforward_intermediate_dense", "_feedforward_output_dense",
                 "_feedforward_dropout")
FEEDFORWARD = ("_feedforward_intermediate_dense", "_feedforward_output_dense")
PROJECTIONS = ("query_dense", "key_dense", "value_dense", "output_dense")  # of the attention


def is_encoder(layer) -> bool:
    """True for keras-hub's `TransformerEncoder` (its class, not a subclass, whose layout may
    differ)."""
    return type(layer).__name__ == "TransformerEncoder" and type(layer).__module__.startswith(
        "keras_hub.")


def with_heads(attention, heads: list, name: str | None = None):
    """A new, unbuilt `MultiHeadAttention` like `attention` with `len(heads)` heads (and
    `name`, if given); `copy_heads` fills it once it is built."""
    config = attention.get_config()
    config["num_heads"] = len(heads)
    if name is not None:
        config["name"] = name
    return type(attention).from_config(config)


def copy_heads(old, new, heads: list) -> None:
    """Copies the weights of `heads` (sorted indices) of attention `old` into `new`."""
    for name in PROJECTIONS:
        values = []
        for variable in getattr(old, name).weights:
            value = keras.ops.convert_to_numpy(variable.value)
            if name != "output_dense":  # kernel (hidden, heads, dim), bias (heads, dim)
                value = np.take(value, heads, axis=value.ndim - 2)
            elif variable.name == "kernel":  # (heads, dim, hidden); its bias stays
                value = value[heads]
            values.append(value)
        getattr(new, name).set_weights(values)


def stock_parts(block, heads: list | None = None, units: list | None = None) -> dict:
    """New stock layers for each part of encoder `block` (all its heads and feed-forward
    units, or only `heads` and `units`), named `<block>_<part>` but for the last, which takes
    the block's own name: the block's output keeps its name, which is what feature
    distillation matches teacher and student blocks by. Call `encoder_call` with them, then
    `copy_parts`."""
    attention = block._self_attention_layer
    heads = list(range(attention.num_heads)) if heads is None else heads
    last = "feedforward_add" if block.normalize_first else "_feedforward_layer_norm"
    parts = {"_self_attention_layer": with_heads(attention, heads,
                                                 f"{block.name}_{attention.name}")}
    for attr in ENCODER_PARTS[1:]:
        part = getattr(block, attr)
        config = part.get_config()
        config["name"] = block.name if attr == last else f"{block.name}_{part.name}"
        if attr == "_feedforward_intermediate_dense" and units is not None:
            config["units"] = len(units)
        parts[attr] = type(part).from_config(config)
    for stage in ("self_attention", "feedforward"):
        name = block.name if f"{stage}_add" == last else f"{block.name}_{stage}_add"
        parts[f"{stage}_add"] = keras.layers.Add(name=name, dtype=block.dtype_policy)
    parts["mask"] = keras.layers.Reshape((1, -1), name=f"{block.name}_attention_mask")
    return parts


def encoder_call(block, parts: dict, inputs, padding_mask=None, **_):
    """What `TransformerEncoder.call` computes (keras-hub 0.32), with the stock `parts` (a
    feed-forward part may be a list of layers, applied in a chain)."""
    first = block.normalize_first
    mask = None if padding_mask is None else parts["mask"](padding_mask)
    x = parts["_self_attention_layer_norm"](inputs) if first else inputs
    x = parts["_self_attention_layer"](query=x, value=x, attention_mask=mask)
    x = parts["self_attention_add"]([parts["_self_attention_dropout"](x), inputs])
    if not first:
        x = parts["_self_attention_layer_norm"](x)
    residual = x
    if first:
        x = parts["_feedforward_layer_norm"](x)
    for part in FEEDFORWARD:
        for layer in parts[part] if isinstance(parts[part], list) else [parts[part]]:
            x = layer(x)  # a list: a layer factorized into a chain
    x = parts["feedforward_add"]([parts["_feedforward_dropout"](x), residual])
    if not first:
        x = parts["_feedforward_layer_norm"](x)
    return x


def copy_parts(block, parts: dict, heads: list | None = None,
               units: list | None = None) -> None:
    """Copies `block`'s weights (of `heads` and `units` only, if given) into its built stock
    `parts`."""
    attention = block._self_attention_layer
    copy_heads(attention, parts["_self_attention_layer"],
               list(range(attention.num_heads)) if heads is None else heads)
    numpy = keras.ops.convert_to_numpy
    inner, outer = block._feedforward_intermediate_dense, block._feedforward_output_dense
    units = list(range(inner.units)) if units is None else units
    kernel = numpy(inner.kernel)[:, units]
    parts["_feedforward_intermediate_dense"].set_weights(
        [kernel, numpy(inner.bias)[units]] if inner.use_bias else [kernel])
    parts["_feedforward_output_dense"].set_weights(
        [numpy(outer.kernel)[units]] + ([numpy(outer.bias)] if outer.use_bias else []))
    for attr in ("_self_attention_layer_norm", "_feedforward_layer_norm"):
        parts[attr].set_weights(getattr(block, attr).get_weights())
