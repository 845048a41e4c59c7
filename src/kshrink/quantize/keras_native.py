"""Weight-only int8/int4 quantization of Dense, EinsumDense and Embedding through Keras.

Keras quantizes these layers in place (`model.quantize`), stores the integer weights in the
`.keras` file and keeps them as integers in memory. kshrink chooses the layers, delegates the
work, and reports every layer it could not quantize and why.
"""

from __future__ import annotations

import dataclasses
import warnings

import keras

from kshrink.core.select import Select
from kshrink.core.technique import (
    Handler,
    StepContext,
    Technique,
    check_choice,
    check_int,
    option,
    register_technique,
)

KERAS_QUANTIZABLE = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding)
MODES = ("int8", "int4")


class KerasQuantizeHandler(Handler):
    def prepare(self, model, config: Quantize, ctx: StepContext):
        chosen = ctx.choose_layers(model, config.layers, config.exclude, _skip_reason)
        for layer in chosen:
            ctx.applied(layer, _describe(config))
        if chosen:
            ids = {id(layer) for layer in chosen}
            with warnings.catch_warnings():
                # Keras warns for every layer without a `quantize` method; we filtered those.
                warnings.simplefilter("ignore", UserWarning)
                model.quantize(config=_keras_config(config), filters=lambda l: id(l) in ids)
        return model


def _skip_reason(layer) -> str | None:
    mode = getattr(layer, "quantization_mode", None)
    if mode:
        return f"already quantized ({mode})"
    if isinstance(layer, KERAS_QUANTIZABLE):
        return None
    name = type(layer).__name__
    if "Conv" in name:
        return f"{name}: no int8/int4 kernel yet"
    if "Normalization" in name:
        return f"{name}: normalization layers stay in float"
    return f"{name}: no quantized version of this layer"


def _describe(config: Quantize) -> str:
    if config.mode == "int8":
        return "int8 weights, per-channel scales"
    if config.group_size is None:
        return "int4 weights, per-channel scales"
    return f"int4 weights, scales per group of {config.group_size}"


def _keras_config(config: Quantize):
    if config.mode == "int8":
        return keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    return keras.quantizers.Int4QuantizationConfig(
        activation_quantizer=None, block_size=config.group_size
    )


@register_technique("quantize", handler=KerasQuantizeHandler(), stage=90)
@dataclasses.dataclass(frozen=True)
class Quantize(Technique):
    """Weight-only post-training quantization to int8 or int4.

    Dense, EinsumDense and Embedding are quantized by Keras itself (`model.quantize`): the
    weights become integers with float scales, in the file and in memory. Every other layer
    with weights is left in float and listed in the report with the reason.

    Args:
        mode: `"int8"` (one scale per output channel) or `"int4"`.
        group_size: int4 only: one scale per group of this many input elements (Keras'
            sub-channel quantization); `None` for one scale per output channel.
        layers: the layers to consider (default: all).
        exclude: layers to leave alone, e.g. a sensitive first or last layer.

    Example:

    ```python
    model, report = kshrink.compress(model, kshrink.Quantize(mode="int8"))
    ```
    """

    mode: str = option("int8", "int8 or int4 weights")
    group_size: int | None = option(
        128, "int4 only: input elements per scale group; null for per-channel scales")
    layers: Select | None = option(None, "layers to consider (default: all)")
    exclude: Select | None = option(None, "layers to leave in float")

    def __post_init__(self):
        check_choice(self.name, "mode", self.mode, MODES)
        check_int(self.name, "group_size", self.group_size, low=1, allow_none=True)
