"""The one fine-tune loop every technique shares: `model.fit` with the technique's callbacks,
an optional teacher (the original model) through `keras.distillation.Distiller`, and early
stopping on validation data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys

import keras
import numpy as np

from kshrink.core.data import example_count, labels_of, model_inputs
from kshrink.core.distill import LayerwiseDistiller, matched_blocks
from kshrink.core.distribute import DISTRIBUTIONS, DataParallel
from kshrink.core.graph import copy_model, leaf_layers
from kshrink.core.select import Select
from kshrink.core.stream import Stream
from kshrink.core.options import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_SEED,
    MAX_STEPS,
    Flag,
    Int,
    Number,
    OneOf,
    Options,
    option,
    selection,
)
from kshrink.errors import KshrinkError, RecipeError, short
from kshrink.layers.internals import build_for_fit
from kshrink.layers.specs import outputs_softmax

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = ("mixed_float16", "mixed_bfloat16")
DISTILL = (False, True, "outputs", "features")


def _check_loss(owner: str, key: str, loss):
    """`auto` or a loss Keras knows by name; anything else is a one-line error now, not a
    traceback from inside `fit` later."""
    if loss == "auto":
        return loss
    try:
        known = isinstance(loss, str) and keras.losses.get(loss) is not None
    except (ValueError, TypeError):
        known = False
    if not known:
        raise RecipeError(f"{owner}: {key} must be auto or a Keras loss name (e.g. "
                          f"sparse_categorical_crossentropy, mse). Received: "
                          f"{key}={short(loss)}")
    return loss


def _check_distill(owner: str, key: str, distill):
    # A bool or a string: 1 == True would otherwise pass as a member of DISTILL.
    if not isinstance(distill, (bool, str)) or distill not in DISTILL:
        raise RecipeError(f"{owner}: {key} must be one of false, true, outputs or features. "
                          f"Received: {key}={short(distill)}")
    return distill


@dataclasses.dataclass(frozen=True)
class FineTune(Options):
    """How `compress` trains between a technique's `prepare` and `finalize`.

    Args:
        epochs: passes over the training data for each technique that trains.
        batch_size: examples per optimizer step.
        learning_rate: initial learning rate.
        optimizer: `"adam"`, `"adamw"` or `"sgd"` (with momentum 0.9).
        lr_schedule: `"cosine"` (decay to 0 over the run) or `"constant"`.
        loss: a Keras loss name, or `"auto"`: (sparse) categorical cross-entropy, from
            logits unless the original model ends in a softmax.
        distill: learn from the original model too (knowledge distillation): `"outputs"`
            (or `True`) from its outputs, `"features"` also from the outputs of its blocks
            (transformer encoders, residual merges), matched by name, TinyBERT-style (see
            `kshrink.core.distill`). `False`: from the labels only. With distillation the data
            may hold inputs only (an encoder without a head has no labels).
        temperature: softening temperature for distilling class logits.
        distill_weight: weight of the distillation loss; the label loss gets the rest.
        shuffle: shuffle the training data every epoch.
        early_stopping: stop after this many epochs without a better validation loss
            (restoring the best weights); null for no early stopping.
        verbose: show Keras' progress while training.
        steps_per_epoch: batches per epoch: needed when data is a generator or an infinite
            dataset, and a limit on each epoch otherwise (default: the whole data).
        clipnorm: clip each gradient to this norm (null: no clipping).
        clipvalue: clip each gradient value to [-clipvalue, clipvalue] (null: none).
        weight_decay: decoupled weight decay of the optimizer (null: none; `adamw` defaults
            to Keras' 0.004).
        distribution: `"data_parallel"`: train on every local device at once, each on its
            slice of every batch (`keras.distribution.DataParallel` on JAX, across hosts after
            `keras.distribution.initialize()`; `tf.distribute.MirroredStrategy` on
            TensorFlow); `batch_size` must be a multiple of the device count. Null: one
            device.
        mixed_precision: `"mixed_bfloat16"` or `"mixed_float16"`: compute in 16 bits while
            fine-tuning, keeping every variable (weights, masks, quantizer ranges) in float32;
            float16 scales the loss against underflow. The result computes in float32 again.
        freeze: layers whose weights fine-tuning leaves as they are, e.g.
            `Select(types=("ReversibleEmbedding",))`: a transformer's token table, half of a
            small encoder's weights, which structured and depth pruning do not change and
            whose optimizer update is a large share of each step on a CPU. Null: train all.
        seed: seed Keras' random generators (Python, numpy and the backend's) with this before
            each fine-tune, so that a run repeats: the same data and recipe give the same
            weights (up to the backend's float rounding). Null: leave them as they are.

    Example:

    ```python
    kshrink.compress(model, kshrink.Prune(sparsity=0.9), data=(x, y),
                     fine_tune=kshrink.FineTune(epochs=3, distill=True))
    ```
    """

    name = "fine_tune"

    epochs: int = option(1, "passes over the training data per technique",
                         Int(low=1, high=MAX_EPOCHS))
    batch_size: int = option(128, "examples per step", Int(low=1, high=MAX_BATCH))
    learning_rate: float = option(1e-3, "initial learning rate", Number(1e-9, 10.0))
    optimizer: str = option("adam", "adam, adamw or sgd", OneOf(OPTIMIZERS))
    lr_schedule: str = option("cosine", "cosine or constant", OneOf(LR_SCHEDULES))
    loss: str = option("auto", "a Keras loss name, or auto", _check_loss)
    distill: bool | str = option(False, "learn from the original: outputs (true) or features",
                                 _check_distill)
    temperature: float = option(4.0, "distillation temperature", Number(1e-3, 1e3))
    distill_weight: float = option(0.5, "weight of the distillation loss", Number(0, 1))
    shuffle: bool = option(True, "shuffle the training data every epoch", Flag())
    early_stopping: int | None = option(None, "patience in epochs on validation loss",
                                        Int(low=1, high=MAX_EPOCHS, allow_none=True))
    verbose: bool = option(True, "show training progress", Flag())
    steps_per_epoch: int | None = option(None, "batches per epoch (default: all the data)",
                                         Int(low=1, high=MAX_STEPS, allow_none=True))
    clipnorm: float | None = option(None, "clip each gradient to this norm",
                                    Number(1e-9, 1e9, allow_none=True))
    clipvalue: float | None = option(None, "clip gradient values to +-this",
                                     Number(1e-9, 1e9, allow_none=True))
    weight_decay: float | None = option(None, "decoupled weight decay",
                                        Number(0.0, 1.0, allow_none=True))
    distribution: str | None = option(None, "data_parallel: train on every local device",
                                      OneOf(DISTRIBUTIONS, allow_none=True))
    mixed_precision: str | None = option(None, "mixed_bfloat16 or mixed_float16 compute",
                                         OneOf(MIXED_PRECISION, allow_none=True))
    freeze: Select | None = selection("layers whose weights stay as they are")
    seed: int | None = option(None, "seed the random generators before each fine-tune",
                              Int(low=0, high=MAX_SEED, allow_none=True))

    @property
    def distillation(self) -> str | None:
        """`"outputs"`, `"features"`, or None for no distillation."""
        return {False: None, True: "outputs"}.get(self.distill, self.distill)

    def total_steps(self, data) -> int:
        """Optimizer steps over the run, for `data` (arrays, or a `Stream`)."""
        if isinstance(data, Stream):
            return self.epochs * data.steps_per_epoch(self.batch_size)
        per_epoch = math.ceil(example_count(model_inputs(data)) / self.batch_size)
        return self.epochs * min(per_epoch, self.steps_per_epoch or per_epoch)


def fine_tune(model: keras.Model, config: FineTune, data, validation_data=None, *,
              teacher: keras.Model | None = None, callbacks=(),
              parallel: DataParallel | None = None) -> keras.Model:
    """Trains `model` in place with `config` and returns it.

    Args:
        model: the model to train (kshrink's working copy, possibly with wrapped layers).
        config: the fine-tune options.
        data: `(x, y)` training data, or a `Stream` (see `kshrink.core.stream`).
        validation_data: `(x, y)` or a `Stream`, for early stopping and progress, or None.
        teacher: the original model; needed for `config.distill` and for `loss="auto"`.
            It is copied, never trained.
        callbacks: the technique's callbacks (e.g. the pruning schedule).
        parallel: the data-parallel engine `compress` made (and, on TensorFlow, created the
            model's variables under); made here for `config.distribution` otherwise.
    """
    if config.distribution and parallel is None:
        parallel = DataParallel()
    if parallel is not None:
        parallel.check_batch_size(config.batch_size)
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    streamed = isinstance(data, Stream)
    head = data.head() if streamed else data  # a stream's first labels choose the loss
    x, y = model_inputs(head), labels_of(head)
    distillation = config.distillation
    if y is None and distillation is None:
        raise KshrinkError("fine-tuning needs labels: pass data=(x, y), or learn from the "
                           "original model alone with FineTune(distill='outputs' or "
                           "'features')")
    reference = teacher if teacher is not None else model
    steps = config.total_steps(data)
    rate = (keras.optimizers.schedules.CosineDecay(config.learning_rate, steps)
            if config.lr_schedule == "cosine" else config.learning_rate)
    options = {key: getattr(config, key) for key in ("clipnorm", "clipvalue", "weight_decay")
               if getattr(config, key) is not None}
    optimizer = {  # made in the scope fit runs in, like the rest of the training state
        "adam": lambda: keras.optimizers.Adam(rate, **options),
        "adamw": lambda: keras.optimizers.AdamW(rate, **options),
        "sgd": lambda: keras.optimizers.SGD(rate, momentum=0.9, **options),
    }[config.optimizer]
    loss = task_loss(reference, y, config.loss) if y is not None else None
    trainer, compiled = model, dict(loss=loss, metrics=["accuracy"])
    if distillation is not None:
        if teacher is None:
            raise ValueError("fine_tune: distill needs the original model as teacher")
        trainer = _distiller(copy_model(teacher), model, config, loss)
        if isinstance(trainer, LayerwiseDistiller):
            compiled = {}  # its loss is its own; its outputs include block features
    all_callbacks = list(callbacks)
    if config.early_stopping and validation_data is not None:
        all_callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.early_stopping, restore_best_weights=True))
    verbose = (1 if sys.stdout.isatty() else 2) if config.verbose else 0
    all_callbacks.append(keras.callbacks.TerminateOnNaN())
    split = parallel.split_over if parallel is not None else 1
    validation_steps = None
    if isinstance(validation_data, Stream):
        validation_data, validation_steps = validation_data.for_fit(config.batch_size, split)
    elif parallel is not None:
        validation_data = parallel.even(validation_data)
    if streamed:  # batches come as the stream makes them; shuffling is the stream's
        source, steps_per_epoch = data.for_fit(config.batch_size, split)
        run = dict(x=source, steps_per_epoch=steps_per_epoch, shuffle=False)
    else:
        if parallel is not None:
            x, y = parallel.even((x, y))
        run = dict(x=x, y=y, batch_size=config.batch_size, shuffle=config.shuffle,
                   steps_per_epoch=config.steps_per_epoch)
    scope = parallel.fit_scope(trainer) if parallel is not None else contextlib.nullcontext()
    with _computing_in(trainer, config.mixed_precision), _frozen(model, config.freeze), scope:
        trainer.compile(optimizer=optimizer(), **compiled)
        build_for_fit(trainer, (x, y))
        history = trainer.fit(epochs=config.epochs, validation_data=validation_data,
                              validation_steps=validation_steps, callbacks=all_callbacks,
                              verbose=verbose, **run)
    if not all(np.isfinite(v) for v in history.history.get("loss", [])):
        raise KshrinkError("fine-tuning diverged: the loss became NaN or Inf, so nothing is "
                           "kept. Lower the learning rate (FineTune(learning_rate=...)) or "
                           "check the data")
    check_finite_weights(model, "after fine-tuning")
    return model


def _distiller(teacher: keras.Model, student: keras.Model, config: FineTune, loss):
    """The model `fit` trains to distill `teacher` into `student` as `config` says: Keras'
    `Distiller` for outputs with labels, kshrink's `LayerwiseDistiller` for block features or
    for data without labels."""
    probabilities = _ends_in_softmax(teacher)
    logits = _OutputDistillation(config.temperature, probabilities)
    if config.distillation == "outputs" and loss is not None:
        return keras.distillation.Distiller(
            teacher=teacher, student=student, distillation_losses=logits,
            student_loss_weight=1 - config.distill_weight)
    pairs = matched_blocks(teacher, student) if config.distillation == "features" else []
    return LayerwiseDistiller(
        teacher, student, pairs,
        output_loss=logits.compute_loss if _is_cross_entropy(loss) else "mse",
        label_loss=loss, label_weight=1 - config.distill_weight)


def _is_cross_entropy(loss) -> bool:
    name = getattr(loss, "__name__", type(loss).__name__)
    return loss is not None and "crossentropy" in name.lower()


@contextlib.contextmanager
def _frozen(model: keras.Model, select: Select | None):
    """The layers `select` chooses in `model` hold their weights for the duration."""
    layers = [] if select is None else [
        layer for layer in select.resolve(leaf_layers(model)) if layer.trainable]
    for layer in layers:
        layer.trainable = False
    try:
        yield
    finally:
        for layer in layers:
            layer.trainable = True


@contextlib.contextmanager
def _computing_in(model: keras.Model, policy: str | None):
    """Every float32 layer of `model` (sublayers included) computes in `policy` for the
    duration; variables stay float32. Quantized layers keep their own policies."""
    if policy is None:
        yield
        return
    layers = [layer for layer in model._flatten_layers(include_self=True, recursive=True)
              if layer.dtype_policy.name == "float32"]
    for layer in layers:
        layer.dtype_policy = policy
    try:
        yield
    finally:
        for layer in layers:
            layer.dtype_policy = "float32"


def check_finite_weights(model: keras.Model, when: str) -> None:
    """Raises `KshrinkError` naming the first layer and weight holding NaN or Inf."""
    for variable in model.weights:
        values = keras.ops.convert_to_numpy(variable)  # (a scalar's .value fails mirrored)
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            layer, _, name = variable.path.rpartition("/")
            raise KshrinkError(f"layer {layer!r}: weight {name!r} holds NaN or Inf values "
                               f"{when}; nothing is written")


def _ends_in_softmax(model: keras.Model) -> bool:
    last = model.layers[-1]
    while isinstance(last, keras.Model):
        last = last.layers[-1]
    last = getattr(last, "layer", last)  # look through wrappers
    return outputs_softmax(last)


def task_loss(model: keras.Model, y, name: str = "auto"):
    """The loss `name`, or for `"auto"`: (sparse) categorical cross-entropy on `y`, from logits
    unless `model` ends in a softmax."""
    if name != "auto":
        return keras.losses.get(name)
    probabilities = _ends_in_softmax(model)
    y = np.asarray(y)
    if y.ndim <= 1 or (y.ndim == 2 and y.shape[1] == 1):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities)
    return keras.losses.CategoricalCrossentropy(from_logits=not probabilities)


class _OutputDistillation(keras.distillation.LogitsDistillation):
    """Logits distillation that also accepts softmax outputs (taking their logarithm, which
    equals the logits up to a constant that softmax ignores)."""

    def __init__(self, temperature: float, probabilities: bool):
        # A KLDivergence instance, not the "kl_divergence" default: Keras 3.15 resolves that
        # name to a plain function, misses its softmax branch, and the loss clips to zero.
        super().__init__(temperature=temperature, loss=keras.losses.KLDivergence())
        self._probabilities = probabilities

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        if self._probabilities:
            teacher_outputs = keras.ops.log(keras.ops.clip(teacher_outputs, 1e-7, 1.0))
            student_outputs = keras.ops.log(keras.ops.clip(student_outputs, 1e-7, 1.0))
        return super().compute_loss(teacher_outputs, student_outputs, **kwargs)
