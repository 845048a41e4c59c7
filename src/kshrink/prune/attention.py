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

from kshrink.core.graph import encoder_reasons, graph_program, inline_encoders, rewrite
from kshrink.layers.transformer import (
    copy_heads,
    copy_parts,
    is_encoder,
    stock_parts,
    with_heads,
)

L = keras.layers


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
    reasons = encoder_reasons(model)
    calls = {}
    for call in graph_program(model)[0]:
        calls[id(call.layer)] = calls.get(id(call.layer), 0) + 1
    found, why = [], {}
    for layer in model.layers:
        if is_encoder(layer):
            reason = reasons.get(id(layer))
        elif isinstance(layer, L.MultiHeadAttention):
            reason = None
            if calls.get(id(layer), 0) != 1:
                reason = "called more than once (shared weights)"
            elif layer.quantization_mode is not None or layer.dtype_policy.quantization_mode:
                reason = "already quantized"
        else:
            continue
        attention = layer._self_attention_layer if is_encoder(layer) else layer
        if reason is None and len(attention._attention_axes) != 1:
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
    by_layer = {id(c.layer): c for c in cuts}
    built = {}

    def fewer_heads(layer):
        found = by_layer.get(id(layer))
        if found is None or is_encoder(layer):
            return layer
        built[id(layer)] = with_heads(layer, found.heads)
        return built[id(layer)]

    def parts_of(block):
        found = by_layer.get(id(block))
        if found is not None:
            built[id(block)] = stock_parts(block, found.heads, found.units)
        return built.get(id(block))

    rebuilt = inline_encoders(rewrite(model, fewer_heads), parts_of)
    for c in cuts:
        if is_encoder(c.layer):
            copy_parts(c.layer, built[id(c.layer)], c.heads, c.units)
        else:
            copy_heads(c.layer, built[id(c.layer)], c.heads)
    return rebuilt
