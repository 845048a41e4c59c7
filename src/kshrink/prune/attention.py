"""Attention heads and feed-forward units of transformer blocks, removed whole.

Two kinds of block are understood:
- a stock `MultiHeadAttention` in the model's graph: rebuilt with fewer heads (its `key_dim`
  and output width are in its config, so nothing else changes);
- a keras-hub `TransformerEncoder`: its config cannot say "3 heads of 64" (it derives the
  head width from `hidden_dim // num_heads`), so a block that loses heads or feed-forward
  units is rebuilt as the stock Keras layers it is made of (MultiHeadAttention, Dropout, Add,
  LayerNormalization, two Dense), called where it stood. The file then needs only Keras (and
  keras-hub for the model's other layers) to load.
The hidden size stays: every residual Add and LayerNormalization of the stream reads it.

A head's importance is the norm of its value kernel times the norm of its rows of the output
kernel (zero for a head whose output rows are zero, so removing that one is exact); a
feed-forward unit's is the norm of its column of the first kernel times its row of the second.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from kshrink.core.graph import Inline, graph_program, rewrite
from kshrink.layers.transformer import ENCODER_PARTS, is_encoder

L = keras.layers
PROJECTIONS = ("query_dense", "key_dense", "value_dense", "output_dense")


@dataclasses.dataclass
class Cut:
    """What one block keeps: `heads` of its attention, `units` of its feed-forward network
    (None for a bare attention layer), as sorted indices."""

    layer: L.Layer
    attention: L.MultiHeadAttention
    heads: list
    units: list | None = None

    @property
    def feedforward(self) -> tuple[L.Dense, L.Dense] | None:
        if self.units is None:
            return None
        return self.layer._feedforward_intermediate_dense, self.layer._feedforward_output_dense


def blocks(model: keras.Model) -> tuple[list, dict]:
    """`(blocks, reasons)`: the top-level attention layers and keras-hub encoders whose heads
    (and units) can be removed, and for the others why not."""
    counts, reasons = {}, {}
    for call in graph_program(model)[0]:
        counts[id(call.layer)] = counts.get(id(call.layer), 0) + 1
        layer = call.layer
        if is_encoder(layer):
            extra = [k for k, v in call.kwargs.items()
                     if k != "padding_mask" and v not in (None, False)]
            if extra:
                reasons[id(layer)] = f"called with {extra[0]}, which the rebuild does not take"
            elif not all(hasattr(layer, part) for part in ENCODER_PARTS):
                reasons[id(layer)] = "its layers are not the ones of keras-hub 0.32"
    found, why = [], {}
    for layer in model.layers:
        if not (is_encoder(layer) or isinstance(layer, L.MultiHeadAttention)):
            continue
        reason = reasons.get(id(layer))
        if counts.get(id(layer), 0) != 1:
            reason = "called more than once (shared weights)"
        elif reason is None:
            attention = layer._self_attention_layer if is_encoder(layer) else layer
            if attention.quantization_mode is not None or layer.dtype_policy.quantization_mode:
                reason = "already quantized"
            elif len(attention._attention_axes) != 1:
                reason = "attends over more than one axis"
        if reason:
            why[id(layer)] = reason
        else:
            found.append(layer)
    return found, why


def _norms(values: np.ndarray, axes: tuple, order: int) -> np.ndarray:
    values = np.abs(values)
    return values.sum(axes) if order == 1 else np.sqrt((values ** 2).sum(axes))


def head_scores(attention: L.MultiHeadAttention, order: int = 2) -> np.ndarray:
    """Importance of each head: |value kernel of the head| x |its output kernel rows|."""
    numpy = keras.ops.convert_to_numpy
    value = numpy(attention.value_dense.kernel)  # (hidden, heads, value_dim)
    output = numpy(attention.output_dense.kernel)  # (heads, value_dim, hidden)
    return _norms(value, (0, 2), order) * _norms(output, (1, 2), order)


def unit_scores(inner: L.Dense, outer: L.Dense, order: int = 2) -> np.ndarray:
    """Importance of each feed-forward unit: |its column of `inner`| x |its row of `outer`|."""
    numpy = keras.ops.convert_to_numpy
    return _norms(numpy(inner.kernel), (0,), order) * _norms(numpy(outer.kernel), (1,), order)


def keep_best(scores: np.ndarray, keep: int) -> list:
    """The indices of the `keep` highest scores, in their order."""
    return sorted(np.argsort(-scores, kind="stable")[:keep].tolist())


def plan(layer, ratio: float, order: int, unit_count) -> Cut:
    """What `layer` keeps at `ratio`; `unit_count(width) -> kept units` rounds as the step
    asks for channels."""
    attention = layer._self_attention_layer if is_encoder(layer) else layer
    heads = attention.num_heads
    kept_heads = keep_best(head_scores(attention, order), max(1, math.ceil(heads * (1 - ratio))))
    if not is_encoder(layer):
        return Cut(layer, attention, kept_heads)
    inner, outer = layer._feedforward_intermediate_dense, layer._feedforward_output_dense
    units = unit_scores(inner, outer, order)
    return Cut(layer, attention, kept_heads, keep_best(units, unit_count(len(units))))


def cut(model: keras.Model, cuts: list[Cut]) -> keras.Model:
    """`model` with each cut applied, as a new plain functional model (a keras-hub Backbone
    comes back as a functional model of the same layers: its class has one head count for all
    blocks)."""
    cuts = [c for c in cuts if len(c.heads) < c.attention.num_heads
            or (c.units is not None and len(c.units) < c.feedforward[0].units)]
    if not cuts:
        return model
    plain = keras.Model(model.input, model.output, name=model.name)
    by_layer = {id(c.layer): c for c in cuts}
    built = {}

    def replace(layer):
        found = by_layer.get(id(layer))
        if found is None:
            return layer
        if is_encoder(layer):
            parts = _stock_parts(found)
            built[id(layer)] = parts
            return Inline(lambda *args, **kwargs: _encoder_call(found.layer, parts, *args,
                                                                **kwargs))
        attention = _fewer_heads(found)
        built[id(layer)] = {"_self_attention_layer": attention}
        return attention

    rebuilt = rewrite(plain, replace)
    for c in cuts:
        parts = built[id(c.layer)]
        _copy_attention(c, parts["_self_attention_layer"])
        if c.units is not None:
            _copy_feedforward(c, parts)
    return rebuilt


def _fewer_heads(c: Cut) -> L.MultiHeadAttention:
    config = c.attention.get_config()
    config["num_heads"] = len(c.heads)
    if c.layer is not c.attention:
        config["name"] = f"{c.layer.name}_{c.attention.name}"
    return type(c.attention).from_config(config)


def _stock_parts(c: Cut) -> dict:
    """New stock layers for each part of encoder `c.layer`, named `<block>_<part>`, but for
    the last, which takes the block's own name: the block's output keeps its name, which is
    what feature distillation matches teacher and student blocks by."""
    block = c.layer
    last = "feedforward_add" if block.normalize_first else "_feedforward_layer_norm"
    parts = {"_self_attention_layer": _fewer_heads(c)}
    for attr in ENCODER_PARTS[1:]:
        part = getattr(block, attr)
        config = part.get_config()
        config["name"] = block.name if attr == last else f"{block.name}_{part.name}"
        if attr == "_feedforward_intermediate_dense":
            config["units"] = len(c.units)
        parts[attr] = type(part).from_config(config)
    for stage in ("self_attention", "feedforward"):
        name = block.name if f"{stage}_add" == last else f"{block.name}_{stage}_add"
        parts[f"{stage}_add"] = L.Add(name=name, dtype=block.dtype_policy)
    parts["mask"] = L.Reshape((1, -1), name=f"{block.name}_attention_mask")
    return parts


def _encoder_call(block, parts, inputs, padding_mask=None, **_):
    """What `TransformerEncoder.call` computes (keras-hub 0.32), with the stock `parts`."""
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
    x = parts["_feedforward_output_dense"](parts["_feedforward_intermediate_dense"](x))
    x = parts["feedforward_add"]([parts["_feedforward_dropout"](x), residual])
    if not first:
        x = parts["_feedforward_layer_norm"](x)
    return x


def _copy_attention(c: Cut, new: L.MultiHeadAttention) -> None:
    numpy = keras.ops.convert_to_numpy
    old = c.attention
    for name in PROJECTIONS:
        values = []
        for variable in getattr(old, name).weights:
            value = numpy(variable.value)
            if name != "output_dense":  # kernel (hidden, heads, dim), bias (heads, dim)
                value = np.take(value, c.heads, axis=value.ndim - 2)
            elif variable.name == "kernel":  # (heads, dim, hidden); its bias stays
                value = value[c.heads]
            values.append(value)
        getattr(new, name).set_weights(values)


def _copy_feedforward(c: Cut, parts: dict) -> None:
    numpy = keras.ops.convert_to_numpy
    inner, outer = c.feedforward
    kernel = numpy(inner.kernel)[:, c.units]
    parts["_feedforward_intermediate_dense"].set_weights(
        [kernel, numpy(inner.bias)[c.units]] if inner.use_bias else [kernel])
    parts["_feedforward_output_dense"].set_weights(
        [numpy(outer.kernel)[c.units]] + ([numpy(outer.bias)] if outer.use_bias else []))
    block = c.layer
    for attr in ("_self_attention_layer_norm", "_feedforward_layer_norm"):
        parts[attr].set_weights(getattr(block, attr).get_weights())
