"""Quantization-aware training: layers train through the rounding they will get.

While the model fine-tunes, each chosen layer runs with its kernels fake-quantized to the
integer grid that `finalize` stores (per output channel, symmetric; straight-through
gradients), and, with `activation_bits`, its input fake-quantized per tensor and asymmetric
between two trainable bounds. The bounds start at the calibrated range and learn their
clipping as in PACT (Choi et al., 2018): the gradient of every clipped input flows into the
bound that clipped it (`keras.quantizers.fake_quant_with_min_max_vars`).
"""

from __future__ import annotations

import keras

from kshrink.core.kernels import kernel_weights
from kshrink.core.wrapping import SubstituteWrapper
from kshrink.quantize.layers import INTEGER_MODES, fake_quantize_kernel, kernel_layout


@keras.saving.register_keras_serializable(package="kshrink")
class QuantizeAwareWrapper(SubstituteWrapper):
    """Wraps a layer for quantization-aware training (see the module docstring).

    Args:
        layer: the float layer.
        mode: `"int8"` or `"int4"`: the grid of the kernels.
        group_size: int4 only: inputs per scale group.
        activation_bits: fake-quantize the input to this many bits (None: leave it float).
        input_range: `(low, high)` the input bounds start from.
    """

    def __init__(self, layer, mode="int8", group_size=None, activation_bits=None,
                 input_range=(0.0, 1.0), **kwargs):
        kwargs.setdefault("name", f"qat_{layer.name}")
        super().__init__(layer, **kwargs)
        self.mode = mode
        self.group_size = group_size
        self.activation_bits = activation_bits
        self.input_range = tuple(float(v) for v in input_range)

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.kernels = [(w, kernel_layout(self.layer, w.name)) for w in kernel_weights(self.layer)]
        if self.activation_bits:
            low, high = self.input_range
            self.input_min = self.add_weight(
                name="input_min", shape=(), initializer=keras.initializers.Constant(low))
            self.input_max = self.add_weight(
                name="input_max", shape=(), initializer=keras.initializers.Constant(high))
        self.built = True

    def substitutes(self) -> dict:
        qmax = INTEGER_MODES[self.mode]
        return {id(w): fake_quantize_kernel(w.value, axes, qmax, self.group_size)
                for w, axes in self.kernels}

    def call(self, inputs, *args, **kwargs):
        if self.activation_bits:
            inputs = keras.quantizers.fake_quant_with_min_max_vars(
                inputs, self.input_min, self.input_max, num_bits=self.activation_bits)
        return super().call(inputs, *args, **kwargs)

    def learned_range(self) -> tuple[float, float] | None:
        """The trained input bounds, or None without activation quantization."""
        if not self.activation_bits:
            return None
        low = float(keras.ops.convert_to_numpy(self.input_min.value))
        high = float(keras.ops.convert_to_numpy(self.input_max.value))
        return min(low, 0.0), max(high, low + 1e-8, 0.0)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "group_size": self.group_size,
                "activation_bits": self.activation_bits, "input_range": list(self.input_range)}
