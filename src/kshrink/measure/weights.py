"""Parameters, non-zeros and bytes by storage type, per layer and in total."""

from __future__ import annotations

import dataclasses
from collections import Counter

import keras
import numpy as np

from kshrink.core.graph import leaf_layers, path_of
from kshrink.layers.quantized import computed_kernels, is_packed_int4
from kshrink.render import Table

@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """Weight statistics of one layer.

    Attributes:
        name: layer name.
        layer_type: class name.
        parameters: number of stored values (a packed int4 byte holds two).
        nonzeros: how many of them are not zero.
        bytes_by_dtype: bytes held, by storage type ("float32", "int8", "int4", ...).
    """

    name: str
    layer_type: str
    parameters: int
    nonzeros: int
    bytes_by_dtype: dict[str, int]

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_dtype.values())


@dataclasses.dataclass(frozen=True)
class WeightStats:
    """Weight statistics of a model: per layer and totals."""

    layers: tuple[LayerWeights, ...]

    @property
    def parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)

    @property
    def nonzeros(self) -> int:
        return sum(layer.nonzeros for layer in self.layers)

    @property
    def bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def bytes_by_dtype(self) -> dict[str, int]:
        total = Counter()
        for layer in self.layers:
            total.update(layer.bytes_by_dtype)
        return dict(sorted(total.items()))

    def table(self) -> Table:
        rows = [
            (l.name, l.layer_type, f"{l.parameters:,}", f"{l.nonzeros:,}", _dtypes(l.bytes_by_dtype),
             f"{l.bytes:,}")
            for l in self.layers
        ]
        rows.append(("total", "", f"{self.parameters:,}", f"{self.nonzeros:,}",
                     _dtypes(self.bytes_by_dtype), f"{self.bytes:,}"))
        return Table("weights by layer",
                     ("layer", "type", "parameters", "non-zeros", "storage", "bytes"), rows)

    def to_dict(self) -> dict:
        return {
            "parameters": self.parameters,
            "nonzeros": self.nonzeros,
            "bytes": self.bytes,
            "bytes_by_dtype": self.bytes_by_dtype,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
        }


def weight_stats(model: keras.Model) -> WeightStats:
    """Counts every variable of every layer of `model` (nested models included).

    Packed int4 storage counts half a byte per value, as it is held.
    """
    layers = []
    for layer in leaf_layers(model):
        if not layer.weights:
            continue
        parameters = nonzeros = 0
        by_dtype = Counter()
        for variable in layer.weights:
            values = keras.ops.convert_to_numpy(variable.value)
            if is_packed_int4(layer, variable):
                count, nz, kind = 2 * values.size, _nonzero_nibbles(values), "int4"
            else:
                count, nz, kind = values.size, int(np.count_nonzero(values)), str(values.dtype)
            parameters += count
            nonzeros += nz
            by_dtype[kind] += values.nbytes
        layers.append(LayerWeights(path_of(layer), type(layer).__name__, parameters, nonzeros,
                                   dict(sorted(by_dtype.items()))))
    return WeightStats(tuple(layers))


def _nonzero_nibbles(packed: np.ndarray) -> int:
    as_bytes = packed.view(np.uint8)
    return int(np.count_nonzero(as_bytes & 0x0F) + np.count_nonzero(as_bytes >> 4))


def _dtypes(by_dtype: dict[str, int]) -> str:
    return ", ".join(sorted(by_dtype)) or "-"


def weight_drift(original: keras.Model, compressed: keras.Model) -> list[tuple[str, float]]:
    """`(layer, relative change)` for every layer of `compressed` whose namesake in `original`
    (by path) has weights of the same shapes, largest change first: the Frobenius norm of the
    difference over the new weights', all of the layer's weights together. A kernel is first
    matched to the new one by the best scale per output channel, so that what only rescales
    channels (a BatchNorm folded into the layer) is no change: what is left is what pruning,
    sharing or rounding did. kshrink's quantized layers are compared through their
    dequantized kernels; layers holding integers in another layout (Keras' own quantized
    layers) are left out."""
    before = {path_of(layer): layer for layer in leaf_layers(original)}
    drift = []
    for layer in leaf_layers(compressed):
        reference = before.get(path_of(layer))
        if reference is None or not reference.weights:
            continue
        old, new = _float_weights(reference), _float_weights(layer)
        if (len(old) != len(new) or any(a.shape != b.shape for a, b in zip(old, new))
                or getattr(layer, "quantization_mode", None)):
            continue
        scale = np.sqrt(sum(np.sum(b ** 2) for b in new))
        if scale > 0:
            change = np.sqrt(sum(np.sum((_rescaled(a, b) - b) ** 2) for a, b in zip(old, new)))
            drift.append((path_of(layer), float(change / scale)))
    return sorted(drift, key=lambda item: -item[1])


def _rescaled(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """`old` with each output channel (last axis; the last two of a depthwise kernel, whose
    last is a multiplier of 1) scaled to match `new` best."""
    if old.ndim < 2:
        return old
    channels = old.shape[-1] * (old.shape[-2] if old.ndim >= 3 and old.shape[-1] == 1 else 1)
    a, b = old.reshape(-1, channels), new.reshape(-1, channels)
    energy = np.sum(a * a, axis=0)
    scale = np.where(energy > 0, np.sum(a * b, axis=0) / np.maximum(energy, 1e-300), 1.0)
    return (a * scale).reshape(old.shape)


def _float_weights(layer) -> list[np.ndarray]:
    """The weights `layer` computes with, as float64, in a fixed order: its kernels if it has
    any, else all its weights."""
    values = computed_kernels(layer) or [w.value for w in layer.weights]
    return [np.asarray(keras.ops.convert_to_numpy(v), dtype="float64") for v in values]
