"""`compress`: apply a recipe to a copy of a model, step by step, and report what was done."""

from __future__ import annotations

import keras

from kshrink.core.data import check_data, example_count, model_inputs
from kshrink.core.graph import copy_model
from kshrink.core.recipe import Recipe
from kshrink.core.report import CompressionReport
from kshrink.core.technique import StepContext, handler_for
from kshrink.core.training import FineTune, check_finite_weights
from kshrink.core.training import fine_tune as run_fine_tune
from kshrink.errors import KshrinkError
from kshrink.measure.weights import weight_stats
from kshrink.reconstruct import correct_batchnorm

CALIBRATION_SAMPLES = 512  # examples BatchNorm statistics are re-estimated on


def compress(model: keras.Model, recipe, *, data=None, validation_data=None,
             fine_tune: FineTune | None = None):
    """Compresses a copy of `model` with `recipe`; `model` itself is never modified.

    Args:
        model: a built Sequential or functional Keras model (nested models are fine).
        recipe: a `Recipe`, a technique config (e.g. `kshrink.Quantize()`), a list of them, the
            recipe's data form (`[{"quantize": {"mode": "int8"}}]`) or a JSON/YAML file path.
        data: `(x, y)` for techniques that train or calibrate.
        validation_data: held-out `(x, y)`, for early stopping and progress.
        fine_tune: how to train between each technique's prepare and finalize (default: the
            recipe's `fine_tune`, else no training). Needs `data`.

    Returns:
        `(compressed_model, CompressionReport)`.

    Example:

    ```python
    small, report = kshrink.compress(model, [kshrink.Quantize(mode="int8")])
    print(report)
    ```
    """
    recipe = Recipe.coerce(recipe)
    fine_tune = fine_tune or recipe.fine_tune
    check_data(data, model, "data")
    check_data(validation_data, model, "validation_data")
    if fine_tune is not None and data is None:
        raise KshrinkError("fine-tuning needs training data: pass data=(x, y)")
    work = copy_model(model)
    check_finite_weights(work, "in the model to compress")
    before = weight_stats(work)
    steps = []
    for technique in recipe:
        handler = handler_for(technique)
        trains = fine_tune is not None and handler.trains_with(technique)
        ctx = StepContext(original=model, data=data, validation_data=validation_data,
                          train_steps=(fine_tune.total_steps(example_count(model_inputs(data)))
                                       if trains else None))
        work = handler.prepare(work, technique, ctx)
        if trains:
            run_fine_tune(work, fine_tune, data, validation_data, teacher=model,
                          callbacks=handler.callbacks(work, technique, ctx))
        work = handler.finalize(work, technique, ctx)
        if technique.reestimates_batchnorm(data is not None, trains):
            _reestimate_batchnorm(work, data, technique, ctx)
        steps.append(handler.report(work, technique, ctx))
    after = weight_stats(work)
    report = CompressionReport(
        steps=tuple(steps),
        parameters_before=before.parameters,
        parameters_after=after.parameters,
        weight_bytes_before=before.bytes,
        weight_bytes_after=after.bytes,
    )
    return work, report


def _reestimate_batchnorm(model, data, technique, ctx: StepContext) -> None:
    if data is None:
        raise KshrinkError("reestimate_batchnorm needs data: pass data=(x, y) (or just x)")
    note = correct_batchnorm(model, ctx.original, model_inputs(data, CALIBRATION_SAMPLES),
                             only_if_closer=technique.reestimate_batchnorm is None)
    if note:
        ctx.summary = f"{ctx.summary}; {note}" if ctx.summary else note
