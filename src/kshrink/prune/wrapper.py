"""The training-time form of a pruned layer: masks as layer state, applied in the forward pass.

Masks are non-trainable variables of a `keras.layers.Wrapper`, multiplied into the weights on
every call through `layer.stateless_call`. Unlike a `Variable.constraint` (baked in at trace
time under JAX jit), a mask variable is part of the state each compiled step reads, so mask
updates take effect on every backend. Pruned weights get zero gradient.
"""

from __future__ import annotations

import keras

# Which weights of the stock layers are pruned (biases and normalization never are).
PRUNABLE_ATTRIBUTES = {
    "SeparableConv1D": ("depthwise_kernel", "pointwise_kernel"),
    "SeparableConv2D": ("depthwise_kernel", "pointwise_kernel"),
    "DepthwiseConv1D": ("kernel",),
    "DepthwiseConv2D": ("kernel",),
    "Embedding": ("embeddings",),
    "Dense": ("kernel",),
    "EinsumDense": ("kernel",),
    "Conv1D": ("kernel",),
    "Conv2D": ("kernel",),
    "Conv3D": ("kernel",),
    "Conv1DTranspose": ("kernel",),
    "Conv2DTranspose": ("kernel",),
    "Conv3DTranspose": ("kernel",),
}
# Transposed convolutions keep their output channels on the second-to-last kernel axis.
_OUTPUT_AXIS = {"Conv1DTranspose": -2, "Conv2DTranspose": -2, "Conv3DTranspose": -2}


def prunable_weights(layer) -> list:
    """The variables of `layer` that pruning may zero; [] if it has none.

    A custom layer opts in by defining `get_prunable_weights()` returning its variables.
    """
    if hasattr(layer, "get_prunable_weights"):
        return list(layer.get_prunable_weights())
    if getattr(layer, "quantization_mode", None):
        return []  # integer weights: prune before quantizing
    for cls in type(layer).__mro__:
        if cls.__module__.startswith("keras.") and cls.__name__ in PRUNABLE_ATTRIBUTES:
            return [getattr(layer, name) for name in PRUNABLE_ATTRIBUTES[cls.__name__]]
    return []


def output_axis(layer) -> int:
    for cls in type(layer).__mro__:
        if cls.__name__ in _OUTPUT_AXIS and cls.__module__.startswith("keras."):
            return _OUTPUT_AXIS[cls.__name__]
    return -1


@keras.saving.register_keras_serializable(package="kshrink")
class PruneWrapper(keras.layers.Wrapper):
    """Wraps a layer and multiplies each prunable weight by its mask in the forward pass."""

    def __init__(self, layer, **kwargs):
        kwargs.setdefault("name", f"prune_{layer.name}")
        super().__init__(layer, **kwargs)

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.pruned = prunable_weights(self.layer)
        self.masks = [
            self.add_weight(shape=w.shape, initializer="ones", trainable=False,
                            name=f"{w.name}_mask", dtype=w.dtype)
            for w in self.pruned
        ]
        self.built = True

    def call(self, inputs, *args, **kwargs):
        mask_of = {id(w): m for w, m in zip(self.pruned, self.masks)}

        def value(v):
            return keras.ops.multiply(v.value, mask_of[id(v)].value) if id(v) in mask_of else v.value

        outputs, _ = self.layer.stateless_call(
            [value(v) for v in self.layer.trainable_variables],
            [value(v) for v in self.layer.non_trainable_variables],
            inputs, *args, **kwargs,
        )
        return outputs
