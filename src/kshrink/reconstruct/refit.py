"""Re-fitting the layers that read removed channels (He et al. 2017; ThiNet, Luo et al. 2017).

After structured pruning, a layer whose input channels went can still compute nearly what it
did: its kernel and bias are solved by least squares so that, on calibration data, its output
from the inputs it now receives matches what the original layer computed from the original
inputs, `min ||X' W' + b' - (X W + b)||`, for the output channels it keeps. Layers are solved in
graph order, each on the inputs the layers before it, already re-fitted, produce.
"""

from __future__ import annotations

import keras
import numpy as np

from kshrink.layers import as_matrix, from_matrix, kernel_specs
from kshrink.layers import rows as rowlib
from kshrink.reconstruct.sequential import _leaves, _slices, run_layer_by_layer

DAMPING = 1e-3  # ridge, relative to the mean input energy: keeps the solve well posed


def refit(original: keras.Model, pruned: keras.Model, x, kept_outputs: dict, *,
          batch_size: int = 32) -> list[str]:
    """Re-fits, in place, each layer of `pruned` named in `kept_outputs` that `rowlib.refittable`
    takes, against its namesake in `original`.

    Args:
        original: the model before channels were removed.
        pruned: the narrowed model (same layer names).
        x: calibration inputs.
        kept_outputs: `{layer name: indices of the original's output channels it keeps}`.

    Returns:
        The names of the layers re-fitted.
    """
    wanted = {name for name, layer in _named(pruned).items()
              if name in kept_outputs and rowlib.refittable(layer) is None}
    if not wanted:
        return []
    batches = list(_slices(x, batch_size))
    originals = {name: layer for name, layer in _named(original).items() if name in wanted}
    recorded = {}

    def record(layer, inputs):
        recorded[layer.name] = list(inputs)  # valid during the visit only

    run_layer_by_layer(original, batches, {id(l) for l in originals.values()}, record)
    done = []

    def solve(layer, inputs):
        _solve(originals[layer.name], layer, recorded.pop(layer.name), inputs,
               np.asarray(kept_outputs[layer.name]))
        done.append(layer.name)

    run_layer_by_layer(pruned, batches, {id(l) for l in _named(pruned).values()
                                         if l.name in wanted}, solve)
    return done


def _named(model) -> dict:
    return {layer.name: layer for layer in _leaves(model)}


def _solve(original, layer, original_inputs, inputs, kept: np.ndarray) -> None:
    (variable, spec), = kernel_specs(layer)
    (reference, _), = kernel_specs(original)
    bias = layer.bias if layer.use_bias else None
    # The same positions of each example in both: one example at a time, one generator each.
    draw_original, draw = np.random.default_rng(0), np.random.default_rng(0)
    energy = cross = None
    for xo, xp in zip(original_inputs, inputs):
        for i in range(len(xp)):
            (ro,) = next(rowlib.kernel_rows(original, spec.name, xo[i:i + 1],
                                            rowlib.ROWS_PER_EXAMPLE, draw_original))
            (rp,) = next(rowlib.kernel_rows(layer, spec.name, xp[i:i + 1],
                                            rowlib.ROWS_PER_EXAMPLE, draw))
            ro, rp = ro.astype("float64"), rp.astype("float64")
            if bias is not None:
                rp = np.concatenate([rp, np.ones((len(rp), 1))], axis=1)
            energy = rp.T @ rp if energy is None else energy + rp.T @ rp
            cross = rp.T @ ro if cross is None else cross + rp.T @ ro
    w = as_matrix(keras.ops.convert_to_numpy(reference.value), spec.output_axes)
    target = cross @ w[:, kept].astype("float64")
    if bias is not None and original.use_bias:
        b = keras.ops.convert_to_numpy(original.bias)[kept].astype("float64")
        target += energy[:, -1:] * b[None, :]  # the ones column of rp sums the rows
    damp = DAMPING * float(np.mean(np.diag(energy))) + 1e-12
    solution = np.linalg.solve(energy + damp * np.eye(len(energy)), target)
    if bias is not None:
        bias.assign(solution[-1].astype(bias.dtype))
        solution = solution[:-1]
    variable.assign(from_matrix(solution, tuple(variable.shape), spec.output_axes)
                    .astype(variable.dtype))
