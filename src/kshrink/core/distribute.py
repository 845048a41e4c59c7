"""Data-parallel fine-tuning on the engines Keras already has: `keras.distribution.DataParallel`
on JAX, `tf.distribute.MirroredStrategy` on TensorFlow. Each device holds a full replica of
every variable (weights, pruning masks, QAT ranges, cluster assignments, the teacher) and trains
on its slice of every batch; gradients are averaged, so the replicas stay identical.

The two engines want their variables at different times:

- TensorFlow makes mirrored variables only when they are *created* inside the strategy's scope,
  so a step that trains copies the model, wraps it and fine-tunes it (the teacher and the
  optimizer made there too) inside `training`; its `finalize` and everything after run out of
  it, on the mirrored variables (read there as plain ones). The strategy splits uneven batches
  itself.
- JAX lays out variables that already exist: `fit_scope` replicates them just before `fit` and
  brings them back to one device after it, so the rest of `compress` never sees a device mesh.
  JAX needs every batch to split evenly over the devices: the batch size must be a multiple
  of the device count, arrays are cut to a multiple of it (at most count - 1 examples are
  left out), and a dataset's last, uneven batch is dropped.

Several hosts (JAX): call `keras.distribution.initialize()` in every process first; the
devices are then all the hosts' devices, and each process feeds its own share of the data.
"""

from __future__ import annotations

import contextlib

import keras

from kshrink.core.graph import copy_model
from kshrink.layers.internals import set_variable_layout
from kshrink.errors import KshrinkError

DISTRIBUTIONS = ("data_parallel",)


class DataParallel:
    """The data-parallel engine of the current backend, over every local accelerator (or, with
    none, every logical CPU device)."""

    def __init__(self):
        self.backend = keras.backend.backend()
        if self.backend == "jax":
            self._distribution = keras.distribution.DataParallel()
            self.devices = len(keras.distribution.list_devices())
        elif self.backend == "tensorflow":
            import tensorflow as tf

            devices = (tf.config.list_logical_devices("GPU")
                       or tf.config.list_logical_devices("CPU"))
            self._strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
            self.devices = self._strategy.num_replicas_in_sync
        else:
            raise KshrinkError(
                f"FineTune(distribution='data_parallel') runs on the JAX backend "
                f"(keras.distribution.DataParallel) and the TensorFlow backend "
                f"(tf.distribute.MirroredStrategy); the {self.backend} backend trains on one "
                "device here. Set KERAS_BACKEND=jax or tensorflow, or leave distribution unset")

    def __repr__(self) -> str:
        engine = "MirroredStrategy" if self.backend == "tensorflow" else "DataParallel"
        return f"data parallel over {self.devices} device(s) ({engine})"

    @property
    def split_over(self) -> int:
        """How many equal parts every batch must split into: the devices on JAX; TensorFlow
        splits uneven batches itself."""
        return self.devices if self.backend == "jax" else 1

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.devices:
            raise KshrinkError(
                f"FineTune(batch_size={batch_size}) does not split over {self.devices} devices "
                f"for data-parallel fine-tuning: use a multiple of {self.devices}")

    @contextlib.contextmanager
    def training(self, model: keras.Model):
        """The scope a step that trains prepares and fine-tunes in, with the model it trains:
        on TensorFlow a copy of `model` made in the strategy's scope, so its variables (and
        the wrappers', the teacher's and the optimizer's made there too) are mirrored."""
        if self.backend != "tensorflow":
            yield model
            return
        with self._strategy.scope():
            yield copy_model(model)

    @contextlib.contextmanager
    def fit_scope(self, trainer: keras.Model):
        """The scope `fit` runs in, with `trainer`'s variables replicated on every device
        (JAX) for its duration."""
        if self.backend != "jax":
            yield
            return
        # Keras lays out the variables made under a distribution, and keeps every later
        # assignment (a callback's new masks) in that layout. These were made before it, so
        # they are given the layout it would have given them, for the duration of `fit`.
        variables = list({id(v): v for v in [*trainer.variables,
                                             *trainer.metrics_variables]}.values())
        for variable in variables:
            set_variable_layout(variable, self._distribution.get_variable_layout(variable))
            variable.assign(variable.value)
        try:
            with self._distribution.scope():
                yield
        finally:
            for variable in variables:  # back on one device, as the rest of compress expects
                set_variable_layout(variable, None)
                variable.assign(keras.ops.convert_to_numpy(variable.value))

    def even(self, arrays):
        """Arrays (`(x, y)`, dicts) cut to a multiple of the device count (JAX), or as they
        are."""
        if self.split_over == 1 or arrays is None:
            return arrays
        first = keras.tree.flatten(arrays)[0]
        keep = len(first) - len(first) % self.split_over
        if keep == 0:
            raise KshrinkError(f"data-parallel fine-tuning over {self.devices} devices needs "
                               f"at least {self.devices} examples; got {len(first)}")
        return keras.tree.map_structure(lambda v: v[:keep], arrays)
