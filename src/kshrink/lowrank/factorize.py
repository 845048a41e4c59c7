"""Low-rank factorization: a Dense or Conv2D layer becomes two thinner ones
(`kshrink.layers.factor` builds them).

A Dense kernel W (inputs x units) is replaced by its truncated SVD, split evenly:
Dense(rank, no bias) with U·sqrt(S), then Dense(units) with sqrt(S)·Vᵀ and the original bias and
activation. A k x k Conv2D is factorized the same way over its (k·k·inputs x filters) matrix: a
k x k convolution to `rank` channels, then a 1x1 convolution to the filters. The second layer
keeps the original name; the first is named `<name>_lowrank`.

The rank is the smallest that keeps a share of the singular values' energy (`energy`), or the
smallest whose layer output on calibration data is within a relative error (`tolerance`):
`||f_r(x) - f(x)|| <= tolerance * ||f(x)||`. A layer is factorized only if that rank needs fewer
parameters (and so fewer MACs) than the layer has.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from kshrink.layers import factor
from kshrink.layers.specs import as_matrix
from kshrink.measure.accuracy import relative_error


@dataclasses.dataclass(frozen=True)
class Factorization:
    """The SVD of a layer's kernel matrix, largest singular value first."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray

    @staticmethod
    def of(layer) -> Factorization:
        kernel = keras.ops.convert_to_numpy(layer.kernel).astype("float64")
        u, s, vt = np.linalg.svd(as_matrix(kernel), full_matrices=False)
        return Factorization(u, s, vt)

    def rank_for_energy(self, energy: float) -> int:
        kept = np.cumsum(self.s ** 2) / max(np.sum(self.s ** 2), 1e-300)
        return int(np.searchsorted(kept, energy - 1e-12) + 1)


def parameters(layer, rank: int) -> tuple[int, int]:
    """(kernel parameters now, kernel parameters at `rank`)."""
    *inputs, columns = layer.kernel.shape
    rows = int(np.prod(inputs))
    return rows * columns, rank * (rows + columns)


def factorized(layer, svd: Factorization, rank: int) -> list:
    """The two built layers that replace `layer` at `rank`."""
    root = np.sqrt(svd.s[:rank])
    return factor.pair(layer, (svd.u[:, :rank] * root).astype("float32"),
                       (root[:, None] * svd.vt[:rank]).astype("float32"))


def output_error(layer, pair: list, x) -> float:
    """Relative L2 error of the factorized pair's output against the layer's on `x`."""
    return relative_error(layer(x), pair[1](pair[0](x)))


def rank_for_tolerance(layer, svd: Factorization, x, tolerance: float) -> int:
    """The smallest rank whose output error on `x` is within `tolerance` (binary search)."""
    low, high = 1, len(svd.s)
    while low < high:
        middle = (low + high) // 2
        if output_error(layer, factorized(layer, svd, middle), x) <= tolerance:
            high = middle
        else:
            low = middle + 1
    return low
