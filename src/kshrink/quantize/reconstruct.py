"""`Quantize(method="gptq")`: integer grids and weights chosen layer by layer on calibration
data (see `kshrink.reconstruct`), before the layers are replaced by quantized ones."""

from __future__ import annotations

import keras
import numpy as np

from kshrink.core.graph import copy_model, leaf_layers, owner_of, path_of
from kshrink.core.progress import within
from kshrink.layers import INTEGER_MODES, keras_base, keras_quantizes
from kshrink.reconstruct import calibration_inputs, choose_scales, gptq, reconstruct, unsupported
from kshrink.reconstruct.solvers import energy_matrix, grouped, ungrouped

def gptq_scales(model, plans: dict, config, ctx) -> dict:
    """Runs GPTQ on every planned integer layer it takes, in place, and returns the grid of
    each: `{layer name: {kernel name: scales (groups, output channels)}}`. Layers it does not
    take are recorded in `ctx.state["rounded"]` with the reason."""
    x = calibration_inputs(ctx.data, config.calibration_samples, "quantize: method gptq")
    targets, rounded = [], {}
    layers = {path_of(layer): layer for layer in leaf_layers(model)}
    for key, layer in layers.items():
        plan = plans.get(key)
        if plan is None or plan.mode not in INTEGER_MODES or keras_base(layer) is None:
            continue
        reason = unsupported(layer, einsum=True) or (
            stored_by_keras(layer) and _grid_reason(layer, plan))
        if reason:
            rounded[key] = reason
        else:
            targets.append((layer, layer))
    ctx.state["rounded"] = rounded
    found = {}

    def solve(layer, name, weights, hessian):
        plan = plans[path_of(layer)]
        qmax = INTEGER_MODES[plan.mode]
        group_size = plan.group_size if plan.mode == "int4" else None
        g, rows, per_group = weights.shape
        scales = choose_scales(ungrouped(weights), qmax, group_size,
                               energy_matrix(hessian, per_group))
        per_row = np.repeat(scales, group_size or rows, axis=0)[:rows].astype("float64")
        found.setdefault(path_of(layer), {})[name] = scales
        return gptq(weights, hessian, grouped(per_row, g), qmax)

    reconstruct(model, x, targets, solve, original=copy_model(model),
                progress=within(ctx.progress, "quantize, GPTQ"))
    return found


def stored_by_keras(layer) -> bool:
    """Whether a layer GPTQ solved is stored by Keras' own quantized layer, on GPTQ's grid:
    one a custom layer builds (only Keras can quantize it in place), or an EinsumDense (whose
    solved matrix view is its equation's, not that of kshrink's quantized EinsumDense)."""
    return bool(owner_of(layer)) or isinstance(layer, keras.layers.EinsumDense)


def _grid_reason(layer, plan) -> str | None:
    """Why Keras cannot store `layer` on GPTQ's grid, or None."""
    if not keras_quantizes(layer):
        return "layers inside custom layers that Keras does not quantize"
    if plan.mode == "int4" and plan.group_size:
        return (f"grouped int4 of {type(layer).__name__} inside custom layers or as "
                "EinsumDense (Keras stores it with zero points); use group_size null")
    return None
