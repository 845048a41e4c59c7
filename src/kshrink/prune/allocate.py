"""`Prune(scope="sensitivity")`: each layer's sparsity from its measured effect on the model.

Each chosen layer is pruned alone, as the step will prune it (by magnitude, or by Wanda or
SparseGPT on its own inputs), at a few levels around the target, and the model's outputs on
calibration examples are compared with the unpruned model's; the errors, assumed to add up
across layers (as OBC/SPDY assume), then give each layer the sparsity that reaches the target
over all of them at the least total error: walking every layer's error curve along its lower
convex hull, the cheapest error per pruned weight first (the Lagrangian solution of SPDY's
allocation problem, Frantar & Alistarh 2022; OWL, Yin et al. 2024, allocates from outliers
instead).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable

import keras
import numpy as np

from kshrink.core.data import example_count
from kshrink.core.graph import path_of
from kshrink.core.progress import Progress, counting
from kshrink.layers import as_matrix, from_matrix, kernel_weights, output_axes
from kshrink.measure.accuracy import predict, relative_error
from kshrink.prune import masks as masklib

SPREAD = 0.2  # no layer further than this from the target (OWL's bound on the deviation)
STEPS = (-1.0, -0.5, 0.0, 0.5, 1.0)  # the levels measured, in units of SPREAD
PROBE_SAMPLES = 64  # enough to rank layers; each layer and level costs one pass over them


@dataclasses.dataclass(frozen=True)
class Allocation:
    """What one layer was given: `sparsity`, and `error`, the relative squared error of the
    model's outputs with this layer alone pruned that far (interpolated between levels)."""

    sparsity: float
    error: float


def allocate(model: keras.Model, layers: list, target: float, x, *, cap: float,
             prune: Callable[[keras.layers.Layer, float], None],
             progress: Progress | None = None) -> dict:
    """`{path: Allocation}` for `layers` of `model` (restored as found) so that `target` of
    their kernel weights are pruned, no layer beyond `cap`, measured on the inputs `x`;
    `prune(layer, sparsity)` prunes one layer in place as the step will."""
    reference = predict(model, x)
    levels = sorted({min(max(target + SPREAD * k, 0.0), cap) for k in STEPS})
    curves = []
    for layer in counting(progress, f"measuring {len(levels)} sparsity levels on "
                                    f"{example_count(x)} examples", layers, path_of):
        kernels = kernel_weights(layer)
        dense = [keras.ops.convert_to_numpy(w.value) for w in kernels]
        errors = []
        for sparsity in levels:
            prune(layer, sparsity)
            errors.append(relative_error(reference, predict(model, x)) ** 2)
            for w, values in zip(kernels, dense):
                w.assign(values)
        curves.append(np.maximum.accumulate(errors))  # pruning more never helps
    sizes = [sum(int(np.prod(w.shape)) for w in kernel_weights(l)) for l in layers]
    chosen = _cheapest(curves, sizes, np.asarray(levels), target * sum(sizes))
    return {path_of(layer): Allocation(s, float(np.interp(s, levels, curve)))
            for layer, s, curve in zip(layers, chosen, curves)}


def _cheapest(curves, sizes, levels, needed: float) -> list[float]:
    """Sparsity per layer pruning `needed` weights in all: the step that costs least error per
    weight first, each layer moving along the lower convex hull of its curve; the last step
    taken in part so the count is met exactly."""
    at = [0] * len(curves)
    chosen = [float(levels[0])] * len(curves)
    pruned = levels[0] * sum(sizes)

    def step(i):  # the best next hull point of layer i: (error per weight, i, level index)
        k, curve = at[i], curves[i]
        if k + 1 >= len(levels):
            return None
        slopes = (curve[k + 1:] - curve[k]) / (sizes[i] * (levels[k + 1:] - levels[k]))
        j = k + 1 + int(np.argmin(slopes))
        return float(slopes[j - k - 1]), i, j

    heap = [s for s in map(step, range(len(curves))) if s]
    heapq.heapify(heap)
    while heap and pruned < needed:
        _, i, j = heapq.heappop(heap)
        gain = sizes[i] * (levels[j] - levels[at[i]])
        if pruned + gain >= needed:
            chosen[i] = levels[at[i]] + (needed - pruned) / sizes[i]
            break
        pruned += gain
        at[i], chosen[i] = j, float(levels[j])
        if (next_step := step(i)) is not None:
            heapq.heappush(heap, next_step)
    return chosen


def by_magnitude(pattern: masklib.Pattern) -> Callable[[keras.layers.Layer, float], None]:
    """`prune(layer, sparsity)`: zeroes the smallest of each kernel of `layer` in `pattern`."""

    def prune(layer, sparsity: float) -> None:
        for w in kernel_weights(layer):
            values, axes = keras.ops.convert_to_numpy(w.value), output_axes(layer, w.name)
            matrix = as_matrix(values, axes)
            mask, = masklib.magnitude_masks([matrix], [np.ones_like(matrix)], sparsity,
                                            pattern, "layer")
            w.assign(values * from_matrix(mask, values.shape, axes))

    return prune
