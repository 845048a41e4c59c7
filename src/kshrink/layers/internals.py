"""The private Keras attributes kshrink writes or calls, in one place, each with a canary test
(`tests/layers/test_keras_internals.py`) that fails if Keras renames it."""

from __future__ import annotations

import contextlib
import gc

import keras


def set_variable_layout(variable: keras.Variable, layout) -> None:
    """Gives `variable` the device layout a distribution would have given it had it been made
    under one (JAX), or None: on one device. Keras keeps every later assignment to the
    variable in this layout; there is no public way to set it after creation."""
    variable._layout = layout


def own_dtype_policy(layer: keras.layers.Layer, policy) -> None:
    """Makes `policy` the layer's own dtype policy, replacing a `DTypePolicyMap` it was built
    from (the public setter writes into such a map instead)."""
    layer._dtype_policy = policy


@contextlib.contextmanager
def one_garbage_collection():
    """Within it, Keras' `Layer.__delattr__`, which runs a full `gc.collect()` for every
    variable it drops (`quantize` drops each float kernel), does not: one collection runs at
    the end instead. Each full collection walks the whole heap: int8 quantization of a
    two-layer BERT takes 5.9 s in a fresh process, 2.0 s with one collection, and far more in
    a process holding other models (a notebook, a test run). Other threads calling
    `gc.collect` meanwhile are not served."""
    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        yield
    finally:
        gc.collect = collect
        gc.collect()


def build_for_fit(model: keras.Model, batch) -> None:
    """Creates the optimizer and compiled-metric variables of a compiled `model` from the shapes
    of one `batch` (`(x, y)` as `fit` takes it, or `x`), as `fit` does on JAX and torch.

    On TensorFlow `fit` leaves them to the trace of its first step, and a `tf.function` that
    created variables is traced a second time: a whole extra trace per `fit` (6 of the 24 s
    of a MobileNetV2 prune with a 1-epoch fine-tune). Keras builds ahead only for a model made under a
    distribution strategy, through the private method called here."""
    if keras.backend.backend() != "tensorflow":
        return
    x, y = batch if isinstance(batch, tuple) and len(batch) == 2 else (batch, None)
    with model.distribute_strategy.scope():
        model._symbolic_build(data_batch=(x, y, None))
