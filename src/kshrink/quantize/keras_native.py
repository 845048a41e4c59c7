"""The adapter to Keras' own quantization: int8/int4 Dense, EinsumDense and Embedding.

Keras quantizes these layers in place (`model.quantize`), stores the integer weights in the
`.keras` file and keeps them as integers in memory; kshrink only chooses the layers.
"""

from __future__ import annotations

import warnings

import keras


def keras_quantize(model: keras.Model, layers, mode: str, group_size: int | None,
                   activation_bits: int | None) -> None:
    """Quantizes `layers` of `model` in place with `model.quantize`.

    With `activation_bits`, Keras also quantizes each input to int8 on the fly (one scale per
    row, from its absolute maximum), so the matrix product itself runs on integers.
    """
    if not layers:
        return
    activations = keras.quantizers.AbsMaxQuantizer() if activation_bits else None
    if mode == "int8":
        config = keras.quantizers.Int8QuantizationConfig(activation_quantizer=activations)
    else:
        config = keras.quantizers.Int4QuantizationConfig(
            activation_quantizer=activations, block_size=group_size)
    ids = {id(layer) for layer in layers}
    with warnings.catch_warnings():
        # Keras warns for every layer without a `quantize` method; the filter skips those.
        warnings.simplefilter("ignore", UserWarning)
        model.quantize(config=config, filters=lambda layer: id(layer) in ids)
