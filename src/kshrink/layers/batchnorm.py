"""Batch normalization, the one place that knows its layers: which layers keep moving
statistics of their input, how fast those follow training, the affine map they compute at
inference, and reading and writing the statistics. Folding, re-estimation and channel
removal read it from here."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np


def is_batchnorm(layer) -> bool:
    """Whether `layer` normalizes by moving statistics of its input (a BatchNormalization,
    or a subclass)."""
    return isinstance(layer, keras.layers.BatchNormalization)


def momentum(layer) -> float:
    """The share of its moving statistics a training step leaves in place."""
    return float(layer.momentum)


def channel_axis(layer) -> int | None:
    """The axis `layer` normalizes over, as configured (e.g. -1), or None when it normalizes
    over several."""
    axis = layer.axis
    if isinstance(axis, int):
        return axis
    return axis[0] if len(axis) == 1 else None


@dataclasses.dataclass(frozen=True)
class Inference:
    """What a batch normalization computes at inference, per channel:
    `(x - mean) * scale + beta` with `scale = gamma / sqrt(variance + epsilon)`.

    Attributes:
        gamma: the learned scale, or None for a layer without one (`scale=False`).
        beta: the learned shift (0.0 for a layer without one, `center=False`).
        mean, variance: the moving statistics.
        epsilon: what is added to the variance.
    """

    gamma: np.ndarray | None
    beta: np.ndarray | float
    mean: np.ndarray
    variance: np.ndarray
    epsilon: float

    @property
    def scale(self) -> np.ndarray:
        """The per-channel factor (float64, computed in the layer's float32)."""
        gamma = 1.0 if self.gamma is None else self.gamma
        return (gamma / np.sqrt(self.variance + self.epsilon)).astype("float64")

    @property
    def shift(self) -> np.ndarray:
        """What the layer outputs for a zero input, per channel."""
        return self.beta - self.mean * self.scale


def inference(layer) -> Inference:
    """The inference map of the batch normalization `layer`, from its current weights."""
    numpy = keras.ops.convert_to_numpy
    return Inference(gamma=numpy(layer.gamma.value) if layer.scale else None,
                     beta=numpy(layer.beta.value) if layer.center else 0.0,
                     mean=numpy(layer.moving_mean.value),
                     variance=numpy(layer.moving_variance.value), epsilon=layer.epsilon)


def statistics(layer) -> list:
    """The variables holding `layer`'s moving statistics (mean, variance)."""
    return [layer.moving_mean, layer.moving_variance]


def set_statistics(layer, mean: np.ndarray, variance: np.ndarray) -> None:
    """Sets `layer`'s moving statistics (a negative variance from rounding becomes 0)."""
    layer.moving_mean.assign(np.asarray(mean).astype("float32"))
    layer.moving_variance.assign(np.maximum(variance, 0.0).astype("float32"))
