"""Calibration: run representative data through a model and record the range of each layer's
input, for static activation quantization.

Three ways to turn the observed values into a clipping range:

- `minmax`: the smallest and largest value seen.
- `percentile`: the `percentile`-th and `100 - percentile`-th percentiles, so rare outliers do
  not stretch the grid for every other value.
- `mse`: the range, shrunk from min/max by a common factor, whose 8-bit quantization has the
  smallest mean squared error on the observed values.

Every range contains 0, so zero (padding, ReLU outputs) is exactly representable.
"""

from __future__ import annotations

import keras
import numpy as np

from kshrink.errors import KshrinkError
from kshrink.reconstruct.sequential import visit_inputs

METHODS = ("minmax", "percentile", "mse")
_MSE_VALUES = 1 << 20  # values sampled for the MSE search
_MSE_FACTORS = np.linspace(0.2, 1.0, 81)


def input_ranges(model: keras.Model, x, layers, *, method: str = "percentile",
                 percentile: float = 99.99, bits: int = 8, batch_size: int = 128) -> dict:
    """The input range of each of `layers` when `model` runs on `x`.

    Args:
        model: a Sequential or functional model (nested models are followed).
        x: representative inputs (a few hundred examples are enough).
        layers: layers of `model` (at any depth) with a single input each.
        method: `"minmax"`, `"percentile"` or `"mse"`.
        percentile: for `"percentile"`: the upper percentile kept (the lower one mirrors it).
        bits: for `"mse"`: the bits the range will be quantized to.

    Returns:
        `{layer name: (low, high)}` as Python floats.
    """
    if method not in METHODS:
        raise KshrinkError(f"calibration method must be one of {', '.join(METHODS)}. "
                           f"Received: {method!r}")
    wanted = {id(layer) for layer in layers}
    ranges = {}
    _collect(model, x, wanted, ranges, batch_size,
             lambda values: clip_range(values, method, percentile, bits))
    return ranges


def _collect(model, x, wanted: set, ranges: dict, batch_size: int, reduce) -> None:
    def visit(layer, batches):
        low, high = reduce(np.concatenate([np.asarray(b, dtype="float32") for b in batches]))
        if layer.name in ranges:  # a shared layer: the range of all its calls
            low, high = min(low, ranges[layer.name][0]), max(high, ranges[layer.name][1])
        ranges[layer.name] = low, high

    visit_inputs(model, x, wanted, visit, batch_size)


def clip_range(values: np.ndarray, method: str = "minmax", percentile: float = 99.99,
               bits: int = 8) -> tuple[float, float]:
    """The clipping range of `values` by `method` (see the module docstring)."""
    values = values.reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    if method == "percentile":
        low, high = np.percentile(values, [100 - percentile, percentile])
    else:
        low, high = values.min(), values.max()
    if method == "mse":
        low, high = _mse_range(values, low, high, bits)
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if high - low < 1e-8:
        high = low + 1e-8
    return low, high


def _mse_range(values, low, high, bits):
    if values.size > _MSE_VALUES:
        values = np.random.default_rng(0).choice(values, _MSE_VALUES, replace=False)
    best, best_error = (low, high), np.inf
    for factor in _MSE_FACTORS:
        lo, hi = min(low * factor, 0.0), max(high * factor, 0.0)
        error = np.mean((fake_quantize(values, lo, hi, bits) - values) ** 2)
        if error < best_error:
            best, best_error = (lo, hi), error
    return best


def fake_quantize(values: np.ndarray, low: float, high: float, bits: int = 8) -> np.ndarray:
    """`values` quantized to `2**bits` levels over [low, high] and back (NumPy reference)."""
    levels = (1 << bits) - 1
    scale = (high - low) / levels if high > low else 1.0
    zero = np.round(-low / scale)
    q = np.clip(np.round(values / scale) + zero, 0, levels)
    return (q - zero) * scale
