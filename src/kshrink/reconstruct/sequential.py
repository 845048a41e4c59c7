"""Layer-wise reconstruction over a whole model, in order: each layer is solved on the inputs
the layers before it, already compressed, now produce (as GPTQ and SparseGPT do), and
BatchNorm statistics re-estimated on calibration data.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from kshrink.core.graph import graph_program
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
    solved = {id(g): layer for g, layer in targets}
    done = []

    def visit(graph_layer, inputs):
        layer = solved[id(graph_layer)]
        done.append(layer.name)
        if progress:
            progress(f"layer {len(done)}/{len(solved)}: {layer.name}")
        for variable, spec in kernel_specs(layer):
            h, count = rowlib.hessian(layer, spec.name, inputs)
            if count == 0:
                raise KshrinkError(f"reconstruction: no calibration rows reach {layer.name!r}")
            shape = tuple(variable.shape)
            matrix = as_matrix(keras.ops.convert_to_numpy(variable.value), spec.output_axes)
            g = rowlib.groups(layer, spec.name)
            new = solve(layer, spec.name, grouped(matrix.astype("float64"), g), h / count)
            variable.assign(from_matrix(ungrouped(new), shape, spec.output_axes)
                            .astype(variable.dtype))

    run_layer_by_layer(model, list(_slices(x, batch_size)), set(solved), visit)


def reestimate_batchnorm(model: keras.Model, x, *, batch_size: int = 32) -> list[str]:
    """Sets every BatchNormalization's moving mean and variance to the statistics of its input
    on `x`, in graph order (each sees the statistics already re-estimated before it).

    Returns:
        The names of the layers re-estimated.
    """
    layers = [l for l in _leaves(model) if isinstance(l, keras.layers.BatchNormalization)]

    def visit(layer, inputs):
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
        values = [np.moveaxis(v, axis, -1).reshape(-1, v.shape[axis]).astype("float64")
                  for v in inputs]
        count = sum(len(v) for v in values)
        mean = sum(v.sum(axis=0) for v in values) / count
        variance = sum(((v - mean) ** 2).sum(axis=0) for v in values) / count
        layer.moving_mean.assign(mean.astype("float32"))
        layer.moving_variance.assign(variance.astype("float32"))

    if layers:
        run_layer_by_layer(model, list(_slices(x, batch_size)), {id(l) for l in layers}, visit)
    return [l.name for l in layers]


def run_layer_by_layer(model: keras.Model, batches: list, wanted: set, visit) -> None:
    """Runs `model` on each batch one layer call at a time, in graph order, every call once,
    until the last layer in `wanted` (ids, at any depth) has run. Before each call of a wanted
    layer, `visit(layer, its input per batch as NumPy arrays)` may change the layer's
    weights: the call, and so every later layer, then runs with the new ones."""
    calls, inputs, _ = graph_program(model)
    names = [t.name for t in model.inputs]
    values = {}
    for i, tensor in enumerate(inputs):
        values[id(tensor)] = [_bind(batch, i, names) for batch in batches]

    def holds(layer):
        return id(layer) in wanted or (isinstance(layer, keras.Model)
                                       and any(id(l) in wanted for l in _leaves(layer)))

    marked = [i for i, call in enumerate(calls) if holds(call.layer)]
    if not marked:
        return
    last_use = {}
    for i, call in enumerate(calls):
        for tensor in call.inputs:
            last_use[id(tensor)] = i
    visited = set()
    for i, call in enumerate(calls[:marked[-1] + 1]):
        layer = call.layer
        if id(layer) in wanted:
            if len(call.inputs) != 1 or id(layer) in visited:
                raise KshrinkError(f"reconstruction: layer {layer.name!r} must be called once, "
                                   "on one input")
            visited.add(id(layer))
            visit(layer, [keras.ops.convert_to_numpy(v) for v in values[id(call.inputs[0])]])
        if i == marked[-1] and not isinstance(layer, keras.Model):
            break  # nothing after it is needed
        outputs = []
        for b in range(len(batches)):
            args, kwargs = keras.tree.map_structure(
                lambda t: values[id(t)][b] if isinstance(t, keras.KerasTensor) else t,
                (call.args, call.kwargs))
            if isinstance(layer, keras.Model) and holds(layer):
                outputs.append(None)  # run below, all batches at once
                continue
            outputs.append(keras.tree.flatten(layer(*args, **{"training": False, **kwargs})))
        if isinstance(layer, keras.Model) and holds(layer):
            nested = [keras.tree.map_structure(
                lambda t: values[id(t)][b] if isinstance(t, keras.KerasTensor) else t,
                call.args[0]) for b in range(len(batches))]
            run_layer_by_layer(layer, nested, wanted, visit)
            if i == marked[-1]:
                break
            outputs = [keras.tree.flatten(layer(a, training=False)) for a in nested]
        for j, tensor in enumerate(call.outputs):
            values[id(tensor)] = [out[j] for out in outputs]
        for tensor in call.inputs:
            if last_use.get(id(tensor)) == i:
                values.pop(id(tensor), None)


def _bind(batch, index: int, names: list):
    """The part of one batch that model input `index` (named `names[index]`) takes."""
    if isinstance(batch, dict):
        return batch[names[index]]
    if isinstance(batch, (list, tuple)):
        return batch[index]
    return batch


def _leaves(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaves(layer)
        else:
            yield layer


def _slices(x, size: int):
    if isinstance(x, dict):
        n = len(next(iter(x.values())))
        for start in range(0, n, size):
            yield {k: v[start:start + size] for k, v in x.items()}
        return
    for start in range(0, len(x), size):
        yield x[start:start + size]
