"""`Prune(method="wanda" | "sparsegpt")`: masks and kept weights chosen layer by layer from
calibration data (see `kshrink.reconstruct`), at the sparsity the magnitude masks gave each
layer."""

from __future__ import annotations

import keras
import numpy as np

from kshrink.core.graph import copy_model, leaf_layers, owner_of, path_of
from kshrink.core.progress import within
from kshrink.layers import PruneWrapper, from_matrix, output_axes
from kshrink.prune.allocate import by_magnitude
from kshrink.reconstruct import (
    calibration_inputs,
    input_hessians,
    reconstruct,
    solve_alone,
    sparsegpt,
    unsupported,
    wanda,
)
from kshrink.reconstruct.blocks import Free, Masked, describe, reconstruct_blocks
from kshrink.reconstruct.solvers import ungrouped

def prune_from_calibration(model, config, ctx, unpruned) -> None:
    """Re-chooses, in place, the masks and kept weights of every `PruneWrapper` of `model`
    that the method takes; the others keep their magnitude masks, recorded in
    `ctx.state.methods`.

    Each layer is solved toward the output of `unpruned` (`unmasked(model)` before any
    weight was zeroed).
    """
    x = calibration_inputs(ctx.data, config.calibration_samples,
                           f"prune: method {config.method}")
    wrappers = {w.layer.name: w for w in leaf_layers(model) if isinstance(w, PruneWrapper)}
    methods, targets = {}, []
    for wrapper in wrappers.values():
        reason = unsupported(wrapper.layer)
        if reason:
            methods[path_of(wrapper.layer)] = f"magnitude: {config.method} does not take {reason}"
        else:
            targets.append((wrapper, wrapper.layer))
    ctx.state.methods = methods
    pattern = config.pattern_spec
    n_of_m = (pattern.n, pattern.m) if pattern.is_n_of_m else None

    def solve(layer, name, weights, hessian):
        wrapper = wrappers[layer.name]
        mask = next(m for w, m in zip(wrapper.pruned, wrapper.masks) if w.name == name)
        sparsity = 1.0 - float(np.mean(keras.ops.convert_to_numpy(mask.value)))
        if config.method == "sparsegpt":
            new = sparsegpt(weights, hessian, sparsity, n_of_m=n_of_m)
        else:
            new = wanda(weights, hessian, sparsity, n_of_m=n_of_m)
        axes = output_axes(layer, name)
        kept = (ungrouped(new) != 0).astype(mask.dtype)
        mask.assign(from_matrix(kept, tuple(mask.shape), axes))
        return new

    reconstruct(model, x, targets, solve, original=unpruned,
                progress=within(ctx.progress, f"prune, {config.method}"))


def pruned_alone(model, layers, config, x):
    """`prune(layer, sparsity)` for the probe of scope sensitivity: prunes one of `layers` in
    place as `config.method` would, alone, on its inputs in `model` (SparseGPT's update of
    the kept weights included); by magnitude where the method does not reach."""
    magnitude = by_magnitude(config.pattern_spec)
    if config.method == "magnitude":
        return magnitude
    solver = sparsegpt if config.method == "sparsegpt" else wanda
    hessians = input_hessians(model, x, [l for l in layers if not owner_of(l)])

    def prune(layer, sparsity: float) -> None:
        if not owner_of(layer) and layer.name in hessians:
            solve_alone(layer, hessians[layer.name], lambda w, h: solver(w, h, sparsity))
        else:
            magnitude(layer, sparsity)

    return prune


def refit_blocks(model, config, ctx, unpruned, in_place=()) -> None:
    """Fits, block by block and in place, the kept weights and the biases of every pruned
    layer of `model` (wrapped in `PruneWrapper`s, or pruned in place inside custom layers:
    `in_place`, with the same `pruned` and `masks`; masks fixed) toward the block outputs of
    `unpruned` on calibration data (AdaPrune, Hubara et al. 2021, over blocks as BRECQ fits
    them)."""
    x = calibration_inputs(ctx.data, config.calibration_samples, "prune: refit")
    masks = {}
    handles = [w for w in leaf_layers(model) if isinstance(w, PruneWrapper)] + list(in_place)
    for handle in handles:
        for weight, mask in zip(handle.pruned, handle.masks):
            masks[id(weight)] = keras.ops.convert_to_numpy(mask.value)

    def fits(layer):
        kept = [Masked(w, masks[id(w)]) for w in layer.weights if id(w) in masks]
        bias = getattr(layer, "bias", None)
        return kept + [Free(bias)] if kept and bias is not None else kept

    rows = reconstruct_blocks(model, unpruned, x, fits, steps=config.iterations,
                              progress=within(ctx.progress, "prune, refit"))
    ctx.note(f"refit: {describe(rows, config.iterations, 'as pruned', 'fitted')}")


def unmasked(model):
    """A copy of the wrapped `model` whose masks keep everything: the model before pruning,
    in the same graph."""
    copy = copy_model(model)
    for layer in leaf_layers(copy):
        if isinstance(layer, PruneWrapper):
            for mask in layer.masks:
                mask.assign(keras.ops.ones(mask.shape, mask.dtype))
    return copy
