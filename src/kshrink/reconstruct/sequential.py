"""Layer-wise reconstruction over a whole model, in order: each layer is solved on the inputs
the layers before it, already compressed, now produce (as GPTQ and SparseGPT do), and
BatchNorm statistics re-estimated on calibration data.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from kshrink.core.graph import graph_calls
from kshrink.errors import KshrinkError
from kshrink.layers import as_matrix, from_matrix, kernel_specs
from kshrink.reconstruct import rows as rowlib
from kshrink.reconstruct.solvers import grouped, ungrouped

# solve(layer, kernel name, grouped weights (G, r, c), Hessian (G, r, r)) -> new grouped weights
Solve = Callable[[keras.layers.Layer, str, np.ndarray, np.ndarray], np.ndarray]


def reconstruct(model: keras.Model, x, targets, solve: Solve, *, batch_size: int = 32,
                progress: Callable[[str], None] | None = None) -> None:
    """Replaces, in place and in graph order, every kernel of each target by what `solve`
    returns for it, given the Hessian of its input rows on `x`.

    Args:
        model: the model, whose layers run as they are (masks, earlier solutions included).
        x: calibration inputs (an array or a dict of arrays).
        targets: `(graph layer, layer)` pairs: the layer as it appears in the model's graph
            (a wrapper, say) and the layer whose kernels are solved (what it wraps).
        solve: see `Solve`.
    """
    probes = {id(g): _probe(model, g) for g, _ in targets}
    for i, (graph_layer, layer) in enumerate(targets):
        if progress:
            progress(f"layer {i + 1}/{len(targets)}: {layer.name}")
        inputs = [probes[id(graph_layer)](part) for part in _slices(x, batch_size)]
        for variable, spec in kernel_specs(layer):
            h, count = rowlib.hessian(layer, spec.name, inputs)
            if count == 0:
                raise KshrinkError(f"reconstruction: no calibration rows reach {layer.name!r}")
            shape = tuple(variable.shape)
            matrix = as_matrix(keras.ops.convert_to_numpy(variable.value), spec.output_axes)
            g = rowlib.groups(layer, spec.name)
            solved = solve(layer, spec.name, grouped(matrix.astype("float64"), g), h / count)
            variable.assign(from_matrix(ungrouped(solved), shape, spec.output_axes)
                            .astype(variable.dtype))


def reestimate_batchnorm(model: keras.Model, x, *, batch_size: int = 32) -> list[str]:
    """Sets every BatchNormalization's moving mean and variance to the statistics of its input
    on `x`, in graph order (each sees the statistics already re-estimated before it).

    Returns:
        The names of the layers re-estimated.
    """
    layers = [l for l in _leaves(model) if isinstance(l, keras.layers.BatchNormalization)]
    probes = {id(l): _probe(model, l) for l in layers}
    for layer in layers:
        inputs = [probes[id(layer)](part) for part in _slices(x, batch_size)]
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
        values = [np.moveaxis(v, axis, -1).reshape(-1, v.shape[axis]).astype("float64")
                  for v in inputs]
        count = sum(len(v) for v in values)
        mean = sum(v.sum(axis=0) for v in values) / count
        variance = sum(((v - mean) ** 2).sum(axis=0) for v in values) / count
        layer.moving_mean.assign(mean.astype("float32"))
        layer.moving_variance.assign(variance.astype("float32"))
    return [l.name for l in layers]


def _leaves(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaves(layer)
        else:
            yield layer


def _probe(model: keras.Model, layer) -> Callable:
    """A function from model inputs to the input of `layer` (at any depth), which runs the
    model's layers as they are when it is called."""
    for top in model.layers:
        if top is layer:
            return _graph_probe(model, top)
        if isinstance(top, keras.Model) and any(l is layer for l in _leaves(top)):
            outer, inner = _graph_probe(model, top), _probe(top, layer)
            return lambda x: inner(outer(x))
    raise KshrinkError(f"layer {layer.name!r} is not part of the model")


def _graph_probe(model: keras.Model, layer) -> Callable:
    calls, inputs, _ = graph_calls(model)
    found = [ins for l, ins, _ in calls if l is layer]
    if len(found) != 1 or len(found[0]) != 1:
        raise KshrinkError(f"reconstruction: layer {layer.name!r} must be called once, on one "
                           "input")
    probe = keras.Model(inputs, found[0][0])
    return lambda x: np.asarray(probe(x, training=False))


def _slices(x, size: int):
    if isinstance(x, dict):
        n = len(next(iter(x.values())))
        for start in range(0, n, size):
            yield {k: v[start:start + size] for k, v in x.items()}
        return
    for start in range(0, len(x), size):
        yield x[start:start + size]
