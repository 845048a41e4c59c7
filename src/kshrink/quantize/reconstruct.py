"""`Quantize(method="gptq" | "adaround")`: integer grids and weights chosen on calibration
data (see `kshrink.reconstruct`), layer by layer or block by block, before the layers are
replaced by quantized ones."""

from __future__ import annotations

import keras
import numpy as np

from kshrink.core.graph import copy_model, leaf_layers, owner_of, path_of
from kshrink.core.progress import within
from kshrink.layers import (
    INTEGER_MODES,
    as_matrix,
    from_matrix,
    kernel_specs,
    keras_base,
    keras_quantizes,
)
from kshrink.reconstruct import (
    calibration_inputs,
    choose_scales,
    gptq,
    reconstruct,
    unsupported,
)
from kshrink.reconstruct.blocks import Free, Rounding, describe, reconstruct_blocks
from kshrink.layers.rows import by_equation, matrix_axes
from kshrink.reconstruct.solvers import energy_matrix, grouped, ungrouped

def _solvable(model, plans: dict, ctx) -> list:
    """The planned integer layers a calibration method takes, in order; those it does not are
    recorded in `ctx.state.rounded` with the reason (they are rounded to nearest)."""
    chosen, rounded = [], {}
    for layer in leaf_layers(model):
        plan = plans.get(path_of(layer))
        if plan is None or plan.mode not in INTEGER_MODES or keras_base(layer) is None:
            continue
        reason = unsupported(layer, einsum=True) or (
            stored_by_keras(layer) and _grid_reason(layer, plan))
        if reason:
            rounded[path_of(layer)] = reason
        else:
            chosen.append(layer)
    ctx.state.rounded = rounded
    return chosen


def _grid(plan) -> tuple[int, int | None]:
    """(largest code, rows per scale group or None) of a plan."""
    return INTEGER_MODES[plan.mode], plan.group_size if plan.mode == "int4" else None


def gptq_scales(model, plans: dict, config, ctx) -> dict:
    """Runs GPTQ on every planned integer layer it takes, in place, and returns the grid of
    each: `{layer name: {kernel name: scales (groups, output channels)}}`. Layers it does not
    take are recorded in `ctx.state.rounded` with the reason."""
    x = calibration_inputs(ctx.data, config.calibration_samples, "quantize: method gptq")
    targets = [(layer, layer) for layer in _solvable(model, plans, ctx)]
    found = {}

    def solve(layer, name, weights, hessian):
        qmax, group_size = _grid(plans[path_of(layer)])
        g, rows, per_group = weights.shape
        scales = choose_scales(ungrouped(weights), qmax, group_size,
                               energy_matrix(hessian, per_group))
        per_row = np.repeat(scales, group_size or rows, axis=0)[:rows].astype("float64")
        found.setdefault(path_of(layer), {})[name] = scales
        return gptq(weights, hessian, grouped(per_row, g), qmax)

    reconstruct(model, x, targets, solve, original=copy_model(model),
                progress=within(ctx.progress, "quantize, GPTQ"))
    return found


def adaround_scales(model, plans: dict, config, ctx) -> dict:
    """Learned rounding (AdaRound, fitted block by block as BRECQ does) of every planned
    integer layer it takes, in place, on a grid whose last code holds each group's largest
    weight; biases of those layers are fitted alongside. Returns the grids as `gptq_scales`
    does."""
    x = calibration_inputs(ctx.data, config.calibration_samples, "quantize: method adaround")
    layers = _solvable(model, plans, ctx)
    chosen = {id(layer): layer for layer in layers}
    found = {}

    def fits(layer):
        if id(layer) not in chosen:
            return []
        qmax, group_size = _grid(plans[path_of(layer)])
        result = []
        for variable, spec in kernel_specs(layer):
            axes = matrix_axes(layer, spec)
            matrix = as_matrix(keras.ops.convert_to_numpy(variable.value), axes)
            # Unclipped: learned rounding moves a weight to the grid point below or above
            # it, so a clipped weight could not come back (a clipping search chosen for
            # rounding to nearest left the residual CNN's first block with 3x the error).
            scales = choose_scales(matrix, qmax, group_size, factors=(1.0,))
            per_row = np.repeat(scales, group_size or len(matrix), axis=0)[:len(matrix)]
            found.setdefault(path_of(layer), {})[spec.name] = scales
            result.append(Rounding(variable, from_matrix(per_row, tuple(variable.shape), axes),
                                   qmax))
        if getattr(layer, "bias", None) is not None:
            result.append(Free(layer.bias))
        return result

    rows = reconstruct_blocks(model, copy_model(model), x, fits, steps=config.iterations,
                              progress=within(ctx.progress, "quantize, AdaRound"))
    ctx.note(f"AdaRound: {describe(rows, config.iterations, 'rounded to nearest', 'learned')}")
    return found


def stored_by_keras(layer) -> bool:
    """Whether a layer GPTQ solved is stored by Keras' own quantized layer, on GPTQ's grid:
    one a custom layer builds (only Keras can quantize it in place), or an EinsumDense (whose
    solved matrix view is its equation's, not that of kshrink's quantized EinsumDense)."""
    return bool(owner_of(layer)) or by_equation(layer)


def _grid_reason(layer, plan) -> str | None:
    """Why Keras cannot store `layer` on GPTQ's grid, or None."""
    if not keras_quantizes(layer):
        return "layers inside custom layers that Keras does not quantize"
    if plan.mode == "int4" and plan.group_size:
        return (f"grouped int4 of {type(layer).__name__} inside custom layers or as "
                "EinsumDense (Keras stores it with zero points); use group_size null")
    return None
