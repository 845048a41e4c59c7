"""`compress`: apply a recipe to a copy of a model, step by step, and report what was done."""

from __future__ import annotations

import keras
import numpy as np

from kshrink.core.data import check_data, example_count, model_inputs
from kshrink.core.graph import copy_model, leaf_layers
from kshrink.core.recipe import Recipe
from kshrink.core.report import CompressionReport
from kshrink.core.technique import StepContext, handler_for
from kshrink.core.training import FineTune, check_finite_weights
from kshrink.core.training import fine_tune as run_fine_tune
from kshrink.errors import KshrinkError
from kshrink.measure.weights import weight_stats
from kshrink.reconstruct import reestimate_batchnorm

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
    """BatchNorm statistics of the compressed model corrected on calibration data: a step that
    moved weights without training shifts every later layer's input statistics (one-shot
    pruning of a pretrained BN network otherwise loses nearly all agreement), and the shift
    against the original model is measured and undone (see `reestimate_batchnorm`). By
    default the new
    statistics are kept only if they bring the outputs closer to the original model's on the
    calibration data; `reestimate_batchnorm=True` keeps them regardless."""
    if data is None:
        raise KshrinkError("reestimate_batchnorm needs data: pass data=(x, y) (or just x)")
    x = model_inputs(data, CALIBRATION_SAMPLES)
    layers = [l for l in leaf_layers(model) if isinstance(l, keras.layers.BatchNormalization)]
    if not layers:
        return
    saved = [(v, keras.ops.convert_to_numpy(v.value)) for l in layers
             for v in (l.moving_mean, l.moving_variance)]
    reference = _outputs(ctx.original, x)
    before = _relative_error(reference, _outputs(model, x))
    reestimate_batchnorm(model, x, reference=ctx.original)
    after = _relative_error(reference, _outputs(model, x))
    count = f"{example_count(x)} examples, {len(layers)} layer{'s' if len(layers) > 1 else ''}"
    if technique.reestimate_batchnorm is None and after >= before:
        for variable, value in saved:
            variable.assign(value)
        note = (f"BatchNorm statistics kept: re-estimating them ({count}) did not bring the "
                f"outputs closer to the original's")
    else:
        note = (f"BatchNorm statistics re-estimated ({count}): output error vs the original "
                f"{before:.3g} -> {after:.3g}")
    ctx.summary = f"{ctx.summary}; {note}" if ctx.summary else note


def _outputs(model, x) -> np.ndarray:
    out = model.predict(x, batch_size=32, verbose=0)
    return np.concatenate([np.asarray(o, dtype="float64").reshape(len(o), -1)
                           for o in keras.tree.flatten(out)], axis=1)


def _relative_error(reference: np.ndarray, outputs: np.ndarray) -> float:
    """Squared error of `outputs` relative to the energy of `reference`."""
    return float(np.sum((outputs - reference) ** 2) / max(np.sum(reference ** 2), 1e-30))
