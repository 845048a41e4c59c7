"""`compress`: apply a recipe to a copy of a model, step by step, and report what was done."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import keras

from kshrink.core.data import check_data, example_count, model_inputs, split_labels
from kshrink.core.distribute import DataParallel
from kshrink.core.graph import (
    copy_model,
    keep_layer_policies,
    leaf_layers,
    path_of,
    runnable_names,
)
from kshrink.core.progress import Console
from kshrink.core.recipe import Recipe
from kshrink.core.report import CompressionReport, StepFidelity, StepReport
from kshrink.core.stream import as_stream
from kshrink.core.technique import StepContext, handler_for
from kshrink.core.training import FineTune, check_finite_weights
from kshrink.core.training import fine_tune as run_fine_tune
from kshrink.errors import KshrinkError
from kshrink.layers.batchnorm import is_batchnorm
from kshrink.measure.accuracy import fidelity, predict
from kshrink.measure.weights import weight_drift, weight_stats
from kshrink.reconstruct import correct_batchnorm, stale_batchnorm

CALIBRATION_SAMPLES = 512  # examples BatchNorm statistics are re-estimated on
# Agreement a fine-tuned step may lose before it is warned about: fine-tuning moves away from
# the original on purpose, but not this far.
COLLAPSE = 0.1


def compress(model: keras.Model, recipe, *, data=None, validation_data=None,
             fine_tune: FineTune | None = None, fidelity_samples: int = 128,
             fidelity_tolerance: float = 0.02, progress=None, verbose: bool = True):
    """Compresses a copy of `model` with `recipe`; `model` itself is never modified.

    Args:
        model: a built Sequential or functional Keras model (nested models are fine).
        recipe: a `Recipe`, a technique config (e.g. `kshrink.Quantize()`), a list of them, the
            recipe's data form (`[{"quantize": {"mode": "int8"}}]`) or a JSON/YAML file path.
        data: for techniques that train or calibrate: arrays (`(x, y)`, or `x` alone for
            calibration; `x` may be a dict of arrays by input name, or a list of one array
            per input: `[x1, x2]` alone is a two-input model's inputs), or a stream: a
            `tf.data.Dataset` (batched or not), `keras.utils.PyDataset`, torch `DataLoader`
            or generator of `(x, y)` batches. Fine-tuning streams it; calibration and checks
            read its first examples only (at most 2,048, and at most 256 MB of them).
        validation_data: held-out data in the same forms, for early stopping and progress.
        fine_tune: how to train between each technique's prepare and finalize (default: the
            recipe's `fine_tune`, else no training). Needs `data`.
        fidelity_samples: with data, after every step the outputs are compared with the
            original's on this many examples (the last ones of `validation_data`, else of
            `data`); 0 turns it off.
        fidelity_tolerance: a step that does not fine-tune and lowers top-1 agreement with
            the original (for a model that is not a classifier, the outputs' cosine) by more
            than this gets a one-line warning naming the layers whose weights moved most and
            what to try. A fine-tuned step moves away from the original on purpose: it is
            warned about only when agreement collapses (drops by more than
            `COLLAPSE`, 0.1).
        progress: called with a short message as the work advances (each step, each layer a
            calibration method solves, each block scored), e.g. `print`; None: `verbose`
            decides.
        verbose: with no `progress`, show it on stderr: a bar for counted work on a
            terminal, otherwise one line per stage (`kshrink.core.progress.Console`), and
            Keras' own progress while fine-tuning as `FineTune(verbose)` says. False for
            silence (warnings still show).

    Returns:
        `(compressed_model, CompressionReport)`. The model is compiled as `model` was (same
        loss and metrics, a fresh optimizer of the same class), or uncompiled if it was not.

    Example:

    ```python
    small, report = kshrink.compress(model, [kshrink.Quantize(mode="int8")])
    print(report)
    ```
    """
    if progress is None and verbose:
        with Console() as console:
            return compress(model, recipe, data=data, validation_data=validation_data,
                            fine_tune=fine_tune, fidelity_samples=fidelity_samples,
                            fidelity_tolerance=fidelity_tolerance, progress=console)
    recipe = Recipe.coerce(recipe)
    model, _ = runnable_names(model)
    data, validation_data = split_labels(data, model), split_labels(validation_data, model)
    fine_tune = fine_tune or recipe.fine_tune
    if fine_tune is not None and not verbose:
        fine_tune = dataclasses.replace(fine_tune, verbose=False)
    steps_per_epoch = fine_tune.steps_per_epoch if fine_tune else None
    stream = as_stream(data, model, steps_per_epoch)
    validation_stream = as_stream(validation_data, model)
    # Calibration and checks read a stream's first examples, held as arrays.
    train = split_labels(stream.head(), model) if stream else data
    held_out = split_labels(validation_stream.head(), model) if validation_stream else \
        validation_data
    check_data(train, model, "data")
    check_data(held_out, model, "validation_data")
    if fine_tune is not None and data is None:
        raise KshrinkError("fine-tuning needs training data: pass data=(x, y)")
    if not isinstance(fidelity_samples, int) or fidelity_samples < 0:
        raise KshrinkError("fidelity_samples must be a whole number >= 0. Received: "
                           f"fidelity_samples={fidelity_samples!r}")
    parallel = DataParallel() if fine_tune is not None and fine_tune.distribution else None
    if parallel is not None:
        parallel.check_batch_size(fine_tune.batch_size)
    probe = _FidelityProbe.of(model, train if held_out is None else held_out, fidelity_samples,
                              held_back=held_out is not None, tolerance=fidelity_tolerance)
    work = copy_model(model)
    check_finite_weights(work, "in the model to compress")
    before = weight_stats(work)
    steps, settled = [], set()  # settled: paths of layers earlier steps pruned or shared
    for technique in recipe:
        handler = handler_for(technique)
        trains = fine_tune is not None and handler.trains_with(technique)
        if progress:
            progress(technique.name)
        ctx = StepContext(original=model, data=train, validation_data=held_out,
                          progress=progress, state=handler.State(),
                          train_steps=fine_tune.total_steps(stream or train) if trains else None)
        distributed = trains and parallel is not None
        with parallel.training(work) if distributed else contextlib.nullcontext(work) as work:
            work = handler.prepare(work, technique, ctx)
            if trains:
                if progress:  # the stage lasts as long as training: its line shows
                    progress(f"{technique.name}: fine-tuning"
                             + (f", {parallel}" if parallel else ""))
                with _frozen(work, settled):
                    run_fine_tune(work, fine_tune, stream or train,
                                  validation_stream or held_out, teacher=model,
                                  callbacks=handler.callbacks(work, technique, ctx),
                                  parallel=parallel)
        work = handler.finalize(work, technique, ctx)
        stale = trains and stale_batchnorm(work, ctx.train_steps)
        reestimated = technique.reestimates_batchnorm(data is not None, trains, bool(stale))
        if reestimated:
            _reestimate_batchnorm(work, train, technique, ctx, trains, stale)
        step = handler.report(work, technique, ctx)
        if handler.settles:
            settled |= {result.layer for result in step.applied}
        if probe is not None:
            step = probe.measure(step, work, technique, trains, reestimated,
                                 distilled=trains and fine_tune.distill)
        if step.skipped and not step.applied:
            first = step.skipped[0]
            warnings.warn(f"{technique.name} changed no layer ({len(step.skipped)} skipped; the "
                          f"first, {first.layer}: {first.detail})", stacklevel=3)
        steps.append(step)
    if work.compiled or parallel is not None:
        # Fine-tuning compiled it, and Keras' clone_model compiles its clones alike: the
        # optimizer would ride into the saved file (Adam: twice the weights). A copy made out
        # of a strategy's scope is a plain model again.
        work = copy_model(work)
    keep_layer_policies(work)
    if model.compiled:
        _compile_like(work, model)
    after = weight_stats(work)
    report = CompressionReport(
        steps=tuple(steps),
        parameters_before=before.parameters,
        parameters_after=after.parameters,
        weight_bytes_before=before.bytes,
        weight_bytes_after=after.bytes,
    )
    return work, report


def _compile_like(model, original) -> None:
    """Compiles `model` as `original` was (loss, metrics, an optimizer of the same class and
    settings, fresh): the result evaluates and trains on as the original did."""
    try:
        config = keras.saving.deserialize_keras_object(original.get_compile_config())
        model.compile(**config)
    except Exception as e:  # a custom loss or metric Keras cannot rebuild by name
        warnings.warn(f"the compressed model is not compiled: its original's compile "
                      f"settings could not be rebuilt ({' '.join(str(e).split())[:160]}); "
                      "call compile() on it before evaluate() or fit()", stacklevel=3)


def _remedy(model, technique, trained: bool, reestimated: bool, distilled: bool) -> str:
    """What to try after a step that lost agreement, as the option to pass."""
    has_batchnorm = any(map(is_batchnorm, leaf_layers(model)))
    more = ("more epochs or a milder setting (FineTune(epochs=...))" if distilled else
            "distillation or more epochs (FineTune(distill=True, epochs=...))")
    if trained:
        if has_batchnorm and not reestimated:
            return f"try reestimate_batchnorm=True on the {technique.name} step, then {more}"
        return f"try {more}"
    return ("try a milder setting, exclude those layers (exclude={'names': [...]}), a "
            "calibration method (method=...) or fine-tuning (fine_tune=FineTune(...))")


@contextlib.contextmanager
def _frozen(model, settled: set):
    """Holds the layers of `settled` (paths) that this step did not wrap frozen while it
    trains: training would undo the zeros or the shared values an earlier step left in them
    (the layers a step wraps keep those themselves, e.g. `preserve_sparsity`)."""
    wrappers = [l for l in leaf_layers(model) if isinstance(l, keras.layers.Wrapper)]
    wrapped = {id(w.layer) for w in wrappers} | {id(w) for w in wrappers}
    frozen = [l for l in leaf_layers(model)
              if path_of(l) in settled and id(l) not in wrapped and l.trainable]
    for layer in frozen:
        layer.trainable = False
    try:
        yield
    finally:
        for layer in frozen:
            layer.trainable = True


def _reestimate_batchnorm(model, data, technique, ctx: StepContext, trained: bool,
                          stale) -> None:
    if data is None:
        raise KshrinkError("reestimate_batchnorm needs data: pass data=(x, y) (or just x)")
    note = correct_batchnorm(model, ctx.original, model_inputs(data, CALIBRATION_SAMPLES),
                             only_if_closer=technique.reestimate_batchnorm is None,
                             trained=trained)
    if note and stale:
        momentum = float(stale.momentum)
        note += (f" after {ctx.train_steps} fine-tune steps, too few for momentum {momentum:g}: "
                 f"{stale.name} still held {momentum ** ctx.train_steps:.0%} of its old "
                 "statistics")
    if note:
        ctx.summary = f"{ctx.summary}; {note}" if ctx.summary else note


class _FidelityProbe:
    """The original's outputs on a few examples, to score each step's model against."""

    def __init__(self, original, x, held_back: bool, tolerance: float):
        self.original, self.x, self.held_back = original, x, held_back
        self.tolerance = tolerance
        self.reference = predict(original, x)
        self.last = 1.0

    @classmethod
    def of(cls, original, data, samples: int, *, held_back: bool, tolerance: float):
        if data is None or samples == 0:
            return None
        x = model_inputs(data)
        n = example_count(x)
        count = min(samples, n)
        # The last examples: calibration reads the first ones, so they are held back when
        # there are enough.
        held_back = held_back or n - count >= CALIBRATION_SAMPLES
        x = keras.tree.map_structure(lambda v: v[n - count:], x)
        return cls(original, x, held_back, tolerance)

    def measure(self, step: StepReport, model, technique, trained: bool,
                reestimated: bool, distilled: bool) -> StepReport:
        f = fidelity(self.reference, predict(model, self.x))
        result = StepFidelity(example_count(self.x), self.held_back, round(f.cosine, 6),
                              None if f.top1_agreement is None else round(f.top1_agreement, 6))
        warning = None
        if self.last - result.score > (COLLAPSE if trained else self.tolerance):
            measure = "cosine" if result.agreement is None else "top-1 agreement"
            warning = (f"{step.technique}{' (fine-tuned)' if trained else ''} lowered "
                       f"{measure} with the original from {self.last:.3f} to "
                       f"{result.score:.3f}")
            if not trained:
                moved = [(path, change) for path, change in
                         weight_drift(self.original, model)[:3] if change >= 0.005]
                if moved:
                    warning += "; weights moved most in " + ", ".join(
                        f"{path} ({change:.0%})" for path, change in moved)
            warning += "; " + _remedy(model, technique, trained, reestimated, distilled)
            warnings.warn(warning, stacklevel=3)
        self.last = result.score
        return dataclasses.replace(step, fidelity=dataclasses.replace(result, warning=warning))
