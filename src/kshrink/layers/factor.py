"""The two thinner layers a layer factorizes into (low-rank factorization): a Dense becomes
Dense(rank, no bias) then Dense(units); a k x k Conv2D becomes a k x k convolution to `rank`
channels then a 1x1 convolution to its filters. The second keeps the layer's name, bias
and activation; the first is named `<name>_lowrank`."""

from __future__ import annotations

import keras
import numpy as np


def refusal(layer) -> str | None:
    """None if `layer` can be factorized, else the reason it cannot."""
    kind = type(layer)
    if kind is keras.layers.Dense:
        return None
    if kind is keras.layers.Conv2D:
        config = layer.get_config()
        if config["groups"] != 1:
            return "grouped convolutions are not factorized"
        if config["data_format"] != "channels_last":
            return "channels_first convolutions are not factorized"
        return None
    return f"{kind.__name__}: only Dense and Conv2D are factorized"


def pair(layer, first_kernel: np.ndarray, second_kernel: np.ndarray) -> list:
    """The two built layers that replace `layer`, from the matrix views of their kernels:
    `first_kernel` (the layer's kernel rows x rank) and `second_kernel` (rank x outputs)."""
    config = layer.get_config()
    rank = first_kernel.shape[1]
    input_shape = layer.get_build_config()["input_shape"]
    if isinstance(layer, keras.layers.Dense):
        first = keras.layers.Dense(rank, use_bias=False, name=f"{layer.name}_lowrank",
                                   dtype=config["dtype"])
        second = keras.layers.Dense.from_config(config)
        second_kernel = second_kernel.reshape(rank, -1)
    else:
        kh, kw, inputs, filters = layer.kernel.shape
        first = keras.layers.Conv2D(
            rank, config["kernel_size"], strides=config["strides"], padding=config["padding"],
            dilation_rate=config["dilation_rate"], use_bias=False,
            name=f"{layer.name}_lowrank", dtype=config["dtype"])
        first_kernel = first_kernel.reshape(kh, kw, inputs, rank)
        second = keras.layers.Conv2D.from_config(
            {**config, "kernel_size": (1, 1), "strides": (1, 1), "padding": "valid",
             "dilation_rate": (1, 1)})
        second_kernel = second_kernel.reshape(1, 1, rank, filters)
    first.build(input_shape)
    first.kernel.assign(first_kernel)
    second.build(first.compute_output_shape(input_shape))
    second.kernel.assign(second_kernel)
    if layer.use_bias:
        second.bias.assign(keras.ops.convert_to_numpy(layer.bias))
    return [first, second]
