"""Multiply-accumulates per example, per layer: the work a forward pass does.

Counted from each layer's config and the input shape it was built for (so quantized layers
count like their float form): Dense, EinsumDense, Conv1D/2D/3D (grouped too), Depthwise,
Separable and transposed convolutions. Other layers (pooling, normalization, activations,
adds) do work too, but little next to these, and are not counted.
"""

from __future__ import annotations

import dataclasses
import math

import keras

from kshrink.core.graph import leaf_layers
from kshrink.render import Table


@dataclasses.dataclass(frozen=True)
class MacStats:
    """MACs per example: `layers` maps layer name -> (class name, MACs)."""

    layers: dict[str, tuple[str, int]]

    @property
    def total(self) -> int:
        return sum(count for _, count in self.layers.values())

    def table(self) -> Table:
        rows = [(name, kind, f"{count:,}") for name, (kind, count) in self.layers.items()]
        rows.append(("total", "", f"{self.total:,}"))
        return Table("multiply-accumulates per example", ("layer", "type", "MACs"), rows)


def macs(model: keras.Model) -> MacStats:
    """Counts the MACs of one example through `model` (nested models included)."""
    counted = {}
    for layer in leaf_layers(model):
        count = layer_macs(layer)
        if count is not None:
            counted[layer.name] = (type(layer).__name__, count)
    return MacStats(counted)


def layer_macs(layer) -> int | None:
    """MACs of one example through `layer`, or None for a layer kind that is not counted."""
    build = layer.get_build_config() if layer.built else None
    if not build or "input_shape" not in build:
        return None
    input_shape = tuple(build["input_shape"])
    if not all(isinstance(d, int) for d in input_shape[1:]):
        return None  # a dimension only known at run time
    output_shape = tuple(layer.compute_output_shape(input_shape))
    config = layer.get_config()
    per_position = None
    if isinstance(layer, keras.layers.Dense):
        per_position = input_shape[-1] * config["units"]
        positions = math.prod(output_shape[1:-1])
    elif isinstance(layer, keras.layers.EinsumDense):
        return _einsum_macs(config["equation"], output_shape, layer)
    elif isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        channels = _channels(input_shape, config)
        per_position = channels * config["depth_multiplier"] * math.prod(config["kernel_size"])
        positions = _spatial(output_shape, config)
    elif isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        middle = _channels(input_shape, config) * config["depth_multiplier"]
        per_position = middle * (math.prod(config["kernel_size"]) + config["filters"])
        positions = _spatial(output_shape, config)
    elif isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                            keras.layers.Conv3DTranspose)):
        per_position = (_channels(input_shape, config) * config["filters"]
                        * math.prod(config["kernel_size"]))
        positions = _spatial(input_shape, config)
    elif isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)):
        groups = config.get("groups", 1)
        per_position = (_channels(input_shape, config) // groups * config["filters"]
                        * math.prod(config["kernel_size"]))
        positions = _spatial(output_shape, config)
    if per_position is None:
        return None
    return int(per_position * positions)


def _channels(shape, config) -> int:
    return shape[1] if config.get("data_format") == "channels_first" else shape[-1]


def _spatial(shape, config) -> int:
    if config.get("data_format") == "channels_first":
        return math.prod(shape[2:])
    return math.prod(shape[1:-1])


def _einsum_macs(equation: str, output_shape, layer) -> int:
    """Output elements times the kernel axes that are summed over (those not in the output)."""
    inputs, output = equation.split("->")
    kernel_axes = inputs.split(",")[1]
    shape = tuple(layer.kernel.shape)
    summed = math.prod(shape[i] for i, axis in enumerate(kernel_axes) if axis not in output)
    return int(math.prod(output_shape[1:]) * summed)
