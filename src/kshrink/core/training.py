"""The one fine-tune loop every technique shares: `model.fit` with the technique's callbacks,
an optional teacher (the original model) through `keras.distillation.Distiller`, and early
stopping on validation data.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import keras
import numpy as np

from kshrink.core.data import example_count, model_inputs
from kshrink.core.graph import copy_model
from kshrink.core.stream import Stream
from kshrink.core.technique import (
    Options,
    check_bool,
    check_choice,
    check_int,
    check_range,
    option,
)
from kshrink.errors import KshrinkError

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")


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
        distill: also learn from the original model's outputs (knowledge distillation).
        temperature: softening temperature for distillation.
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

    Example:

    ```python
    kshrink.compress(model, kshrink.Prune(sparsity=0.9), data=(x, y),
                     fine_tune=kshrink.FineTune(epochs=3, distill=True))
    ```
    """

    name = "fine_tune"

    epochs: int = option(1, "passes over the training data per technique")
    batch_size: int = option(128, "examples per step")
    learning_rate: float = option(1e-3, "initial learning rate")
    optimizer: str = option("adam", "adam, adamw or sgd")
    lr_schedule: str = option("cosine", "cosine or constant")
    loss: str = option("auto", "a Keras loss name, or auto")
    distill: bool = option(False, "learn from the original model too")
    temperature: float = option(4.0, "distillation temperature")
    distill_weight: float = option(0.5, "weight of the distillation loss")
    shuffle: bool = option(True, "shuffle the training data every epoch")
    early_stopping: int | None = option(None, "patience in epochs on validation loss")
    verbose: bool = option(True, "show training progress")
    steps_per_epoch: int | None = option(None, "batches per epoch (default: all the data)")
    clipnorm: float | None = option(None, "clip each gradient to this norm")
    clipvalue: float | None = option(None, "clip gradient values to +-this")
    weight_decay: float | None = option(None, "decoupled weight decay")

    def __post_init__(self):
        check_int(self.name, "epochs", self.epochs, low=1)
        check_int(self.name, "batch_size", self.batch_size, low=1)
        check_range(self.name, "learning_rate", self.learning_rate, 1e-9, 10.0)
        check_choice(self.name, "optimizer", self.optimizer, OPTIMIZERS)
        check_choice(self.name, "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_bool(self.name, "distill", self.distill)
        check_range(self.name, "temperature", self.temperature, 1e-3, 1e3)
        check_range(self.name, "distill_weight", self.distill_weight, 0, 1)
        check_bool(self.name, "shuffle", self.shuffle)
        check_int(self.name, "early_stopping", self.early_stopping, low=1, allow_none=True)
        check_bool(self.name, "verbose", self.verbose)
        check_int(self.name, "steps_per_epoch", self.steps_per_epoch, low=1, allow_none=True)
        check_range(self.name, "clipnorm", self.clipnorm, 1e-9, 1e9, allow_none=True)
        check_range(self.name, "clipvalue", self.clipvalue, 1e-9, 1e9, allow_none=True)
        check_range(self.name, "weight_decay", self.weight_decay, 0.0, 1.0, allow_none=True)

    def total_steps(self, data) -> int:
        """Optimizer steps over the run, for `data` (arrays, or a `Stream`)."""
        if isinstance(data, Stream):
            return self.epochs * data.steps_per_epoch(self.batch_size)
        per_epoch = math.ceil(example_count(model_inputs(data)) / self.batch_size)
        return self.epochs * min(per_epoch, self.steps_per_epoch or per_epoch)


def fine_tune(model: keras.Model, config: FineTune, data, validation_data=None, *,
              teacher: keras.Model | None = None, callbacks=()) -> keras.Model:
    """Trains `model` in place with `config` and returns it.

    Args:
        model: the model to train (kshrink's working copy, possibly with wrapped layers).
        config: the fine-tune options.
        data: `(x, y)` training data, or a `Stream` (see `kshrink.core.stream`).
        validation_data: `(x, y)` or a `Stream`, for early stopping and progress, or None.
        teacher: the original model; needed for `config.distill` and for `loss="auto"`.
            It is copied, never trained.
        callbacks: the technique's callbacks (e.g. the pruning schedule).
    """
    streamed = isinstance(data, Stream)
    x, y = data.head() if streamed else data  # a stream's first labels choose the loss
    reference = teacher if teacher is not None else model
    probabilities = _ends_in_softmax(reference)
    steps = config.total_steps(data)
    rate = (keras.optimizers.schedules.CosineDecay(config.learning_rate, steps)
            if config.lr_schedule == "cosine" else config.learning_rate)
    options = {key: getattr(config, key) for key in ("clipnorm", "clipvalue", "weight_decay")
               if getattr(config, key) is not None}
    optimizer = {
        "adam": lambda: keras.optimizers.Adam(rate, **options),
        "adamw": lambda: keras.optimizers.AdamW(rate, **options),
        "sgd": lambda: keras.optimizers.SGD(rate, momentum=0.9, **options),
    }[config.optimizer]()
    loss = task_loss(reference, y, config.loss)
    trainer = model
    if config.distill:
        if teacher is None:
            raise ValueError("fine_tune: distill needs the original model as teacher")
        frozen = copy_model(teacher)
        trainer = keras.distillation.Distiller(
            teacher=frozen, student=model,
            distillation_losses=_OutputDistillation(config.temperature, probabilities),
            student_loss_weight=1 - config.distill_weight,
        )
    trainer.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    all_callbacks = list(callbacks)
    if config.early_stopping and validation_data is not None:
        all_callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.early_stopping, restore_best_weights=True))
    verbose = (1 if sys.stdout.isatty() else 2) if config.verbose else 0
    all_callbacks.append(keras.callbacks.TerminateOnNaN())
    if isinstance(validation_data, Stream):
        validation_data = validation_data.for_fit(config.batch_size)
    if streamed:  # batches come as the stream makes them; shuffling is the stream's
        history = trainer.fit(data.for_fit(config.batch_size), epochs=config.epochs,
                              steps_per_epoch=data.steps_per_epoch(config.batch_size),
                              shuffle=False, validation_data=validation_data,
                              callbacks=all_callbacks, verbose=verbose)
    else:
        history = trainer.fit(x, y, batch_size=config.batch_size, epochs=config.epochs,
                              shuffle=config.shuffle, validation_data=validation_data,
                              steps_per_epoch=config.steps_per_epoch,
                              callbacks=all_callbacks, verbose=verbose)
    if not all(np.isfinite(v) for v in history.history.get("loss", [])):
        raise KshrinkError("fine-tuning diverged: the loss became NaN or Inf, so nothing is "
                           "kept. Lower the learning rate (FineTune(learning_rate=...)) or "
                           "check the data")
    check_finite_weights(model, "after fine-tuning")
    return model


def check_finite_weights(model: keras.Model, when: str) -> None:
    """Raises `KshrinkError` naming the first layer and weight holding NaN or Inf."""
    for variable in model.weights:
        values = keras.ops.convert_to_numpy(variable.value)
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            layer, _, name = variable.path.rpartition("/")
            raise KshrinkError(f"layer {layer!r}: weight {name!r} holds NaN or Inf values "
                               f"{when}; nothing is written")


def _ends_in_softmax(model: keras.Model) -> bool:
    last = model.layers[-1]
    while isinstance(last, keras.Model):
        last = last.layers[-1]
    last = getattr(last, "layer", last)  # look through wrappers
    if isinstance(last, keras.layers.Softmax):
        return True
    return getattr(last, "activation", None) is keras.activations.softmax


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
