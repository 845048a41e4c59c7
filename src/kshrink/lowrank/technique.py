"""The `low_rank` technique: Dense and Conv2D layers factorized into two thinner layers."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from kshrink.core.data import model_inputs
from kshrink.core.graph import (
    encoder_reasons,
    inline_encoders,
    is_functional,
    is_plain,
    owner_of,
    path_of,
    rewrite,
)
from kshrink.core.progress import counting
from kshrink.core.select import Select
from kshrink.core.options import Int, Number, calibration_option, option, selection
from kshrink.core.technique import Handler, Stage, StepContext, Technique, register_technique
from kshrink.errors import KshrinkError, RecipeError
from kshrink.layers import factor
from kshrink.layers.transformer import FEEDFORWARD, copy_parts, is_encoder, stock_parts
from kshrink.lowrank.factorize import (
    Factorization,
    factorized,
    parameters,
    rank_for_tolerance,
)
from kshrink.reconstruct.sequential import visit_inputs


class LowRankHandler(Handler):
    """Runs `LowRank`: replaces each chosen layer by two thinner ones where that is smaller."""

    trains = True

    def prepare(self, model, config: LowRank, ctx: StepContext):
        original = model
        if not is_plain(model) and is_functional(model):  # a keras-hub Backbone: its graph
            model = keras.Model(model.input, model.output, name=model.name)
        top_level = {id(layer) for layer in model.layers}
        blocks = _encoder_parts(model)

        def reason(layer):
            if factor.refusal(layer):
                return factor.refusal(layer)
            if id(layer) in blocks:
                return None
            if owner_of(layer):
                return f"{owner_of(layer)}: a factorized layer is two layers, and this one " \
                       "can only change in place"
            return "inside a nested model" if id(layer) not in top_level else None

        chosen = ctx.choose_layers(model, config.layers, config.exclude, reason,
                                   in_place=lambda layer: id(layer) in blocks)
        plain, parts = model, {}
        if any(id(layer) in blocks for layer in chosen):
            # Encoders holding a chosen layer, rebuilt as stock layers: theirs are top-level.
            model, parts = _rebuilt(model, {id(blocks[id(l)]) for l in chosen if id(l) in blocks})
            copies = {id(getattr(block, part)): built[part] for block, built in parts.values()
                      for part in FEEDFORWARD}
            chosen = [copies.get(id(layer), layer) for layer in chosen]
        inputs = {}
        if config.tolerance is not None and chosen:
            if ctx.data is None:
                raise KshrinkError("low_rank: tolerance measures output error on data: pass "
                                   "data=(x, y) to compress")
            x = model_inputs(ctx.data, config.calibration_samples)

            def record(layer, batches):
                inputs[layer.name] = np.concatenate([keras.ops.convert_to_numpy(b)
                                                     for b in batches])

            visit_inputs(model, x, {id(layer) for layer in chosen}, record)
        replacements = {}
        for layer in counting(ctx.progress, "low_rank: factorizing", chosen, path_of):
            svd = Factorization.of(layer)
            if config.rank is not None:
                rank, how = min(config.rank, len(svd.s)), "fixed rank"
            elif config.tolerance is not None:
                rank = rank_for_tolerance(layer, svd, inputs[layer.name], config.tolerance)
                how = f"output error <= {config.tolerance:g}"
            else:
                rank = svd.rank_for_energy(config.energy)
                how = f"{config.energy:g} of the energy"
            before, after = parameters(layer, rank)
            if after > (1 - config.min_saving) * before:
                ctx.skipped(layer, f"rank {rank} of {len(svd.s)} ({how}) would save less than "
                                   f"{config.min_saving:.0%} of the kernel")
                continue
            replacements[id(layer)] = factorized(layer, svd, rank)
            ctx.applied(layer, f"rank {rank} of {len(svd.s)} ({how}): kernel "
                               f"{before:,} -> {after:,} parameters")
        if not replacements:
            return original
        # Only the encoders with a factorized layer stay rebuilt.
        factorized_parts = {}
        for key, (_, built) in parts.items():
            if any(id(built[part]) in replacements for part in FEEDFORWARD):
                factorized_parts[key] = {name: replacements.get(id(layer), layer)
                                         for name, layer in built.items()}
        top = rewrite(plain, lambda layer: replacements.get(id(layer), layer))
        return inline_encoders(top, lambda block: factorized_parts.get(id(block)))


def _encoder_parts(model) -> dict:
    """The feed-forward Dense layers (by id) of the top-level keras-hub encoders that can be
    rebuilt as stock layers, each to its encoder."""
    reasons = encoder_reasons(model)
    return {id(getattr(block, part)): block for block in model.layers
            if is_encoder(block) and reasons.get(id(block)) is None for part in FEEDFORWARD}


def _rebuilt(model, keys: set) -> tuple:
    """`model` with the encoders `keys` (ids) rebuilt as stock layers (weights copied), and
    `{id(encoder): (encoder, its stock parts)}`."""
    parts = {}

    def parts_of(block):
        if id(block) in keys:
            parts[id(block)] = (block, stock_parts(block))
        return parts[id(block)][1] if id(block) in parts else None

    rebuilt = inline_encoders(model, parts_of)
    for block, built in parts.values():
        copy_parts(block, built)
    return rebuilt, parts


@register_technique("low_rank", handler=LowRankHandler(), stage=Stage.REWRITE)
@dataclasses.dataclass(frozen=True)
class LowRank(Technique):
    """Low-rank factorization of Dense and Conv2D layers (truncated SVD).

    Each chosen layer becomes two: Dense(rank) then Dense(units), or a k x k convolution to
    `rank` channels then a 1x1 convolution, only where that needs fewer parameters (and MACs)
    by at least `min_saving`.
    The rank comes from one knob, first set wins: `rank`, else `tolerance` (relative error of
    the layer's output on the calibration data), else `energy` (share of the squared singular
    values kept). Fine-tuning afterwards recovers most of what the truncation costs.

    Args:
        energy: keep this share of each kernel's singular-value energy.
        tolerance: largest relative output error per layer on `data`, e.g. 0.05.
        rank: one fixed rank for every chosen layer.
        min_saving: factorize a layer only if its kernel parameters drop by at least this
            share (a rank that saves little costs accuracy for nothing).
        calibration_samples: examples of `data` used with `tolerance`.
        layers: the layers to consider (default: all Dense and Conv2D).
        exclude: layers to leave alone.

    Example:

    ```python
    small, report = kshrink.compress(model, kshrink.LowRank(tolerance=0.1), data=(x, y),
                                     fine_tune=kshrink.FineTune(epochs=4))
    ```
    """

    energy: float = option(0.9, "share of singular-value energy kept", Number(0.0, 1.0))
    tolerance: float | None = option(None, "largest relative output error per layer",
                                     Number(0.0, 1.0, allow_none=True))
    rank: int | None = option(None, "one fixed rank for every chosen layer",
                              Int(low=1, allow_none=True))
    min_saving: float = option(0.25, "factorize only layers whose kernel shrinks by this share",
                               Number(0.0, 1.0, high_open=True))
    calibration_samples: int = calibration_option(512, "examples used to measure output error")
    layers: Select | None = selection("layers to consider (default: all)")
    exclude: Select | None = selection("layers to leave alone")

    def __post_init__(self):
        super().__post_init__()
        if self.energy == 0:
            raise RecipeError(f"{self.name}: energy must be above 0. Received: energy=0")
