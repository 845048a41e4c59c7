"""Multiply-accumulates per example, per layer: the work a forward pass does.

Counted from each layer's config and the input shape it was built for (so quantized layers
count like their float form), by the formula of its `LayerSpec` (`kshrink.layers`): Dense,
EinsumDense, Conv1D/2D/3D (grouped too), Depthwise, Separable and transposed convolutions.
Other layers (pooling, normalization, activations, adds) do work too, but little next to
these, and are not counted.
"""

from __future__ import annotations

import dataclasses

import keras

from kshrink.core.graph import leaf_layers, path_of
from kshrink.layers.specs import layer_macs
from kshrink.render import Table


@dataclasses.dataclass(frozen=True)
class MacStats:
    """MACs per example: `layers` maps layer name -> (class name, MACs); `unknown` names the
    layers whose count depends on a length only known at run time (not counted)."""

    layers: dict[str, tuple[str, int]]
    unknown: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(count for _, count in self.layers.values())

    def table(self) -> Table:
        rows = [(name, kind, f"{count:,}") for name, (kind, count) in self.layers.items()]
        rows.append(("total", "", f"{self.total:,}"))
        return Table("multiply-accumulates per example", ("layer", "type", "MACs"), rows)


def macs(model: keras.Model, sequence_length: int | None = None) -> MacStats:
    """Counts the MACs of one example through `model` (nested models included).

    Args:
        model: the model.
        sequence_length: the length to count for a dimension only known at run time (a
            transformer's sequence); without it, layers with such inputs are not counted.
    """
    counted, unknown = {}, []
    for layer in leaf_layers(model):
        count = layer_macs(layer, sequence_length)
        if count is not None:
            counted[path_of(layer)] = (type(layer).__name__, count)
        elif sequence_length is None and layer_macs(layer, 1) is not None:
            unknown.append(path_of(layer))
    return MacStats(counted, tuple(unknown))
