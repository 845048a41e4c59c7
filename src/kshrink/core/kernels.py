"""Which weights of a layer are its kernels, which axis holds the outputs, and the
(inputs, outputs) matrix view that pruning and weight sharing work on."""

from __future__ import annotations

import numpy as np

# The kernels of Keras' own layers (biases and normalization parameters are never touched).
KERNEL_ATTRIBUTES = {
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


def kernel_weights(layer) -> list:
    """The variables of `layer` that pruning and weight sharing work on; [] if none.

    A custom layer opts in by defining `get_prunable_weights()` returning its variables.
    Quantized layers have none: their integer weights are final.
    """
    if hasattr(layer, "get_prunable_weights"):
        return list(layer.get_prunable_weights())
    if getattr(layer, "quantization_mode", None) or getattr(layer, "is_quantized", False):
        return []
    for cls in type(layer).__mro__:
        if cls.__module__.startswith("keras.") and cls.__name__ in KERNEL_ATTRIBUTES:
            return [getattr(layer, name) for name in KERNEL_ATTRIBUTES[cls.__name__]]
    return []


def output_axis(layer) -> int:
    """The axis of `layer`'s kernel that indexes output channels."""
    for cls in type(layer).__mro__:
        if cls.__name__ in _OUTPUT_AXIS and cls.__module__.startswith("keras."):
            return _OUTPUT_AXIS[cls.__name__]
    return -1


def as_matrix(weights: np.ndarray, output_axis: int = -1) -> np.ndarray:
    """The (inputs, outputs) view of a kernel: output axis last, the rest flattened."""
    moved = np.moveaxis(weights, output_axis, -1)
    return moved.reshape(-1, moved.shape[-1]) if moved.ndim > 1 else moved.reshape(-1, 1)


def from_matrix(matrix: np.ndarray, shape: tuple, output_axis: int = -1) -> np.ndarray:
    """The inverse of `as_matrix`: a kernel of `shape` from its (inputs, outputs) view."""
    moved_shape = list(shape)
    moved_shape.append(moved_shape.pop(output_axis % len(shape)))
    return np.moveaxis(matrix.reshape(moved_shape), -1, output_axis)
